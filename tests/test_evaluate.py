import json
import shutil
import zipfile

import pytest
import torch

from mobileprune import evaluate
from mobileprune.cli import main
from mobileprune.export import PteModel, check_pte_matches
from mobileprune.models import build_mobilenet_v2, save_pickled_model

from conftest import real_data_or_skip, write_cifar_bin


def test_dense_mflops_and_params_match_the_lab():
    mflops, params = evaluate.count_mflops(build_mobilenet_v2())
    assert mflops == pytest.approx(318.969098, abs=1e-6)
    assert params == 2_236_682


def test_lab_score():
    assert evaluate.lab_score(45, 0.93) == pytest.approx(45.0)
    assert evaluate.lab_score(200, 0.95) == pytest.approx(0.0)
    assert evaluate.lab_score(26.3, 0.923) == pytest.approx((200 - 26.3) / 155 * 45)
    assert evaluate.lab_score(45, 0.91) == pytest.approx((1 - 0.1) * 45)


def test_pte_of_pruned_model_equals_eager(pruned_model, pruned_pte):
    assert check_pte_matches(pruned_model, pruned_pte, samples=2, seed=1) < 1e-3
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert PteModel(pruned_pte)(x).argmax(1).tolist() == pruned_model(x).argmax(1).tolist()


def test_running_a_pte_leaves_the_exporter_unimported_and_an_export_after_it_still_works(pruned_pte, tmp_path):
    """export.runtime(): a process that only runs programs (a grading worker, a probe) skips the 3.8-s
    import of executorch.exir; one that exports afterwards gets the real package."""
    import subprocess
    import sys

    script = f"""
import sys, torch
from torch import nn
from mobileprune.export import PteModel, export_pte
logits = PteModel({str(pruned_pte)!r}, isolate=True)(torch.zeros(1, 3, 224, 224))
assert logits.shape == (1, 10)
assert not [m for m in sys.modules if m.startswith(("executorch.exir.program", "torch._dynamo", "torch._inductor"))]
small = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
export_pte(small, {str(tmp_path / "after.pte")!r}, check_samples=1)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]

def _submission(tmp_path, model, pte, with_data=True):
    folder = tmp_path / "sub"
    save_pickled_model(model, folder / "model" / "mobilenet.pth")
    if pte is not None:
        shutil.copy(pte, folder / "model" / "mobilenet.pte")
    if with_data:
        write_cifar_bin(folder / "data" / "test_batch.bin", 12)
    return folder


@pytest.mark.slow
def test_grade_tiny_submission_folder_and_zip(tmp_path, pruned_model, pruned_pte, capsys):
    folder = _submission(tmp_path, pruned_model, pruned_pte)
    result = evaluate.grade(folder, progress=False)
    assert result.images == 12
    assert result.mflops == pytest.approx(evaluate.count_mflops(pruned_model)[0])
    assert result.mflops < 318
    # The .pte and the .pth predict the same classes, so their accuracies agree exactly.
    assert result.pte_accuracy == result.pth_accuracy
    assert result.score == pytest.approx(evaluate.lab_score(result.mflops, result.pte_accuracy["runner"]))

    archive = tmp_path / "0000000.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.rglob("*"):
            z.write(f, f.relative_to(folder))
    assert main(["--no-progress", "grade", str(archive), "--json", "--save", str(tmp_path / "run")]) == 0
    graded = json.loads(capsys.readouterr().out)
    assert graded["mflops"] == pytest.approx(result.mflops) and graded["pth_accuracy"] == result.pth_accuracy
    # --save keeps both forms where `mobileprune report` looks for them
    assert json.loads((tmp_path / "run" / "grade.json").read_text()) == graded
    assert f"{result.mflops:.6f}" in (tmp_path / "run" / "grade.txt").read_text()


def test_grade_without_pte_grades_pth_alone_and_falls_back_to_data_path(tmp_path, pruned_model, cifar_dir):
    folder = _submission(tmp_path, pruned_model, None, with_data=False)
    result = evaluate.grade(folder, data=cifar_dir, progress=False, variants=("torchvision",))
    assert result.pte_accuracy is None and result.images == 40
    assert any("no model/mobilenet.pte" in n for n in result.notes)
    assert any("not in the submission" in n for n in result.notes)


def test_grade_refuses_a_model_that_is_not_mobilenet_v2(tmp_path, capsys):
    (tmp_path / "sub" / "model").mkdir(parents=True)
    torch.save(torch.nn.Linear(3, 10), tmp_path / "sub" / "model" / "mobilenet.pth")
    assert main(["grade", str(tmp_path / "sub")]) == 2
    assert "is a torch.nn.modules.linear.Linear, not a torchvision MobileNetV2" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["grade", str(tmp_path / "empty")]) == 2
    assert "holds no mobilenet.pth (looked in model/, prune/ and the folder itself)" in capsys.readouterr().err


def test_pte_with_wrong_input_shape_is_refused(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    program = to_edge_transform_and_lower(torch.export.export(model, (torch.zeros(1, 3, 8, 8),)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    (tmp_path / "small.pte").write_bytes(program.buffer)
    with pytest.raises(Exception, match=r"input is \(1, 3, 8, 8\)"):
        PteModel(tmp_path / "small.pte")
    (tmp_path / "junk.pte").write_bytes(b"not a program")
    with pytest.raises(Exception, match="not an ExecuTorch program"):  # refused by its header
        PteModel(tmp_path / "junk.pte")


def test_evaluate_on_real_test_images(pruned_model, tmp_path):
    folder = real_data_or_skip()
    from mobileprune.data import read_cifar_bin

    images, labels = read_cifar_bin(folder / "test_batch.bin")
    acc = evaluate.accuracy(pruned_model, images[:50], labels[:50])
    assert 0.0 <= acc <= 1.0
    predictions = evaluate.predict(pruned_model, images[:50])
    assert predictions.shape == (50,) and predictions.max() < 10


def test_package_writes_the_labs_layout_and_grades_it(tmp_path, pruned_model, pruned_pte, cifar_dir):
    from mobileprune.package import package

    model_dir = tmp_path / "m"
    save_pickled_model(pruned_model, model_dir / "mobilenet.pth")
    shutil.copy(pruned_pte, model_dir / "mobilenet.pte")
    (tmp_path / "nb.ipynb").write_text("{}")
    archive, result = package("0000000", model_dir, tmp_path, notebook=tmp_path / "nb.ipynb",
                              runner=tmp_path / "none", data=cifar_dir, progress=False)
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["0000000.ipynb", "model/mobilenet.pte", "model/mobilenet.pth"]
    assert result.images == 40 and result.pte_accuracy == result.pth_accuracy
    assert any("no runner" in n for n in result.notes)


def test_package_refuses_a_pte_that_is_not_its_pth(tmp_path, pruned_pte, capsys):
    from conftest import tp_pruned_model

    other = tp_pruned_model(seed=1)
    save_pickled_model(other, tmp_path / "m" / "mobilenet.pth")
    shutil.copy(pruned_pte, tmp_path / "m" / "mobilenet.pte")
    assert main(["package", "--id", "0000000", "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path)]) == 2
    assert "ExecuTorch output differs from eager" in capsys.readouterr().err
    assert main(["package", "--id", "../x", "--model-dir", str(tmp_path / "m")]) == 2
    assert "student id '../x'" in capsys.readouterr().err


def test_a_pte_is_fed_contiguous_memory_whatever_view_it_is_given(pruned_pte):
    """ExecuTorch's binding reads an input's raw memory and ignores its strides: a transposed view must
    give the outputs of its contiguous copy (issue #24: 10 % accuracy in a grader written elsewhere)."""
    pte = PteModel(pruned_pte)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    view = x.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, other strides
    assert not view.is_contiguous() and torch.equal(view, x)
    assert torch.allclose(pte(view), pte(x.contiguous()))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pte(channels_last), pte(x))


