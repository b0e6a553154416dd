"""Bad input never crashes: every case ends in one `mobileprune: error:` line, exit 2, nothing half-written.

A battery of wrong paths, files, models, flags and devices, run as a user would type them; damaged
ExecuTorch programs (which can abort the runtime natively); errors that name what was asked; and
grades on anything but the official test set saying so beside the score.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_cifar_dir, write_cifar_bin
from mobileprune.cli import main
from mobileprune.models import build_mobilenet_v2, save_pickled_model, save_state_with_layout

ROOT = Path(__file__).resolve().parents[1]
HAND_IN = ROOT / "release" / "prune"


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and a single `mobileprune: error:` line; return it."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"{argv}: exit {code}, stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobileprune: error: "), f"{argv}: {err!r}"
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of bad (and a few good) inputs that the battery points at."""
    root = tmp_path_factory.mktemp("inputs")
    data = make_cifar_dir(root / "d", per_batch=20, test=20)
    torch.manual_seed(0)
    save_pickled_model(build_mobilenet_v2().eval(), root / "dense.pth")
    save_state_with_layout(build_mobilenet_v2(), root, "dense")
    torch.save(build_mobilenet_v2().state_dict(), root / "state.pth")
    torch.save(torch.nn.Linear(3, 10), root / "linear.pth")
    (root / "junk.pth").write_bytes(b"not a model")
    (root / "junk.pte").write_bytes(bytes(range(256)) * 8)
    (root / "empty").mkdir()
    (root / "text.toml").write_text("[prune\n")
    (root / "cut").mkdir()
    (root / "cut" / "test_batch.bin").write_bytes((data / "test_batch.bin").read_bytes()[:5000])
    return root, data


