"""Shared fixtures: tiny CIFAR-format files made here, and a small channel-pruned MobileNetV2."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mobileprune.data import RECORD_BYTES
from mobileprune.models import build_mobilenet_v2

warnings.filterwarnings("ignore")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, and the same for every process a
    # test starts (CLI subprocesses, grading workers). Two 2-thread torch processes on two cores do
    # not share, they stall: OpenMP threads spin at barriers waiting for a descheduled sibling
    # (a 9-s pruning took 121 s beside a training run, 2026-12-06).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-batches-bin"


def write_cifar_bin(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random records in the official binary layout; returns (images (n,3,32,32), labels).

    Each image is noise around a brightness set by its label, so a tiny run can learn it.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    noise = rng.integers(-40, 41, (n, 3, 32, 32))
    images = np.clip(labels[:, None, None, None].astype(int) * 22 + 20 + noise, 0, 255).astype(np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    assert records.shape[1] == RECORD_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    records.tofile(path)
    return images, labels.astype(np.int64)


def make_cifar_dir(root: Path, per_batch: int = 40, test: int = 40) -> Path:
    """A cifar-10-batches-bin folder with five tiny training batches and a tiny test batch."""
    folder = root / "cifar-10-batches-bin"
    for i in range(1, 6):
        write_cifar_bin(folder / f"data_batch_{i}.bin", per_batch, seed=i)
    write_cifar_bin(folder / "test_batch.bin", test, seed=99)
    return folder


@pytest.fixture
def cifar_dir(tmp_path) -> Path:
    return make_cifar_dir(tmp_path)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial statistics so outputs are far from zero (a fresh net's are ~1e-9)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    torch.nn.init.normal_(model.classifier[-1].weight, std=0.5, generator=g)
    return model.eval()


def tp_pruned_model(ratio: float = 0.6, seed: int = 0) -> torch.nn.Module:
    """A MobileNetV2 channel-pruned by Torch-Pruning directly (independent of mobileprune.channel)."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = build_mobilenet_v2()
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, 3, 224, 224),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[model.classifier[1]])
    pruner.step()
    return randomize_batchnorm(model, seed)


@pytest.fixture(scope="session")
def pruned_model() -> torch.nn.Module:
    return tp_pruned_model()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills once for the whole run: the first xdist worker to ask
    builds it, a second waits for it and shares it. Exports are most of the suite's set-up (the
    int8 hand-in took a minute on each of the two workers); what they build is deterministic."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def pruned_pte(pruned_model, tmp_path_factory) -> Path:
    """``pruned_model`` (the same on every worker: seeded) as an XNNPACK program, exported once."""
    from mobileprune.export import export_pte

    return built_once(tmp_path_factory, "pte", lambda folder: export_pte(pruned_model, folder / "mobilenet.pte")) \
        / "mobilenet.pte"


def real_data_or_skip() -> Path:
    folder = Path(os.environ.get("MOBILEPRUNE_DATA", REAL_DATA))
    if not (folder / "test_batch.bin").is_file():
        pytest.skip(f"real CIFAR-10 not found at {folder} (set MOBILEPRUNE_DATA)")
    return folder


def pytest_collection_modifyitems(items):
    """The tests marked slow first (in their files' order), then the rest: two workers (`make test`)
    then finish together instead of one running a minute-long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
