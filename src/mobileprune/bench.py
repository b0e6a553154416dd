"""Per-image latency of .pte files (ExecuTorch/XNNPACK) and eager models, side by side.

Median of repeated single-image runs after a warm-up, at each thread count; the first model is the
reference for the speed-up column.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import statistics
import time
from dataclasses import dataclass
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from .data import INPUT_SIZE
from .errors import MobilepruneError


@dataclass
class Latency:
    model: str
    kind: str
    threads: int
    median_ms: float
    p90_ms: float


def _time(call, warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def _bench_one(path: str, threads: int, warmup: int, repeats: int, trust_pickle: bool) -> Latency:
    from .errors import quiet_libraries

    quiet_libraries()  # a fresh process starts with Python's default warning filters
    from .export import PteModel, set_runtime_threads
    from .models import load_model

    image = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    if path.endswith(".pte"):
        set_runtime_threads(threads)  # before anything has run on the pool: resizing a used one can abort
        pte = PteModel(path)
        return Latency(path, "pte", threads, *_time(lambda: pte.method.execute([image]), warmup, repeats))
    torch.set_num_threads(threads)
    model = load_model(path, trust_pickle).eval()
    with torch.no_grad():
        return Latency(path, "eager", threads, *_time(lambda: model(image), warmup, repeats))


def _bench_runner(runner: Path, path: str, threads: int, warmup: int, repeats: int, data: Path) -> Latency:
    """Latency through the native runner (``--bench``: it times each image after 10 warm-up runs)."""
    command = [str(runner), "--model_path", path, "--data", str(data), "--limit", str(10 + repeats), "--bench",
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"Latency: median ([0-9.]+) ms, p90 ([0-9.]+) ms", done.stdout)
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MobilepruneError(f"{runner}: failed on {path} ({last})")
    return Latency(path, "native", threads, float(found[1]), float(found[2]))


def bench(paths: list[str | Path], threads: tuple[int, ...] | None = None, warmup: int = 10, repeats: int = 50,
          trust_pickle: bool = False, runner: str | Path | None = None, data: str | Path | None = None
          ) -> list[Latency]:
    """Latency of each model file (``.pte`` through ExecuTorch, anything else eager) at each thread count.

    Each (file, thread count) is measured in a fresh process: ExecuTorch's XNNPACK thread pool
    aborts or deadlocks when resized after use or when torch's OpenMP pool ran before it in the
    same process, and a fresh process is also the fair comparison (no caches warmed by another model).
    With ``runner`` (``build/xnn_executor_runner``), each ``.pte`` is also timed by the native
    runner on real test images from ``data``: the C++ path a Raspberry Pi would run.
    """
    threads = threads or tuple(sorted({1, os.cpu_count() or 1}))
    if runner is not None:
        from .data import TEST_BIN, find_data_dir

        if not Path(runner).is_file():
            raise MobilepruneError(f"{runner}: no runner there (build it: make runner)")
        test_file = find_data_dir(data) / TEST_BIN
    for path in map(Path, paths):
        if not path.is_file():
            raise MobilepruneError(f"{path}: no such file")
    results = []
    context = multiprocessing.get_context("spawn")
    for path in paths:
        for n in threads:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                try:
                    results.append(pool.submit(_bench_one, str(path), n, warmup, repeats, trust_pickle).result())
                except BrokenProcessPool:
                    raise MobilepruneError(f"{path}: the benchmark process died ({n} threads)") from None
            if runner is not None and str(path).endswith(".pte"):
                results.append(_bench_runner(Path(runner), str(path), n, warmup, repeats, test_file))
    return results


def format_bench(results: list[Latency]) -> str:
    reference = {r.threads: r.median_ms for r in results if (r.model, r.kind) == (results[0].model, results[0].kind)}
    lines = [f"{'model':<48} {'kind':<6} {'threads':>7} {'median ms':>10} {'p90 ms':>8} {'speed-up':>8}"]
    for r in results:
        speedup = reference.get(r.threads, r.median_ms) / r.median_ms
        lines.append(f"{r.model[-48:]:<48} {r.kind:<6} {r.threads:>7} {r.median_ms:>10.3f} {r.p90_ms:>8.3f} "
                     f"{speedup:>7.2f}x")
    return "\n".join(lines)
