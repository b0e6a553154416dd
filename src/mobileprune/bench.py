"""Per-image latency of .pte files (ExecuTorch/XNNPACK) and eager models, side by side.

Median of repeated single-image runs after a warm-up, at each thread count, the models timed in
interleaved rounds; the first model is the reference for the speed-up column.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import statistics
import time
from dataclasses import dataclass
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


def _timed_runs(call, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _bench_worker(connection, path: str, threads: int, trust_pickle: bool) -> None:
    """One model in its own process: load it, then time a block of runs each time it is asked."""
    from .errors import quiet_libraries

    quiet_libraries()  # a fresh process starts with Python's default warning filters
    from .export import PteModel, set_runtime_threads
    from .models import load_model

    image = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    if path.endswith(".pte"):
        set_runtime_threads(threads)  # before anything has run on the pool: resizing a used one can abort
        pte = PteModel(path)
        call = lambda: pte.method.execute([image])  # noqa: E731
    else:
        torch.set_num_threads(threads)
        model = load_model(path, trust_pickle).eval()

        def call():
            with torch.no_grad():
                model(image)
    connection.send("ready")
    while (block := connection.recv()) is not None:
        connection.send(_timed_runs(call, *block))


class _Worker:
    """A spawned ``_bench_worker`` and its end of the pipe; a worker that dies is named in one line."""

    def __init__(self, context, path: str, threads: int, trust_pickle: bool):
        self.path, self.threads = path, threads
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_bench_worker, args=(child_end, path, threads, trust_pickle),
                                       daemon=True)
        self.process.start()
        child_end.close()

    def reply(self, request=None):
        """Send ``request`` (none: just wait for the worker's next word) and return its answer."""
        try:
            if request is not None:
                self.connection.send(request)
            return self.connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise MobilepruneError(f"{self.path}: the benchmark process died ({self.threads} threads)") from None

    def close(self) -> None:
        try:
            self.connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def turns(models: int, warmup: int, repeats: int, rounds: int) -> list[tuple[int, int, int]]:
    """The order of the timing: (model, untimed runs, timed runs) blocks, ``rounds`` rounds in which
    every model takes one turn, the order rotated by one each round; ``repeats`` timed runs a model
    in all, the warm-up before its first block (one untimed run before the others: the caches)."""
    per_round = [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]
    order = []
    for round_index, count in enumerate(per_round):
        for offset in range(models):
            order.append(((round_index + offset) % models, warmup if round_index == 0 else 1, count))
    return order


def _interleaved(paths: list[str], threads: int, warmup: int, repeats: int, rounds: int,
                 trust_pickle: bool) -> list[Latency]:
    """Every model in its own process, timed in turns: ``rounds`` blocks of runs each, the order of
    the models rotated every round, so that a noisy spell of the machine hits all of them alike."""
    context = multiprocessing.get_context("spawn")
    workers = [_Worker(context, path, threads, trust_pickle) for path in paths]
    try:
        for worker in workers:
            worker.reply()  # "ready": loaded, and its thread pool sized
        times = [[] for _ in workers]
        for index, warmup_runs, count in turns(len(workers), warmup, repeats, rounds):
            times[index] += workers[index].reply((warmup_runs, count))
    finally:
        for worker in workers:
            worker.close()
    results = []
    for path, found in zip(paths, map(sorted, times)):
        kind = "pte" if path.endswith(".pte") else "eager"
        results.append(Latency(path, kind, threads, statistics.median(found),
                               found[min(len(found) - 1, int(0.9 * len(found)))]))
    return results


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
          trust_pickle: bool = False, runner: str | Path | None = None, data: str | Path | None = None,
          rounds: int | None = None) -> list[Latency]:
    """Latency of each model file (``.pte`` through ExecuTorch, anything else eager) at each thread count.

    At each thread count every file runs in a fresh process of its own: ExecuTorch's XNNPACK thread
    pool aborts or deadlocks when resized after use or when torch's OpenMP pool ran before it in the
    same process, so each pool is sized before its first use. The processes are timed in turns,
    ``rounds`` blocks of ``repeats / rounds`` runs each (five, or one per run when there are fewer;
    one process at a time, the order rotated every round), so that machine noise hits every model
    alike; the figures are the median and 90th percentile of all of a model's runs. With ``runner`` (``build/xnn_executor_runner``), each
    ``.pte`` is also timed by the native runner on real test images from ``data``: the C++ path a
    Raspberry Pi would run.
    """
    threads = threads or tuple(sorted({1, os.cpu_count() or 1}))
    rounds = min(5, repeats) if rounds is None else rounds
    if not 1 <= rounds <= repeats:
        raise MobilepruneError(f"rounds {rounds} must be between 1 and the number of timed runs ({repeats})")
    if runner is not None:
        from .data import TEST_BIN, find_data_dir

        if not Path(runner).is_file():
            raise MobilepruneError(f"{runner}: no runner there (build it: make runner)")
        test_file = find_data_dir(data) / TEST_BIN
    for path in map(Path, paths):
        if not path.is_file():
            raise MobilepruneError(f"{path}: no such file")
    paths = [str(path) for path in paths]
    found = {}  # (index of the file, threads): its results
    for n in threads:
        for index, result in enumerate(_interleaved(paths, n, warmup, repeats, rounds, trust_pickle)):
            found[index, n] = [result]
            if runner is not None and result.model.endswith(".pte"):
                found[index, n].append(_bench_runner(Path(runner), result.model, n, warmup, repeats, test_file))
    return [result for index in range(len(paths)) for n in threads for result in found[index, n]]