BATTERY = [
    # paths that are not there
    (["evaluate", "{root}/nosuch.pth"], "nosuch.pth: no such file"),
    (["grade", "{root}/nosuch"], "nosuch: no such file or folder"),
    (["grade", "{root}/empty"], "holds no mobilenet.pth"),
    (["export", "{root}/nosuch.pt", "--out", "{tmp}/x"], "nosuch.pt: no such file"),
    (["report", "{root}/nosuch"], "nosuch: no such folder"),
    (["unpack", "{root}/empty", "--out", "{tmp}/x", "--data", "{data}"], "no pack.json"),
    (["distill", "--students", "{root}/nosuch", "--data", "{data}"], "no such folder of students"),
    (["evaluate", "{root}/dense.pth", "--data", "{root}/nosuch"], "does not exist"),
    # files that are not what they claim
    (["evaluate", "{root}/junk.pth", "--data", "{data}"], "not a torch.save file"),
    (["evaluate", "{root}/junk.pte", "--data", "{data}"], "not an ExecuTorch program"),
    (["evaluate", "{root}/linear.pth", "--data", "{data}"], "not a torchvision MobileNetV2"),
    (["evaluate", "{root}/state.pth", "--data", "{data}"], "mobileprune export MODEL.pt --out DIR"),
    (["evaluate", "{root}/dense.pth", "--data", "{root}/cut"], "test_batch.bin: size 5000 bytes is not a positive multiple of 3073"),
    (["prune", "--recipe", "{root}/text.toml", "--baseline", "{root}/dense.pth"], "not valid TOML"),
    (["run", "--recipe", "nosuch"], "recipe 'nosuch' not found"),
    # flags out of range
    (["prune", "--target-mflops", "-5"], "--target-mflops: expected a positive number (got '-5')"),
    (["prune", "--target-mflops", "abc"], "--target-mflops: expected a positive number"),
    (["finegrained", "--target-size", "25"], "--target-size: expected a fraction strictly between 0 and 1"),
    (["evaluate", "{root}/dense.pth", "--limit", "0"], "--limit: expected a positive integer"),
    (["evaluate", "{root}/dense.pth", "--val-size", "-1"], "--val-size: expected a whole number, 0 or more"),
    (["recover", "{root}/dense.pt", "--skip-images", "-3"], "--skip-images: expected a whole number"),
    (["recover", "{root}/dense.pt", "--lr", "0"], "--lr: expected a positive number"),
    (["bench", "x.pte", "--threads", "0"], "thread counts must be >= 1"),
    (["bench", "x.pte", "--repeats", "-1"], "--repeats: expected a positive integer"),
    (["distill", "--budget-s", "0"], "--budget-s: expected a positive number"),
    (["students", "--targets", "20", "-1"], "--targets: expected a positive number"),
    (["average", "a.pt", "b.pt", "--fractions", "1.5"], "strictly between 0 and 1"),
    (["grade", "{root}/dense.pth", "--variant", "bicubic"], "invalid choice: 'bicubic'"),
    (["nosuch-command"], "invalid choice: 'nosuch-command'"),
    # devices that are not there
    (["grade", "{root}/dense.pth", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["train", "--device", "cuda:x"], "--device: expected cpu, cuda or cuda:N"),
]
if not torch.cuda.is_available():
    BATTERY += [(["grade", "{root}/dense.pth", "--device", "cuda"], "cuda: this machine has no CUDA GPU"),
                (["prune", "--device", "cuda"], "this machine has no CUDA GPU")]


@pytest.mark.parametrize("argv, message", BATTERY, ids=[" ".join(a)[:60] for a, _ in BATTERY])
def test_bad_input_ends_in_one_line_and_writes_nothing(argv, message, inputs, tmp_path, capsys, monkeypatch):
    root, data = inputs
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would appear here
    before = files_under(root)
    argv = [a.format(root=root, data=data, tmp=tmp_path) for a in argv]
    line = one_error_line(capsys, ["--no-progress", *argv])
    assert message in line, line
    assert files_under(root) == before and not list(tmp_path.iterdir()), "something was written"


def test_prune_to_more_than_the_baseline_names_the_target_and_leaves_no_folder(inputs, tmp_path, capsys):
    root, data = inputs
    line = one_error_line(capsys, ["--no-progress", "prune", "--baseline", str(root / "dense.pth"), "--recipe", "quick",
                                   "--target-mflops", "400", "--out", str(tmp_path / "p"), "--data", str(data)])
    assert "target 400 MFLOPs is not below the baseline's 318.97 MFLOPs" in line
    assert not (tmp_path / "p").exists()


def _damaged_programs(good: bytes, seed: int = 0) -> dict[str, bytes]:
    """Random bytes, truncations, and a whole header over damaged data (which aborts the runtime natively)."""
    rng = random.Random(seed)
    cases = {f"random-{i}": bytes(rng.randrange(256) for _ in range(rng.choice((10, 3000, 40000))))
             for i in range(6)}
    cases.update({f"cut-{n}": good[:n] for n in (0, 7, 16, 40, 1000, len(good) // 2, len(good) - 1)})
    fake = bytearray(rng.randrange(256) for _ in range(5000))
    fake[4:8] = b"ET12"
    cases["identifier-only"] = bytes(fake)
    damaged = bytearray(good)
    data_start = int.from_bytes(good[24:32], "little")  # the segment data, after the program
    damaged[data_start:data_start + 5000] = bytes(rng.randrange(256) for _ in range(5000))
    cases["damaged-data"] = bytes(damaged)
    return cases


@pytest.mark.slow
def test_damaged_programs_never_take_the_command_down(pruned_pte, tmp_path, capsys):
    data = make_cifar_dir(tmp_path / "d", per_batch=4, test=10)
    for name, blob in _damaged_programs(pruned_pte.read_bytes()).items():
        path = tmp_path / f"{name}.pte"
        path.write_bytes(blob)
        if name == "damaged-data":  # aborted the runtime in this process before: run it as a user would
            done = subprocess.run([sys.executable, "-m", "mobileprune", "--no-progress", "evaluate", str(path),
                                   "--data", str(data)], capture_output=True, text=True, cwd=tmp_path)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1, done.stderr
            assert "not a loadable ExecuTorch program" in lines[0]
            # grade measures a .pte in a worker process: the worker dies, the command says so in one line
            save_pickled_model(build_mobilenet_v2().eval(), tmp_path / "sub" / "mobilenet.pth")
            (tmp_path / "sub" / "mobilenet.pte").write_bytes(blob)
            line = one_error_line(capsys, ["--no-progress", "grade", str(tmp_path / "sub"), "--data", str(data),
                                           "--no-runner"])
            assert "not a loadable ExecuTorch program" in line
        else:
            line = one_error_line(capsys, ["--no-progress", "evaluate", str(path), "--data", str(data)])
            assert "ExecuTorch program" in line or "truncated" in line, (name, line)


def test_a_short_test_file_is_graded_but_said_not_to_be_the_lab_s(pruned_model, tmp_path):
    from mobileprune.evaluate import format_grade, grade, not_the_lab_test_set

    save_pickled_model(pruned_model, tmp_path / "sub" / "model" / "mobilenet.pth")
    write_cifar_bin(tmp_path / "sub" / "data" / "test_batch.bin", 40)
    result = grade(tmp_path / "sub", progress=False, variants=("torchvision",))
    assert result.images == 40 and "40 test images, not the official 10,000" in result.not_lab_grade
    assert "NOT THE LAB'S SCORE: graded on 40 test images" in format_grade(result)
    limited = grade(tmp_path / "sub", progress=False, variants=("torchvision",), limit=10)
    assert "first 10 test images (--limit)" in limited.not_lab_grade
    # 10,000 records that are not the official ones are named too (an order-free digest of them).
    images = torch.zeros(10_000, 3, 32, 32, dtype=torch.uint8)
    assert "not the official CIFAR-10 test set" in not_the_lab_test_set(images, torch.zeros(10_000, dtype=torch.long),
                                                                         None)


def test_the_official_test_set_is_recognised_in_any_order():
    from conftest import real_data_or_skip
    from mobileprune.data import read_cifar_bin
    from mobileprune.evaluate import not_the_lab_test_set

    images, labels = read_cifar_bin(real_data_or_skip() / "test_batch.bin")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    assert not_the_lab_test_set(images[order], labels[order], None) is None
    assert not_the_lab_test_set(images, labels, 10_000) is None  # --limit 10000 is the whole set


@pytest.mark.slow
def test_the_released_hand_in_folder_grades_as_it_is(tmp_path, capsys):
    """README calls release/prune the hand-in: grade it as it stands, as a .pth + .pte pair, and zipped."""
    import zipfile

    from conftest import real_data_or_skip

    data = real_data_or_skip()
    for argv in ([str(HAND_IN)], [str(HAND_IN / "mobilenet.pth"), str(HAND_IN / "mobilenet.pte")]):
        assert main(["--no-progress", "grade", *argv, "--limit", "200", "--variant", "runner", "--data", str(data),
                     "--json"]) == 0
        graded = json.loads(capsys.readouterr().out)
        assert graded["mflops"] == pytest.approx(44.842538, abs=1e-6) and graded["pte_accuracy"]["runner"] > 0.8
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as z:
        for name in ("mobilenet.pth", "mobilenet.pte"):
            z.write(HAND_IN / name, name)
    assert main(["--no-progress", "grade", str(tmp_path / "flat.zip"), "--limit", "50", "--variant", "runner",
                 "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pte_accuracy"] is not None


def test_every_argument_of_grade_and_of_the_distillation_commands_has_a_description(capsys):
    import argparse

    from mobileprune.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("grade", "evaluate", "export", "bench", "students", "teacher", "distill", "pack", "unpack"):
        bare = [a.dest for a in commands[name]._actions if not a.help and a.dest != "help"]
        assert not bare, f"mobileprune {name}: no description for {bare}"
    with pytest.raises(SystemExit):
        main(["grade", "--help"])
    assert "a .pth followed by the .pte to grade with it" in " ".join(capsys.readouterr().out.split())


def test_a_resumed_training_says_where_it_resumes(tmp_path, capsys):
    from mobileprune.data import load_cifar10
    from mobileprune.train import TrainConfig, train

    data = load_cifar10(make_cifar_dir(tmp_path / "d", per_batch=8, test=4), val_size=10)
    config = TrainConfig(epochs=2, batch_size=10, lr=0.01, warmup_epochs=0, resolutions=[32], eval_resolution=32,
                         bf16=False)
    train(build_mobilenet_v2(), data, TrainConfig(**{**config.__dict__, "epochs": 1}), tmp_path / "t", progress=False)
    capsys.readouterr()
    train(build_mobilenet_v2(), data, config, tmp_path / "t", resume=True, progress=False)
    assert f"train: resuming {tmp_path / 't' / 'last.pt'} after epoch 1 of 2" in capsys.readouterr().out


@pytest.mark.slow
def test_runtime_chatter_stays_out_of_a_command_s_output(pruned_pte, tmp_path):
    data = make_cifar_dir(tmp_path / "d", per_batch=4, test=10)
    env = {k: v for k, v in os.environ.items() if k != "MOBILEPRUNE_VERBOSE"}
    for argv in (["evaluate", str(pruned_pte), "--data", str(data)],
                 ["bench", str(pruned_pte), "--threads", "1", "--warmup", "1", "--repeats", "2"]):
        quiet = subprocess.run([sys.executable, "-m", "mobileprune", *argv], capture_output=True, text=True, env=env)
        assert quiet.returncode == 0, quiet.stderr
        for noise in ("cpuinfo_utils.cpp", "threadpool.cpp", "_pytree.py"):
            assert noise not in quiet.stderr + quiet.stdout, (argv, quiet.stderr)
    verbose = subprocess.run([sys.executable, "-m", "mobileprune", "--verbose", "evaluate", str(pruned_pte), "--data",
                              str(data)], capture_output=True, text=True, env=env)
    assert verbose.returncode == 0 and "cpuinfo_utils.cpp" in verbose.stderr
