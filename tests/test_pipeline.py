import json

import pytest

from mobileprune.cli import main
from mobileprune.pipeline import run_pipeline
from mobileprune.report import collect_release

from conftest import make_cifar_dir

TINY = dict(epochs=1, batch_size=20, lr=0.01, warmup_epochs=0, resolutions=[32], eval_resolution=32, bf16=False,
            eval_batch_size=50)


def toml_lines(table: dict) -> str:
    """A flat table's keys as TOML lines (JSON's numbers, strings, lists and booleans are TOML's)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())


RECIPE = {
    "name": "tiny",
    "baseline": TINY,
    "finegrained": {"target_size": 0.25, "scan_sparsities": [0.5, 0.9], "scan_images": 10, "eval_resolution": 32,
                    "scan_bn_recalibration_images": 10,
                    "export": False, "train": {**TINY, "kd_alpha": 0.5}},
    "prune": {"target_mflops": 150.0, "steps": 1, "export": False, "finetune": {**TINY, "kd_alpha": 0.5}},
}


@pytest.mark.slow
def test_whole_pipeline_on_tiny_data_and_resume(tmp_path):
    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    recipe = {**RECIPE, "data": {"val_size": 10}}
    logs = []
    report = run_pipeline(recipe, folder, tmp_path / "run", progress=False, log=logs.append)
    text = report.read_text()
    for heading in ("## Dense baseline", "## Part 1: fine-grained pruning (`finegrained`)", "## Part 2: channel pruning",
                    "## Hand-ins, graded as the lab does"):
        assert heading in text
    fine = json.loads((tmp_path / "run" / "finegrained" / "summary.json").read_text())
    assert fine["relative_size_after"] <= 0.25
    # 5 batches of 12 images less 10 held out for validation; distillation is the recipe's default
    assert fine["finetune_epochs"] == 1 and fine["finetune_images"] == 50 and fine["distill"] is True
    # BatchNorm re-estimated on every training image there is (the default asks for 1,000)
    assert fine["bn_recalibration_images"] == 50 and 0 <= fine["pruned_val_dense_bn"] <= 1
    scan = json.loads((tmp_path / "run" / "finegrained" / "sensitivity.json").read_text())
    assert scan["signature"]["bn_recalibration_images"] == 10  # every scan point on adaptive BatchNorm
    fine_md = (tmp_path / "run" / "finegrained" / "summary.md").read_text()
    assert "Fine-tuned 1 epoch(s) on 50 training images, distilled from the dense model." in fine_md
    assert "re-estimated on 50 training images; with the dense model's statistics" in fine_md
    graded = json.loads((tmp_path / "run" / "grade.json").read_text())
    assert 149.5 <= graded["mflops"] <= 150.0 and graded["images"] == 6
    for plot in ("sensitivity", "sparsity", "weights_dense", "weights_pruned", "parameters"):
        assert (tmp_path / "run" / "finegrained" / "plots" / f"{plot}.png").stat().st_size > 1000

    logs.clear()
    run_pipeline(recipe, folder, tmp_path / "run", progress=False, log=logs.append)
    assert "[2/4] Part 1: done already" in logs and "[3/4] Part 2: done already" in logs

    # A release of this run: results and the pruned model, not the dense-sized models or checkpoints.
    release = tmp_path / "release"
    copied = {p.relative_to(release).as_posix() for p in collect_release([tmp_path / "run"], release)}
    assert {"run/prune/mobilenet.pth", "run/prune/schedule.csv", "run/finegrained/sensitivity.json",
            "run/grade.json"} <= copied
    assert not any(name.endswith(("baseline/mobilenet.pth", "finegrained/mobilenet.pth", "last.pt"))
                   or "step_" in name or "submission" in name for name in copied)
    (release / "run" / "prune" / "schedule.png").unlink()
    assert main(["report", str(release)]) == 0
    assert (release / "run" / "prune" / "schedule.png").stat().st_size > 1000
    assert (release / "schedules.png").stat().st_size > 1000
    text = (release / "REPORT.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `run/prune` |"))
    assert f"| {graded['mflops']:.2f} |" in row and "| l2 | no | 0 | 1 | yes |" in row
    assert f"| `run` | {graded['mflops']:.2f} |" in text  # the graded hand-in


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_cifar_dir(tmp_path)
    assert main(["finegrained", "--recipe", "quick", "--data", str(folder)]) == 2
    assert "no baseline yet" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[0.5]")
    for path, message in (("nosuch.json", "nosuch.json: cannot read a JSON sparsity dict"),
                          ("list.json", "list.json: not a sparsity dict")):
        assert main(["finegrained", "--recipe", "quick", "--data", str(folder), "--sparsity-json", path]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["run", "--recipe", "nosuch"]) == 2
    assert "recipe 'nosuch' not found; available:" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[prune\n")
    assert main(["prune", "--recipe", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml: not valid TOML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "x.pte", "--threads", "0"])
    assert main(["report", "nosuch"]) == 2
    assert "nosuch: no such folder" in capsys.readouterr().err
    assert main(["report", "rel", "--collect", "runs/nosuch"]) == 2
    assert "runs/nosuch: no such run folder" in capsys.readouterr().err


def test_cli_train_writes_the_baseline_and_its_summary(tmp_path, capsys):
    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text("[data]\nval_size = 10\n\n[baseline]\n" +
                      toml_lines(TINY))
    out = tmp_path / "base"
    assert main(["--no-progress", "train", "--recipe", str(recipe), "--data", str(folder), "--out", str(out),
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "tiny" and summary["best_epoch"] == 1 and summary["test_images"] == 6
    assert summary["mflops"] == pytest.approx(318.969098)
    assert (out / "mobilenet.pth").is_file() and "best epoch 1" in capsys.readouterr().out


def test_cli_recover_trains_a_pruned_model_further(tmp_path, capsys, pruned_model):
    from mobileprune.models import build_mobilenet_v2, save_pickled_model, save_state_with_layout

    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    recipe = tmp_path / "more.toml"
    recipe.write_text("[data]\nval_size = 10\n\n[recover]\nimages = 20\nskip_images = 40\nexport = false\n\n"
                      "[recover.train]\n" + toml_lines({**TINY, "epochs": 5, "kd_alpha": 0.5}))
    save_state_with_layout(pruned_model, tmp_path, "pruned")
    save_pickled_model(build_mobilenet_v2().eval(), tmp_path / "dense.pth")
    args = ["--no-progress", "recover", str(tmp_path / "pruned.pt"), "--recipe", str(recipe), "--data", str(folder),
            "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "a"), "--teacher", str(tmp_path / "nosuch.pth")]) == 2
    err = capsys.readouterr().err
    assert "nosuch.pth" in err and err.count("\n") == 1
    assert main(args + ["--out", str(tmp_path / "a"), "--teacher", str(tmp_path / "dense.pth"), "--epochs", "1"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["distill"] and summary["images"] == 20 and summary["skip_images"] == 40
    assert summary["lr"] == TINY["lr"]
    assert "MFLOPs, val" in capsys.readouterr().out and (tmp_path / "a" / "mobilenet.pth").is_file()
    # A release of the run: the model and the history come along, the resume checkpoints do not.
    assert main(["report", str(tmp_path / "rel"), "--collect", str(tmp_path / "a")]) == 0
    assert (tmp_path / "rel" / "a" / "mobilenet.pth").is_file() and (tmp_path / "rel" / "a" / "train" / "history.csv").is_file()
    assert not (tmp_path / "rel" / "a" / "train" / "last.pt").exists()
    text = (tmp_path / "rel" / "REPORT.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `a` |"))
    assert f"| {summary['val_before']:.4f} | {summary['val_trained']:.4f} | {summary['kept']} |" in row
    assert "| – | " in row and "| 20 | 40 | 1 | 0.01 |" in row  # not from a run folder; images, first image, epochs, lr
    assert "## Dense baseline" not in text  # its summary is not mistaken for a baseline's
    assert main(args + ["--out", str(tmp_path / "b"), "--no-distill", "--epochs", "1", "--images", "8",
                        "--skip-images", "3", "--lr", "0.002"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["distill"] is False and summary["images"] == 8 and summary["skip_images"] == 3
    assert summary["lr"] == 0.002 and summary["epochs"] == 1
    with pytest.raises(SystemExit) as stopped:  # refused by the argument's type, before anything loads
        main(args + ["--out", str(tmp_path / "c"), "--no-distill", "--skip-images", "-1"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--skip-images: expected a whole number, 0 or more (got -1)" in err
    assert err.count("\n") == 1 and not (tmp_path / "c").exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "pruned.pt").read_bytes()[:1000])
    (tmp_path / "cut.layout.json").write_text((tmp_path / "pruned.layout.json").read_text())
    assert main(args[:2] + [str(tmp_path / "cut.pt")] + args[3:] + ["--no-distill"]) == 2
    err = capsys.readouterr().err
    assert "cut.pt" in err and err.count("\n") == 1


def test_cli_recalibrate_keeps_the_better_of_the_two_under_the_worse_resize(tmp_path, capsys, monkeypatch,
                                                                            pruned_model):
    import copy

    import torch
    import mobileprune.evaluate
    from mobileprune.data import load_cifar10
    from mobileprune.models import load_model, save_state_with_layout
    from mobileprune.train import recalibrate_batchnorm
    from conftest import randomize_batchnorm

    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    recipe = tmp_path / "split.toml"
    recipe.write_text("[data]\nval_size = 10\n")
    run = tmp_path / "run"  # a Part 2 run folder: its record is carried forward
    trained = randomize_batchnorm(copy.deepcopy(pruned_model), seed=3)  # the session's model stays as it is
    save_state_with_layout(trained, run, "mobilenet")
    (run / "summary.json").write_text(json.dumps({"target_mflops": 150, "dense_mflops": 318.969098, "distill": True}))
    (run / "schedule.csv").write_text("step,mflops,params,val_pruned,val_finetuned\n1,149.9,1000,0.1,0.2\n")
    args = ["--no-progress", "recalibrate", str(run / "mobilenet.pt"), "--recipe", str(recipe), "--data", str(folder),
            "--device", "cpu", "--no-export", "--images", "20"]
    data = load_cifar10(folder, val_size=10)

    # Validation, in the order measured: as is (torchvision, runner), recalibrated (same), then the test.
    def measured(values):
        answers = iter(values)
        monkeypatch.setattr(mobileprune.evaluate, "accuracy", lambda *a, **k: next(answers))

    # As is: 0.9 and 0.5; recalibrated: 0.7 and 0.6. The worse resize decides: recalibrated.
    measured([0.9, 0.5, 0.7, 0.6, 0.4])
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["kept"] == "recalibrated" and summary["val_accuracy"] == 0.7 and summary["val_accuracy_runner"] == 0.6
    assert summary["val_by_resize"]["as is"] == {"torchvision": 0.9, "runner": 0.5} and summary["test_accuracy"] == 0.4
    assert "kept recalibrated" in capsys.readouterr().out
    # Its statistics are an exact estimate on the first 20 of a seeded permutation of the training images.
    chosen = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[:20]
    expected = recalibrate_batchnorm(load_model(run / "mobilenet.pt"), data.train_images[chosen], batch_size=100)
    kept, original = load_model(tmp_path / "a" / "mobilenet.pt").state_dict(), trained.state_dict()
    assert all(torch.allclose(kept[k], v, atol=1e-6) for k, v in expected.state_dict().items())
    assert not torch.allclose(kept["features.1.conv.0.1.running_var"], original["features.1.conv.0.1.running_var"])
    assert summary["target_mflops"] == 150 and summary["distill"] is True
    assert (tmp_path / "a" / "schedule.csv").read_text().splitlines()[-1].startswith("recalibrate,")

    # A tie under the worse resize keeps the model as it is, weights and statistics unchanged.
    measured([0.9, 0.6, 0.95, 0.6, 0.4])
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    kept = load_model(tmp_path / "b" / "mobilenet.pt").state_dict()
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["kept"] == "as is"
    assert all(torch.equal(kept[k], v) for k, v in original.items())

    # More images than the training split holds: one line, nothing written.
    assert main(args[:-1] + ["100000", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--images must be between 1 and the" in err and err.count("\n") == 1 and not (tmp_path / "c").exists()


def test_cli_average_keeps_the_best_interpolation_on_validation(tmp_path, capsys, pruned_model):
    import torch
    from mobileprune.models import build_mobilenet_v2, interpolate_models, load_model, save_state_with_layout
    from conftest import randomize_batchnorm

    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    recipe = tmp_path / "split.toml"
    recipe.write_text("[data]\nval_size = 10\n")
    save_state_with_layout(pruned_model, tmp_path, "early")
    # The later checkpoint sits in a Part 2 run folder, whose record the average carries forward.
    run = tmp_path / "run"
    later = randomize_batchnorm(interpolate_models(pruned_model, pruned_model, 1.0), seed=3)
    save_state_with_layout(later, run, "mobilenet")
    (run / "summary.json").write_text(json.dumps({"target_mflops": 150, "dense_mflops": 318.969098, "distill": True}))
    (run / "schedule.csv").write_text("step,mflops,params,val_pruned,val_finetuned\n1,149.9,1000,0.1,0.2\n"
                                      "recovery,149.9,1000,,0.3\n")
    args = ["--no-progress", "average", str(tmp_path / "early.pt"), str(run / "mobilenet.pt"), "--recipe", str(recipe),
            "--data", str(folder), "--device", "cpu", "--no-export"]

    # Each candidate is evaluated once and cached; a cached value is not evaluated again (resume),
    # and the best on validation is kept, its weights the interpolation at that fraction.
    from mobileprune.channel import average_key
    from mobileprune.data import load_cifar10

    key = average_key(pruned_model, later, load_cifar10(folder, val_size=10).val_labels)
    out = tmp_path / "a"
    out.mkdir()
    (out / "val.json").write_text(json.dumps({"key": key, "val": {"0.0": 0.1, "0.5": 0.9, "1.0": 0.2}}))
    assert main(args + ["--fractions", "0.5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fraction"] == 0.5 and summary["val_accuracy"] == 0.9
    assert summary["val_first"] == 0.1 and summary["val_second"] == 0.2 and summary["test_images"] == 6
    kept = load_model(out / "mobilenet.pt").state_dict()
    expected = interpolate_models(pruned_model, later, 0.5).state_dict()
    assert all(torch.equal(kept[k], expected[k]) for k in expected)
    assert "kept 0.5" in capsys.readouterr().out and (out / "average.png").is_file()
    # The run's record comes along: target, KD, and the schedule with an "average" row.
    assert summary["target_mflops"] == 150 and summary["distill"] is True
    assert (out / "schedule.csv").read_text().splitlines()[-1].startswith("average,")

    # A tie goes to the later checkpoint: averaging must beat the ends, not match them.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "val.json").write_text(json.dumps({"key": key, "val": {"0.0": 0.5, "0.5": 0.5, "1.0": 0.5}}))
    assert main(args + ["--fractions", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["fraction"] == 1.0

    # A cache made for other models (another key) is not trusted: every candidate is measured again.
    (tmp_path / "b" / "val.json").write_text(json.dumps({"key": "other", "val": {"0.0": 0.5, "0.5": 2.0, "1.0": 0.5}}))
    assert main(args + ["--fractions", "0.5", "--out", str(tmp_path / "b")]) == 0
    remeasured = json.loads((tmp_path / "b" / "summary.json").read_text())["val_by_fraction"]
    assert remeasured["0.5"] <= 1.0 and json.loads((tmp_path / "b" / "val.json").read_text())["key"] == key

    # With nothing cached every candidate is evaluated (ends included) and the report has its table.
    assert main(args + ["--out", str(tmp_path / "c")]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert set(summary["val_by_fraction"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert summary["val_accuracy"] == max(summary["val_by_fraction"].values())
    assert main(["report", str(tmp_path / "c")]) == 0
    text = (tmp_path / "c" / "REPORT.md").read_text()
    assert "## Part 2: weight averaging" in text and "## Part 2: channel pruning" in text

    # Bad input: a fraction outside (0, 1), or two models of different channels, is one line.
    with pytest.raises(SystemExit):
        main(args + ["--fractions", "1.5", "--out", str(tmp_path / "d")])
    assert "strictly between 0 and 1" in capsys.readouterr().err
    save_state_with_layout(build_mobilenet_v2(), tmp_path, "dense")
    assert main(args[:2] + [str(tmp_path / "dense.pt")] + args[3:] + ["--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "different channel layouts" in err and err.count("\n") == 1


def test_stage_folders_are_told_apart_by_their_summaries(tmp_path):
    from mobileprune.report import find_stages

    summaries = {"base": {"best_epoch": 3}, "fg": {"relative_size_after": 0.2, "best_epoch": 1},
                 "prune": {"target_mflops": 45}, "more": {"val_before": 0.8},
                 "prune-more": {"target_mflops": 45, "val_before": 0.8}, "avg": {"val_by_fraction": {}},
                 "prune-avg": {"target_mflops": 45, "val_by_fraction": {}}, "dist": {"students": {}},
                 "teach": {"tta_level": 2, "val_accuracy": 0.9}, "recal": {"val_by_resize": {}}, "other": {"note": 1}}
    for name, summary in summaries.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    stages = {kind: [p.name for p in paths] for kind, paths in find_stages(tmp_path).items()}
    assert stages == {"baseline": ["base"], "finegrained": ["fg"], "prune": ["prune", "prune-avg", "prune-more"],
                      "recover": ["more", "prune-more"], "average": ["avg", "prune-avg"], "recalibrate": ["recal"],
                      "distill": ["dist"],
                      "teacher": ["teach"], "grade": [], "grade.int8": []}


def test_progress_off_a_terminal_is_one_plain_line_per_epoch(tmp_path):
    """A log file or CI gets no progress-bar redraws, and one line per epoch."""
    import subprocess
    import sys

    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text("[data]\nval_size = 10\n\n[baseline]\n" +
                      toml_lines({**TINY, "epochs": 2}))
    done = subprocess.run([sys.executable, "-m", "mobileprune", "train", "--recipe", str(recipe), "--data",
                           str(folder), "--out", str(tmp_path / "base"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)  # pipes: not a terminal
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "\r" not in output and "it/s" not in output and "batch/s" not in output
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("baseline epoch ")] == ["baseline epoch 1/2",
                                                                                          "baseline epoch 2/2"]


@pytest.mark.slow
def test_the_demo_packages_grades_and_times_a_hand_in_then_prunes_once(tmp_path, pruned_model, pruned_pte):
    """What `make run` does, on tiny data: the hand-in zipped and graded, its .pte timed, one pruning step."""
    from mobileprune.models import build_mobilenet_v2, save_pickled_model, save_state_with_layout
    from mobileprune.pipeline import run_demo

    folder = make_cifar_dir(tmp_path / "d", per_batch=12, test=6)
    hand_in = tmp_path / "hand-in"
    save_pickled_model(pruned_model, hand_in / "mobilenet.pth")
    (hand_in / "mobilenet.pte").write_bytes(pruned_pte.read_bytes())
    save_state_with_layout(build_mobilenet_v2().eval(), tmp_path, "dense")
    # The dense program the hand-in is timed against, already there as a rerun finds it: any program
    # times (exporting a dense model costs ~10 s of the suite, and export is tested on its own).
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "dense.pte").write_bytes(pruned_pte.read_bytes())
    recipe = {"name": "tiny-demo", "data": {"val_size": 10},
              "demo": {"hand_in": str(hand_in), "baseline": str(tmp_path / "dense.pt"), "bench_repeats": 2},
              "prune": {"target_mflops": 150.0, "steps": 1, "export": False, "bn_recalibration_images": 10,
                        "finetune": {**TINY, "kd_alpha": 0.5}}}
    logs = []
    result = run_demo(recipe, folder, tmp_path / "demo", progress=False, log=logs.append)
    assert result["grade"]["pte_accuracy"] is not None and (tmp_path / "demo" / "demo.zip").is_file()
    assert "NOT THE LAB'S SCORE: graded on 6 test images" in "\n".join(logs)
    assert "speed-up" in (tmp_path / "demo" / "bench.txt").read_text()
    assert 149.5 <= result["demo"]["mflops"] <= 150.0 and (tmp_path / "demo" / "REPORT.md").is_file()
    assert any(line.startswith("hand-in zip: ") and "lab score" in line for line in logs)
    assert logs[-1].startswith("report: ")