def format_bench(results: list[Latency]) -> str:
    reference = {r.threads: r.median_ms for r in results if (r.model, r.kind) == (results[0].model, results[0].kind)}
    lines = [f"{'model':<48} {'kind':<6} {'threads':>7} {'median ms':>10} {'p90 ms':>8} {'speed-up':>8}"]
    for r in results:
        speedup = reference.get(r.threads, r.median_ms) / r.median_ms
        lines.append(f"{r.model[-48:]:<48} {r.kind:<6} {r.threads:>7} {r.median_ms:>10.3f} {r.p90_ms:>8.3f} "
                     f"{speedup:>7.2f}x")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- per-operator profile
@dataclass
class OperatorTime:
    program: str
    operator: str  # XNNPACK's operator kind, e.g. "Convolution (NHWC, QC8) DWConv"
    count: int  # how many of them the program runs
    median_ms: float  # the sum over them of each one's median time
    share: float  # of the whole execution's median


def _profile_one(path: str, threads: int, runs: int) -> list[OperatorTime]:
    """Run ``path`` ``runs`` times with ExecuTorch's event tracer on and read its ETDump back."""
    import tempfile
    import warnings
    from collections import defaultdict

    from .errors import quiet_libraries
    from .export import check_pte_file, runtime_stderr_filtered, set_runtime_threads

    quiet_libraries()
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    set_runtime_threads(threads)
    image = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    with runtime_stderr_filtered():
        module = portable_lib._load_for_executorch(str(check_pte_file(path)), enable_etdump=True,
                                                   debug_buffer_size=0)
        for _ in range(runs):
            module.forward([image])
    with tempfile.TemporaryDirectory() as tmp:
        module.write_etdump_result_to_file(f"{tmp}/run.etdp")
        with warnings.catch_warnings():  # "Output Buffer not found": we asked for times, not tensors
            warnings.simplefilter("ignore")
            inspector = Inspector(etdump_path=f"{tmp}/run.etdp")
    warm = max(1, runs // 5)  # the first runs pay for first-touch allocations
    total, by_kind, counts = 0.0, defaultdict(float), defaultdict(int)
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None:
                continue
            median = statistics.median(event.perf_data.raw[warm:] or event.perf_data.raw)
            if event.name == "Method::execute":
                total = median
            elif "::" not in event.name and event.name != "DELEGATE_CALL":
                kind = re.sub(r" #\d+$", "", event.name)
                by_kind[kind] += median
                counts[kind] += 1
    return [OperatorTime(path, kind, counts[kind], ms, ms / total if total else 0.0)
            for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])] + \
        [OperatorTime(path, "whole execution", sum(counts.values()), total, 1.0)]


def profile(paths: list[str | Path], threads: int = 1, runs: int = 50) -> list[OperatorTime]:
    """Where each ``.pte``'s time goes, by XNNPACK operator kind (ETDump), each in a fresh process."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    for path in map(Path, paths):
        if path.suffix != ".pte":
            raise MobilepruneError(f"{path}: only .pte programs can be profiled")
        if not path.is_file():
            raise MobilepruneError(f"{path}: no such file")
    rows = []
    for path in map(str, paths):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                rows += pool.submit(_profile_one, path, threads, runs).result()
            except BrokenProcessPool:
                raise MobilepruneError(f"{path}: the profiling process died") from None
    return rows


def format_profile(rows: list[OperatorTime]) -> str:
    lines = []
    for program in dict.fromkeys(r.program for r in rows):
        lines += [f"{program}", f"  {'operator':<40} {'count':>5} {'median ms':>10} {'share':>6}"]
        lines += [f"  {r.operator:<40} {r.count:>5} {r.median_ms:>10.3f} {r.share:>6.1%}"
                  for r in rows if r.program == program]
    return "\n".join(lines)
