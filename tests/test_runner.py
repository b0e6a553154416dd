"""The native xnn_executor_runner (built by `make runner`) against the Python evaluator."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mobileprune.data import read_cifar_bin
from mobileprune.evaluate import predict
from mobileprune.export import PteModel

from conftest import real_data_or_skip, write_cifar_bin

RUNNER = Path(__file__).resolve().parents[1] / "build" / "xnn_executor_runner"


@pytest.fixture(scope="module")
def runner():
    if not RUNNER.is_file():
        pytest.skip("runner not built: make runner")
    return RUNNER


def run(runner, *args, cwd=None):
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("variant", ["torchvision", "runner"])
def test_same_predictions_as_mobileprune_on_real_images(runner, pruned_pte, tmp_path, variant):
    folder = real_data_or_skip()
    out = run(runner, "--model_path", pruned_pte, "--data", folder / "test_batch.bin", "--limit", 500,
              "--resize", variant, "--predictions", tmp_path / "p.txt")
    assert out.returncode == 0, out.stderr
    ours = [int(line) for line in (tmp_path / "p.txt").read_text().split()]
    images, labels = read_cifar_bin(folder / "test_batch.bin")
    expected = predict(PteModel(pruned_pte), images[:500], variant, batch_size=100)
    assert ours == expected.tolist()
    accuracy = (expected == labels[:500]).float().mean().item()
    assert out.stdout.splitlines()[-1] == f"Accuracy: {accuracy:.4f}"
    assert "Done testing: 500/500" in out.stdout


def test_labs_interface_from_a_submission_folder(runner, pruned_pte, tmp_path):
    (tmp_path / "model").mkdir()
    shutil.copy(pruned_pte, tmp_path / "model" / "mobilenet.pte")
    write_cifar_bin(tmp_path / "data" / "test_batch.bin", 12)
    out = run(runner, "--model_path", "model/mobilenet.pte", "--bench", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("Accuracy: 0.")
    assert "Done testing: 12/12" in out.stdout and "Latency: median" in out.stdout


def test_clear_errors(runner, pruned_pte, tmp_path):
    write_cifar_bin(tmp_path / "t.bin", 3)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "t.bin").read_bytes()[:-5])
    out = run(runner, "--model_path", tmp_path / "missing.pte", "--data", tmp_path / "t.bin")
    assert out.returncode == 2 and "missing.pte: cannot open" in out.stderr
    out = run(runner, "--model_path", pruned_pte, "--data", tmp_path / "cut.bin")
    assert out.returncode == 2 and "not a positive multiple of 3073" in out.stderr
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    program = to_edge_transform_and_lower(torch.export.export(small, (torch.zeros(1, 3, 8, 8),)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    (tmp_path / "small.pte").write_bytes(program.buffer)
    out = run(runner, "--model_path", tmp_path / "small.pte", "--data", tmp_path / "t.bin")
    assert out.returncode == 2 and "input is not 1x3x224x224" in out.stderr


def test_bench_times_pte_through_the_runner(runner, pruned_pte, cifar_dir):
    from mobileprune.bench import bench

    results = bench([pruned_pte], threads=(1,), warmup=2, repeats=5, runner=runner, data=cifar_dir)
    assert [(r.kind, r.threads) for r in results] == [("pte", 1), ("native", 1)]
    assert all(0 < r.median_ms <= r.p90_ms for r in results)


def test_grade_runs_the_native_runner_beside_the_python_runtime(runner, pruned_model, pruned_pte, tmp_path):
    """`grade` with a runner: the lab's own command grades the .pte too, and agrees with the Python runtime."""
    from mobileprune.evaluate import format_grade, grade
    from mobileprune.models import save_pickled_model

    folder = real_data_or_skip()
    save_pickled_model(pruned_model, tmp_path / "mobilenet.pth")
    (tmp_path / "mobilenet.pte").write_bytes(pruned_pte.read_bytes())
    result = grade(tmp_path, data=folder, limit=200, runner=runner, progress=False)
    assert result.runner_accuracy == pytest.approx(result.pte_accuracy["torchvision"], abs=1e-4)
    assert "the lab's command" in format_grade(result) and not any("native runner printed" in n for n in result.notes)


BENCH = Path(__file__).resolve().parents[1] / "runner" / "bench.sh"


def bench_script(*args, **env):
    import os
    return subprocess.run(["bash", str(BENCH), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **{key: str(value) for key, value in env.items()}})


