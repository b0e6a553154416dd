"""ExecuTorch export: ``torch.export`` -> XNNPACK lowering -> ``.pte``, checked against eager.

The ``.pte`` takes one 1x3x224x224 float image, as the lab's ``xnn_executor_runner`` feeds it.
A program from elsewhere is checked before the runtime sees it (``check_pte_file``) and, where a
command depends on it, first loaded in a child process (``probe_pte``): a damaged program can
abort the runtime natively, which no ``except`` catches.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from .data import INPUT_SIZE
from .errors import VERBOSE_ENV, MobilepruneError, first_line, quiet_libraries

# A float32 graph run by XNNPACK sums in another order than ATen does; anything above this,
# relative to the largest logit, is a real export bug, not rounding.
RELATIVE_TOLERANCE = 1e-3


# What ExecuTorch's C++ runtime and torch's pytree module write to stderr on every load: not ours.
RUNTIME_NOISE = re.compile(r"^\s*(\[cpuinfo_utils\.cpp|\[threadpool\.cpp|W\d{4} .*_pytree\.py)")
@contextlib.contextmanager
def runtime_stderr_filtered():
    """Run the block with the process's stderr (fd 2, where C++ writes) caught; pass on all but RUNTIME_NOISE."""
    if os.environ.get(VERBOSE_ENV):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines()
                    if line.strip() and not RUNTIME_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


# An ExecuTorch program is a flatbuffer: 4 bytes of root offset, then its file identifier; since
# executorch 0.2 an extended header ("eh00") follows with the sizes of the program and its data.
PTE_IDENTIFIER = re.compile(rb"ET\d\d")


def check_pte_file(path: str | Path) -> Path:
    """Refuse what is not a whole ExecuTorch program, by its header and size, before the runtime sees it."""
    path = Path(path)
    if not path.is_file():
        raise MobilepruneError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(40)
    if size < 16 or not PTE_IDENTIFIER.fullmatch(head[4:8]):
        raise MobilepruneError(f"{path}: not an ExecuTorch program (no ETnn identifier at byte 4; {size:,} bytes)")
    if head[8:12] == b"eh00" and len(head) >= 24:
        length = int.from_bytes(head[12:16], "little")
        program = int.from_bytes(head[16:24], "little")
        segments = int.from_bytes(head[24:32], "little") if length >= 24 else 0
        segment_data = int.from_bytes(head[32:40], "little") if length >= 32 and len(head) >= 40 else 0
        needed = max(program, segments + segment_data)
        if size < needed:
            raise MobilepruneError(f"{path}: a truncated ExecuTorch program ({size:,} bytes of the {needed:,} its "
                                   "header gives)")
    return path


_PROBE = """
import sys
import torch
from mobileprune.errors import quiet_libraries
quiet_libraries()
from executorch.runtime import Runtime
method = Runtime.get().load_program(sys.argv[1]).load_method("forward")
shape = tuple(method.metadata.input_tensor_meta(0).sizes())
method.execute([torch.zeros(shape)])
"""


def probe_pte(path: str | Path, timeout: float = 300) -> Path:
    """Load ``path`` and run it once in a child process: a program that aborts the runtime ends the
    child, not the command, and is named here in one line."""
    path = check_pte_file(path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise MobilepruneError(f"{path}: the ExecuTorch runtime did not load it in {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip() and not RUNTIME_NOISE.match(line)]
        how = f"signal {-done.returncode}" if done.returncode < 0 else (lines[-1] if lines else "no message")
        raise MobilepruneError(f"{path}: not a loadable ExecuTorch program (the runtime failed on it: "
                               f"{how[:200]})")
    return path


def export_pte(model: nn.Module, path: str | Path, check: bool = True, check_samples: int = 3) -> Path:
    """Write ``model`` as an XNNPACK-delegated ``.pte``; with ``check``, compare it with eager."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    quiet_libraries()
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
    """A ``.pte`` loaded in the ExecuTorch runtime, called like a model on a batch.

    ``isolate``: first load and run it in a child process (``probe_pte``), for a program from
    elsewhere that might abort the runtime; its header is checked in any case.
    """

    def __init__(self, path: str | Path, isolate: bool = False):
        from executorch.runtime import Runtime

        quiet_libraries()
        self.path = probe_pte(path) if isolate else check_pte_file(path)
        try:
            with runtime_stderr_filtered():
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

    with runtime_stderr_filtered():
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
