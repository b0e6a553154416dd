"""The benchmark scripts' handling of bad input (their figures come from real runs, not tests)."""
import copy
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


def test_bn_recalibration_bad_inputs_are_one_line(tmp_path, capsys):
    script = load_script("bn_recalibration")
    assert script.main(["--baseline", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bn_recalibration: error: ") and "missing.pt" in err and err.count("\n") == 1
    torch.manual_seed(0)
    weights, _ = save_state_with_layout(build_mobilenet_v2(), tmp_path, "dense")
    (tmp_path / "bad.json").write_text("{not json")
    assert script.main(["--baseline", str(weights), "--sparsity-json", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.json: cannot read a JSON sparsity dict" in err and err.count("\n") == 1


def test_kd_cost_bad_inputs_are_one_line(tmp_path, capsys):
    script = load_script("kd_cost")
    assert script.main(["--teacher", str(tmp_path / "missing.pt"), str(tmp_path / "student.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd_cost: error: ") and "missing.pt" in err and err.count("\n") == 1
    weights, _ = save_state_with_layout(build_mobilenet_v2(), tmp_path, "dense")
    (tmp_path / "student.pth").write_bytes(b"truncated")
    assert script.main(["--teacher", str(weights), str(tmp_path / "student.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd_cost: error: ") and "student.pth" in err and err.count("\n") == 1


def test_kd_cost_runs_the_teacher_on_the_distilled_pass_only(cifar_dir):
    from mobileprune.data import load_cifar10
    script = load_script("kd_cost")
    data = load_cifar10(cifar_dir, val_size=8, train_limit=32)
    torch.manual_seed(0)
    teacher = build_mobilenet_v2().eval()
    batches_seen = []
    teacher.register_forward_hook(lambda module, inputs, output: batches_seen.append(len(inputs[0])))
    seconds = script.time_passes(build_mobilenet_v2(), teacher, data, batch_size=16, size=32)
    assert set(seconds) == {"labels alone", "distilled"} and all(s > 0 for s in seconds.values())
    assert sum(batches_seen) == 32  # every training image once, in the distilled pass and no other


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


def test_int8_layouts_rounds_every_channel_count_and_keeps_the_network_whole(tmp_path, capsys):
    from mobileprune.models import channel_layout, model_from_layout

    from conftest import tp_pruned_model

    script = load_script("int8_layouts")
    layout = channel_layout(tp_pruned_model(seed=0))
    for multiple in (8, 16):
        rounded = script.rounded_layout(layout, multiple)["layers"]
        assert rounded["features.0.0"]["in"] == 3 and rounded["classifier.1"]["out"] == 10
        counts = [v for name, shape in rounded.items() for key, v in shape.items()
                  if (name, key) not in (("features.0.0", "in"), ("classifier.1", "out")) and (key, v) != ("groups", 1)]
        assert all(count % multiple == 0 and count >= multiple for count in counts)
        model = model_from_layout(script.rounded_layout(layout, multiple)).eval()
        with torch.no_grad():  # depthwise groups, residual adds and the classifier all still fit together
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert script.main([str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert script.main(["--multiple", "0"]) == 2
    assert "--multiple 0: whole numbers from 1" in capsys.readouterr().err


def test_fp16_program_keeps_a_float_interface_and_refuses_bad_input(tmp_path, capsys):
    script = load_script("fp16_program")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    half = script.HalfPrecision(copy.deepcopy(model))
    assert all(p.dtype == torch.float16 for p in half.parameters())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, reference = half(images), model(images)
    assert logits.dtype == torch.float32  # what the lab's runner reads back
    assert (logits - reference).abs().max() <= script.FP16_TOLERANCE * reference.abs().max()
    assert script.main([str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert script.main([str(tmp_path / "missing.pth"), "--repeats", "4", "--rounds", "5"]) == 2
    assert "--repeats 4 --rounds 5: 1 ≤ rounds ≤ repeats" in capsys.readouterr().err


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


def test_bf16_accuracy_bad_inputs_are_one_line(capsys):
    script = load_script("bf16_accuracy")
    assert script.main(["--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "bf16_accuracy: error: --epochs 0: must be above 0\n"


def test_teacher_cache_distils_the_same_students_both_ways_and_says_when_it_pays(tmp_path, capsys):
    from mobileprune.distill import TeacherNet, save_teacher
    from mobileprune.files import write_json
    from mobileprune.models import save_state_with_layout

    from conftest import make_cifar_dir, tp_pruned_model

    script = load_script("teacher_cache")
    data = make_cifar_dir(tmp_path / "d", per_batch=12, test=4)
    save_teacher(TeacherNet([8, 16, 16], depth=2).eval(), tmp_path / "teacher.pt")
    save_state_with_layout(tp_pruned_model(ratio=0.7), tmp_path / "students" / "student-9", "mobilenet")
    write_json(tmp_path / "students" / "student-9" / "student.json", {"target_mflops": 9, "mflops": 9.0})
    common = ["--teacher", str(tmp_path / "teacher.pt"), "--students", str(tmp_path / "students"), "--data", str(data)]
    assert script.main(common + ["--epochs", "1", "--batch-size", "20", "--resolution", "32", "--bf16", "off", "--val-size", "5",
                                "--json", str(tmp_path / "cache.json")]) == 0
    out = capsys.readouterr().out
    assert "cache: 9 views of 55 images" in out and "on the fly: " in out and "cached: " in out
    assert "the cache saves" in out
    figures = json.loads((tmp_path / "cache.json").read_text())
    assert set(figures["runs"]) == {"on the fly", "cached"} and figures["cache_seconds"] > 0
    assert all(0 <= r["val_accuracy"]["student-9"] <= 1 for r in figures["runs"].values())
    assert script.main(["--teacher", str(tmp_path / "nosuch.pt"), "--students", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"teacher_cache: error: {tmp_path / 'nosuch.pt'}: no such file or folder\n"


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
