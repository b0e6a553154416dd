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
