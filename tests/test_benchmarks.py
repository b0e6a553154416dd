"""The benchmark scripts' handling of bad input (their figures come from real runs, not tests)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mobileprune.models import build_mobilenet_v2, save_state_with_layout

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_commands_share_one_way_of_ending(capsys):
    # mobileprune and the benchmark scripts end through errors.exit_code: 0, one line and 2, or 130.
    from mobileprune.errors import MobilepruneError, exit_code

    def fail():
        raise MobilepruneError("x.pt: no such file")

    def interrupt():
        raise KeyboardInterrupt

    assert exit_code("tool", lambda: None) == 0 and capsys.readouterr().err == ""
    assert exit_code("tool", fail) == 2 and capsys.readouterr().err == "tool: error: x.pt: no such file\n"
    assert exit_code("tool", interrupt) == 130 and capsys.readouterr().err == "tool: interrupted\n"


def test_stem_stride_trains_a_model_that_reloads_with_its_stride(tmp_path, cifar_dir, capsys):
    from mobileprune.evaluate import count_mflops
    from mobileprune.models import load_model

    script = load_script("stem_stride")
    torch.manual_seed(0)
    weights, _ = save_state_with_layout(build_mobilenet_v2(), tmp_path, "dense")
    out = tmp_path / "run"
    assert script.main(["--baseline", str(weights), "--stride", "7", "--target", "20", "--epochs", "1",
                        "--batch-size", "16", "--val-size", "40", "--bn-images", "32", "--data", str(cifar_dir),
                        "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stride_mflops"] == pytest.approx(26.050058) and 19.5 <= summary["mflops"] <= 20.0
    model = load_model(out / "best.pt")  # the layout carries the stride: the grader's count agrees
    assert model.features[0][0].stride == (7, 7) and count_mflops(model)[0] == pytest.approx(summary["mflops"])
    assert script.main(["--half", str(out / "best.pt"), "--out", str(tmp_path / "half")]) == 0
    half = load_model(tmp_path / "half" / "mobilenet.pt")  # fp16 on disk, fp32 once loaded, the stride kept
    assert half.features[0][0].stride == (7, 7) and half.classifier[1].weight.dtype == torch.float32
    assert torch.equal(half.classifier[1].weight, model.classifier[1].weight.half().float())
    capsys.readouterr()
    assert script.main(["--baseline", str(weights), "--split"]) == 0
    split = capsys.readouterr().out
    assert "stride 2): 318.97 MFLOPs" in split and "112 px 40.1" in split and "stem stride 7: 26.05 MFLOPs" in split
    assert script.main(["--baseline", str(weights), "--stride", "0", "--data", str(cifar_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stem_stride: error: stem stride must be") and err.count("\n") == 1


def test_grade_class_bad_inputs_are_one_line(tmp_path, capsys):
    script = load_script("grade_class")
    assert script.main(["--model-dir", str(tmp_path / "none"), "--copies", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grade_class: error: ") and "mobilenet.pth" in err and err.count("\n") == 1


def test_student_layouts_knows_the_open_tracks_plans_and_refuses_an_unknown_variant(capsys):
    from mobileprune.models import parse_stride_plan

    script = load_script("student_layouts")
    for name in ("stem7", "stem7-f4s1", "cifar", "stem4"):
        parse_stride_plan(script.VARIANTS[name]["strides"])  # each a plan the models accept
    assert script.main(["nosuch", "--baseline", "b.pt", "--teacher", "t.pt"]) == 2
    assert capsys.readouterr().err.startswith("student_layouts: error: unknown variant 'nosuch'; choose from l2,")


def test_student_layouts_at_equal_seconds_each_alone_from_one_teacher_cache(tmp_path, capsys):
    from mobileprune.distill import TeacherNet, save_teacher
    from mobileprune.models import build_mobilenet_v2, save_pickled_model

    from conftest import make_cifar_dir

    script = load_script("student_layouts")
    data = make_cifar_dir(tmp_path / "d", per_batch=12, test=4)
    save_teacher(TeacherNet([8, 16, 16], depth=2).eval(), tmp_path / "teacher.pt")
    save_pickled_model(build_mobilenet_v2().eval(), tmp_path / "dense.pth")
    (tmp_path / "tiny.toml").write_text('description = "tiny"\n[data]\nval_size = 10\n[distill]\nbatch_size = 25\n'
                                        'resolution = 32\nbf16 = false\neval_batch_size = 10\ntranslate = 1\n')
    assert script.main(["stem7", "cifar", "--recipe", str(tmp_path / "tiny.toml"), "--baseline",
                        str(tmp_path / "dense.pth"), "--teacher", str(tmp_path / "teacher.pt"), "--data", str(data),
                        "--train-images", "50", "--val-images", "10", "--seconds-each", "1",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 0
    figures = json.loads((tmp_path / "out" / "layouts.json").read_text())
    assert figures["seconds_each"] == 1 and figures["teacher_cache"] and figures["epochs"] is None
    assert {r["variant"] for r in figures["rows"]} == {"stem7", "cifar"}
    assert all(r["epochs"] >= 1 and r["MFLOPs"] <= 20 for r in figures["rows"])
    # Each trained alone in its own folder; one cache of the 50 images' 9 views served both.
    assert sorted(p.name for p in (tmp_path / "out" / "kd").iterdir()) == ["cifar", "stem7"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["logits-translate1-flipmean.pt"]
    assert "| stem7 |" in capsys.readouterr().out


def test_resolution_schedule_reads_one_student_per_run_never_a_trained_teacher(tmp_path, capsys, monkeypatch):
    """A distill run's student-*/ or a layout study's variant folder; a run's own teacher/ history is not a student."""
    from mobileprune.files import write_csv

    row = {"epoch": 1, "images": 100, "val_accuracy": 0.5, "val_ema": 0.6, "spent": 10.0}
    write_csv([row], tmp_path / "distill" / "student-20" / "history.csv")
    write_csv([{"epoch": 1, "val_accuracy": 0.9}], tmp_path / "distill" / "teacher" / "history.csv")
    write_csv([{**row, "val_ema": 0.7}], tmp_path / "layouts" / "kd" / "cifar" / "cifar" / "history.csv")
    script = load_script("resolution_schedule")
    figure = tmp_path / "f.png"
    monkeypatch.setattr("sys.argv", ["x", f"a={tmp_path / 'distill'}", f"b={tmp_path / 'layouts' / 'kd' / 'cifar'}",
                                     "--figure", str(figure), "--title", "two runs"])
    script.main()
    out = capsys.readouterr().out
    assert "| a | 1 | 10 | 100 | 0.5000 (0.6000) | 0.6000 (1) |" in out and "| b |" in out and "0.7000 (1)" in out
    assert figure.stat().st_size > 10_000
    write_csv([row], tmp_path / "distill" / "student-15" / "history.csv")  # two students: which one is meant?
    monkeypatch.setattr("sys.argv", ["x", f"a={tmp_path / 'distill'}", "--figure", str(figure)])
    with pytest.raises(SystemExit):
        script.main()
    assert "expected one */history.csv (one student), found 2" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["x", f"a={tmp_path / 'distill' / 'student-15'}", "--figure", str(figure)])
    script.main()  # then name the student's own folder
    assert "| a | 1 |" in capsys.readouterr().out
