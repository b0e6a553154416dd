"""ExecuTorch export: ``torch.export`` -> XNNPACK lowering -> ``.pte``, checked against eager.

The ``.pte`` takes one 1x3x224x224 float image, as the lab's ``xnn_executor_runner`` feeds it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .data import INPUT_SIZE
from .errors import MobilepruneError, first_line

# A float32 graph run by XNNPACK sums in another order than ATen does; anything above this,
# relative to the largest logit, is a real export bug, not rounding.
RELATIVE_TOLERANCE = 1e-3


def _quiet_runtime_logs() -> None:
    # ExecuTorch's C++ runtime writes cpuinfo chatter to stderr; it is noise for our users.
    os.environ.setdefault("ET_LOG_LEVEL", "Error")
    logging.getLogger("torch._export").setLevel(logging.ERROR)


def export_pte(model: nn.Module, path: str | Path, check: bool = True, check_samples: int = 3) -> Path:
    """Write ``model`` as an XNNPACK-delegated ``.pte``; with ``check``, compare it with eager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    _quiet_runtime_logs()
    model = model.cpu().eval()
    example = (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),)
    with torch.no_grad():
        exported = torch.export.export(model, example)
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    if check:
        check_pte_matches(model, path, samples=check_samples)
    return path


class PteModel:
    """A ``.pte`` loaded in the ExecuTorch runtime, called like a model on a batch."""

    def __init__(self, path: str | Path):
        from executorch.runtime import Runtime

        _quiet_runtime_logs()
        self.path = Path(path)
        if not self.path.is_file():
            raise MobilepruneError(f"{self.path}: no such file")
        try:
            program = Runtime.get().load_program(self.path)
            self.method = program.load_method("forward")
        except Exception as e:
            raise MobilepruneError(f"{self.path}: not a loadable ExecuTorch program ({first_line(e)})") from None
        shape = tuple(self.method.metadata.input_tensor_meta(0).sizes())
        if shape != (1, 3, INPUT_SIZE, INPUT_SIZE):
            raise MobilepruneError(f"{self.path}: input is {shape}, the lab's runner feeds (1, 3, 224, 224)")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a (B,3,224,224) float batch, one image at a time as the runner does."""
        return torch.cat([self.method.execute([img[None].contiguous()])[0] for img in images.float().cpu()])


def set_runtime_threads(threads: int) -> None:
    """Size ExecuTorch's XNNPACK thread pool (the process-wide one)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


def check_pte_matches(model: nn.Module, pte_path: str | Path, samples: int = 3, seed: int = 0) -> float:
    """Largest |pte - eager| relative to the largest |eager| logit on random inputs; raise if too big."""
    pte = PteModel(pte_path)
    inputs = torch.randn(samples, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = model.cpu().eval()(inputs)
    got = pte(inputs)
    error = ((got - eager).abs().max() / eager.abs().max().clamp(min=1e-12)).item()
    if error > RELATIVE_TOLERANCE:
        raise MobilepruneError(f"{pte_path}: ExecuTorch output differs from eager by {error:.2e} of the largest "
                               f"logit (tolerance {RELATIVE_TOLERANCE:.0e})")
    return error