def test_bench_script_times_programs_side_by_side_through_the_runner(runner, pruned_pte, tmp_path):
    # runner/bench.sh is what a Raspberry Pi runs (runner/aarch64.sh kit); here it drives the x86-64 build.
    write_cifar_bin(tmp_path / "test_batch.bin", 12)
    for name in ("a.pte", "b.pte"):
        shutil.copy(pruned_pte, tmp_path / name)
    out = bench_script("--threads", "1 2", "--runs", 2, "--rounds", 2, "--accuracy", tmp_path / "a.pte",
                       tmp_path / "b.pte", RUNNER=runner, DATA=tmp_path / "test_batch.bin")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("# ") and "cores" in lines[0] and lines[1].startswith("# bench.sh --threads \"1 2\"")
    rows = [line.split() for line in lines[3:7]]
    assert [(Path(row[0]).name, row[1]) for row in rows] == [("a.pte", "1"), ("a.pte", "2"), ("b.pte", "1"),
                                                             ("b.pte", "2")]
    assert all(float(row[2]) > 0 for row in rows) and rows[0][4] == rows[1][4] == "1.00x"
    accuracy = run(runner, "--model_path", tmp_path / "a.pte", "--data", tmp_path / "test_batch.bin").stdout
    assert lines[7:] == [f"{tmp_path / name}: {accuracy.splitlines()[-1]}" for name in ("a.pte", "b.pte")]


@pytest.mark.parametrize("args, message", [
    ([], "no programs given"),
    (["--runs", "0", "{pte}"], "--runs 0: a whole number from 1"),
    (["--runs", "2", "--rounds", "3", "{pte}"], "--rounds 3 is more than --runs 2"),
    (["--threads", "one", "{pte}"], "--threads one: a whole number from 1"),
    (["--fast", "{pte}"], "unknown option --fast"),
    (["{tmp}/missing.pte"], "missing.pte: no such file"),
    (["{tmp}/test_batch.bin"], "the runner failed"),
    (["--runs", "1", "{pte}"], "the runner timed nothing"),  # 5 images: fewer than the 10 of warm-up
])
def test_bench_script_bad_input_is_one_line(runner, pruned_pte, tmp_path, args, message):
    write_cifar_bin(tmp_path / "test_batch.bin", 5)
    args = [arg.format(pte=pruned_pte, tmp=tmp_path) for arg in args]
    out = bench_script(*args, RUNNER=runner, DATA=tmp_path / "test_batch.bin")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("bench.sh: error: ") and message in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_pi_kit_holds_the_aarch64_runner_its_libraries_the_test_file_and_the_programs(pruned_pte, tmp_path):
    import os
    import tarfile

    write_cifar_bin(tmp_path / "data" / "test_batch.bin", 3)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", "runner/aarch64.sh", "kit", str(pruned_pte)], cwd=root, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "DATA_DIR": str(tmp_path / "data"),
                                                      "KIT_DIR": str(tmp_path / "pi-kit"),
                                                      "PY": str(Path(os.sys.executable))})
    assert out.returncode == 0, out.stderr
    with tarfile.open(tmp_path / "pi-kit.tar.gz") as tar:
        names = set(tar.getnames())
        runner_binary = tar.extractfile("pi-kit/xnn_executor_runner").read()
    programs = [name for name in names if name.startswith("pi-kit/models/")]
    assert programs == [f"pi-kit/models/1-{pruned_pte.parent.name}.{pruned_pte.name}"]
    assert {"pi-kit/bench.sh", "pi-kit/data/test_batch.bin", "pi-kit/lib/libexecutorch.so",
            "pi-kit/lib/libexecutorch_backend_xnnpack.so"} <= names
    assert runner_binary[:4] == b"\x7fELF" and runner_binary[18] == 0xB7  # e_machine: AArch64
    missing = subprocess.run(["bash", "runner/aarch64.sh", "kit", str(tmp_path / "none.pte")], cwd=root,
                             capture_output=True, text=True, env={**os.environ, "DATA_DIR": str(tmp_path / "data")})
    assert missing.returncode == 2 and "none.pte: no such file" in missing.stderr


def test_bench_script_help_is_its_header():
    out = bench_script("--help")
    assert out.returncode == 0 and out.stdout.startswith("Time .pte programs through the lab's native runner")
    assert out.stdout.rstrip().endswith("as `runner/aarch64.sh kit` lays them out).") and "set -e" not in out.stdout