def test_predict_folds_batchnorm_and_predicts_as_the_plain_model_does(pruned_model):
    import copy

    from torch import nn

    folded = evaluate.fold_batchnorm(copy.deepcopy(pruned_model).eval())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = pruned_model.eval()(evaluate.preprocess(images)).argmax(1)
    assert evaluate.predict(pruned_model, images).tolist() == plain.tolist()
    assert any(isinstance(m, nn.BatchNorm2d) for m in pruned_model.modules())  # the caller's model is untouched

    class Untraceable(nn.Module):  # control flow on a value: FX cannot trace it, so it runs unfolded
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10)

        def forward(self, x):
            y = self.bn(self.conv(x)).mean((2, 3))
            return y if y.sum() > 0 else -y

    model = Untraceable().eval()
    assert evaluate.fold_batchnorm(model) is model and evaluate.predict(model, images).shape == (24,)


def test_a_changed_stride_is_the_open_track_package_refuses_it_unless_asked_and_the_grade_says_so(tmp_path, cifar_dir,
                                                                                                capsys):
    from mobileprune.models import set_strides

    torch.manual_seed(0)
    model = set_strides(build_mobilenet_v2(), {"features.0": 7, "features.2": 1}).eval()
    model_dir = tmp_path / "open"
    save_pickled_model(model, model_dir / "mobilenet.pth")
    (tmp_path / "s1.ipynb").write_text("{}")
    # The revised rules' layout: the .pth and the notebook, so no .pte to export for this test.
    args = ["--no-progress", "package", "--id", "s1", "--model-dir", str(model_dir), "--out", str(tmp_path / "zips"),
            "--data", str(cifar_dir), "--grade-limit", "8", "--notebook", str(tmp_path / "s1.ipynb"), "--rules",
            "revised"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "open track: features.0 stride 7, features.2 stride 1" in err and "--track open" in err
    assert err.count("\n") == 1 and not (tmp_path / "zips").exists()
    assert main(args + ["--track", "open"]) == 0
    out = capsys.readouterr().out
    assert "model        MobileNetV2, open track: features.0 stride 7, features.2 stride 1, checked" in out
    assert "note         open track: strides changed from torchvision's" in out
