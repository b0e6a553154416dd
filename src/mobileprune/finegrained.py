"""Part 1: fine-grained (unstructured) magnitude pruning, sensitivity scans and per-layer sparsity.

The lab's semantics throughout: a weight tensor pruned to sparsity ``s`` loses its
``round(numel * s)`` smallest-magnitude entries; a sparse model's size counts only its non-zeros
(``non-zeros * bit width``). Masks are kept and re-applied after every optimiser step, so pruned
weights stay zero through fine-tuning.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import check_image_count
from .errors import MobilepruneError
from .files import write_json

DEFAULT_SCAN_SPARSITIES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def fine_grained_prune(tensor: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``round(numel * sparsity)`` smallest |w| of ``tensor`` in place; return the 0/1 mask."""
    sparsity = min(max(0.0, float(sparsity)), 1.0)
    num_zeros = round(tensor.numel() * sparsity)
    if num_zeros == 0:
        return torch.ones_like(tensor)
    if num_zeros >= tensor.numel():
        tensor.zero_()
        return torch.zeros_like(tensor)
    importance = tensor.abs()
    threshold = importance.flatten().kthvalue(num_zeros).values
    mask = (importance > threshold).to(tensor.dtype)
    tensor.mul_(mask)
    return mask


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of convolutions and linear layers (dim > 1), by parameter name."""
    return {name: p for name, p in model.named_parameters() if p.dim() > 1}


def weight_histograms(model: nn.Module, bins: int = 128) -> dict[str, dict]:
    """Each prunable layer's non-zero weights as ``{"range": [low, high], "counts": [...]}`` (equal bins).

    What ``report`` draws the weight distributions from (the lab's first question), so that a
    report needs no model file.
    """
    histograms = {}
    for name, param in prunable_parameters(model).items():
        weights = param.detach().float().cpu().flatten()
        counts, edges = np.histogram(weights[weights != 0].numpy(), bins=bins)
        histograms[name] = {"range": [float(edges[0]), float(edges[-1])], "counts": counts.tolist()}
    return histograms


class FineGrainedPruner:
    """Masks for the weights named in ``sparsity_dict``; call it after each step to re-apply them."""

    def __init__(self, model: nn.Module, sparsity_dict: dict[str, float]):
        params = prunable_parameters(model)
        unknown = set(sparsity_dict) - set(params)
        if unknown:
            raise MobilepruneError(f"sparsity dict names {sorted(unknown)[:3]}, which are not prunable weights "
                                   f"(dim > 1) of the model")
        self.masks = {name: fine_grained_prune(params[name].data, s) for name, s in sparsity_dict.items()}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.masks:
                if self.masks[name].device != param.device:
                    self.masks[name] = self.masks[name].to(param.device)
                param.mul_(self.masks[name])

    __call__ = apply  # usable as the training engine's after_step callback


# ----------------------------------------------------------------------------- measurement
def num_parameters(model: nn.Module, count_nonzero_only: bool = False) -> int:
    return sum(int(p.count_nonzero()) if count_nonzero_only else p.numel() for p in model.parameters())


def model_size_bits(model: nn.Module, data_width: int = 32, count_nonzero_only: bool = False) -> int:
    """The lab's model size: parameters (or only the non-zeros) times the bit width."""
    return num_parameters(model, count_nonzero_only) * data_width


def model_sparsity(model: nn.Module) -> float:
    return 1 - num_parameters(model, True) / num_parameters(model)


def relative_size(model: nn.Module) -> float:
    """Sparse size (non-zeros only) over dense size, both at the same bit width."""
    return num_parameters(model, True) / num_parameters(model)


# ----------------------------------------------------------------------------- sensitivity
def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the prunable weights: a cached scan is reused only for the model it measured."""
    digest = hashlib.sha1()
    for name, param in prunable_parameters(model).items():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float],
                     sparsities: tuple[float, ...] = DEFAULT_SCAN_SPARSITIES, cache: str | Path | None = None,
                     progress: bool = True, key: dict | None = None) -> dict:
    """Accuracy with one layer at a time pruned to each sparsity, others dense.

    Returns ``{"dense": acc, "sparsities": [...], "accuracy": {param_name: [acc per sparsity]}}``.
    With ``cache``, the scan is written after every layer and an interrupted or finished scan is
    picked up where it stopped (at 224 px on a CPU a full scan takes the better part of an hour);
    it is reused only if the sparsities, the weights and ``key`` (what ``evaluate`` measures on,
    e.g. the number of images) are the same, else it starts over.
    """
    sparsities = [float(s) for s in sparsities]
    params = prunable_parameters(model)
    signature = {"sparsities": sparsities, "weights": weights_fingerprint(model), **(key or {})}
    result = None
    if cache is not None and Path(cache).is_file():
        try:
            cached = json.loads(Path(cache).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = {}  # a scan cut off mid-write: start over
        if cached.get("signature") == signature:  # the fingerprint covers the layer names too
            result = cached
    if result is None:
        result = {"signature": signature, "dense": evaluate(model), "sparsities": sparsities, "accuracy": {}}
        if cache is not None:
            write_json(cache, result)
    todo = {name: param for name, param in params.items() if name not in result["accuracy"]}
    jobs = tqdm(todo.items(), desc="sensitivity scan", disable=not progress, unit="layer",
                initial=len(params) - len(todo), total=len(params))
    for name, param in jobs:
        original = param.detach().clone()
        accuracies = []
        try:
            for s in sparsities:
                fine_grained_prune(param.data, s)
                accuracies.append(evaluate(model))
        finally:  # interrupted or not, the caller gets its weights back
            param.data.copy_(original)
        result["accuracy"][name] = accuracies
        if cache is not None:
            write_json(cache, result)
    return result


def with_adaptive_batchnorm(evaluate: Callable[[nn.Module], float], images: torch.Tensor, size: int = 224,
                            device: str | torch.device = "cpu") -> Callable[[nn.Module], float]:
    """``evaluate`` run on BatchNorm statistics re-estimated on ``images`` (uint8 training images).

    Adaptive BatchNorm (EagleEye, Li et al. 2020): a pruned candidate judged with the dense model's
    statistics is judged partly on how stale they have become; re-estimated, the scan ranks what
    pruning did to the weights. The model's own statistics are put back after each call.
    """
    from .train import recalibrate_batchnorm

    def evaluate_recalibrated(model: nn.Module) -> float:
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        try:
            recalibrate_batchnorm(model, images, size, device=device)
            return evaluate(model)
        finally:
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])

    return evaluate_recalibrated


def read_sparsity_json(path: str | Path) -> dict[str, float]:
    """A per-layer sparsity dict written by hand or by a run (``{param_name: sparsity}``)."""
    try:
        sparsity = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MobilepruneError(f"{path}: cannot read a JSON sparsity dict ({e})") from None
    if not isinstance(sparsity, dict) or not all(isinstance(v, (int, float)) for v in sparsity.values()):
        raise MobilepruneError(f"{path}: not a sparsity dict ({{param_name: sparsity}})")
    return sparsity


def sensitivity_ranking(scan: dict, sparsity: float) -> list[tuple[str, float]]:
    """Layers by accuracy lost when pruned alone to ``sparsity`` (a scanned value), most sensitive first."""
    if sparsity not in scan["sparsities"]:
        raise MobilepruneError(f"sparsity {sparsity} was not scanned (scanned: {scan['sparsities']})")
    i = scan["sparsities"].index(sparsity)
    drops = {name: scan["dense"] - acc[i] for name, acc in scan["accuracy"].items()}
    return sorted(drops.items(), key=lambda item: -item[1])


def allocate_sparsity(scan: dict, model: nn.Module, target_size: float, step: float = 0.01) -> dict[str, float]:
    """Per-layer sparsities meeting ``target_size`` (fraction of dense size) with the least predicted loss.

    Each layer's predicted accuracy drop at sparsity s is read off its sensitivity curve (linear
    between scanned points, non-decreasing in s, zero at s = 0). Starting from the dense model,
    the allocator repeatedly raises by ``step`` the sparsity of the layer whose next step costs the
    least predicted accuracy per weight removed, until the size target is met; so it stops within
    one step of one layer of the target instead of overshooting it.
    """
    params = prunable_parameters(model)
    total = num_parameters(model)
    fixed = total - sum(p.numel() for p in params.values())  # biases and BN: never pruned
    to_remove = total - fixed - (target_size * total - fixed)
    if target_size * total < fixed:
        raise MobilepruneError(f"target size {target_size:.1%} is below the unprunable parameters' "
                               f"{fixed / total:.1%}")
    scanned = np.array([0.0] + list(scan["sparsities"]))
    grid = np.round(np.arange(0.0, max(scanned) + 1e-9, step), 6)
    if sum(p.numel() * grid[-1] for p in params.values()) < to_remove:
        raise MobilepruneError(f"target size {target_size:.1%} needs more than the scanned maximum sparsity "
                               f"{max(scanned):.0%}; scan higher sparsities")
    drops = {}
    for name in params:
        drop = np.maximum(0.0, scan["dense"] - np.array([scan["dense"]] + list(scan["accuracy"][name])))
        drop = np.maximum.accumulate(drop)  # pruning more never helps: trust the trend, not the noise
        drops[name] = np.interp(grid, scanned, drop)
    level = {name: 0 for name in params}

    def price(name: str) -> tuple[float, int]:
        i, n = level[name], params[name].numel()
        return (drops[name][i + 1] - drops[name][i]) / (n * step), -n  # ties: the bigger layer first

    def zeros(name: str) -> int:  # what fine_grained_prune will zero: round(numel * sparsity), not the product
        return round(params[name].numel() * grid[level[name]])

    heap = [(price(name), name) for name in params]
    heapq.heapify(heap)
    removed = 0
    while removed < to_remove:
        _, name = heapq.heappop(heap)
        before = zeros(name)
        level[name] += 1
        removed += zeros(name) - before
        if level[name] + 1 < len(grid):
            heapq.heappush(heap, (price(name), name))
    return {name: float(grid[i]) for name, i in level.items()}


# ----------------------------------------------------------------------------- the Part 1 pipeline
def parse_settings(settings: dict) -> dict:
    """A recipe's ``[finegrained]`` table with its defaults filled in; unknown or bad keys are named."""
    from .train import TrainConfig

    settings = dict(settings)
    train_config = TrainConfig.from_dict(settings.pop("train", {}))
    parsed = {"train": train_config,
              "target_size": float(settings.pop("target_size", 0.25)),
              "scan_sparsities": tuple(float(x) for x in settings.pop("scan_sparsities", DEFAULT_SCAN_SPARSITIES)),
              "scan_images": int(settings.pop("scan_images", 1000)),
              "bn_recalibration_images": settings.pop("bn_recalibration_images", 1000),
              "scan_bn_recalibration_images": settings.pop("scan_bn_recalibration_images", 0),
              "eval_resolution": int(settings.pop("eval_resolution", train_config.eval_resolution)),
              **{k: bool(settings.pop(k, True)) for k in ("distill", "export", "bench")}}
    if settings:
        raise MobilepruneError(f"unknown [finegrained] settings {sorted(settings)}")
    if not 0 < parsed["target_size"] < 1:
        raise MobilepruneError(f"[finegrained] target_size {parsed['target_size']} must be a fraction between 0 and 1")
    for key in ("bn_recalibration_images", "scan_bn_recalibration_images"):
        check_image_count(parsed[key], f"[finegrained] {key}")
    if not all(0 <= x <= 1 for x in parsed["scan_sparsities"]):
        raise MobilepruneError("[finegrained] scan_sparsities must lie between 0 and 1")
    return parsed


def run_finegrained(baseline: nn.Module, data, settings: dict, out_dir: str | Path, device: str = "cpu",
                    sparsity: dict[str, float] | None = None, progress: bool = True) -> dict:
    """Scan, allocate (or take ``sparsity`` by hand), prune, fine-tune with masks, measure, export.

    Writes sensitivity.json, sparsity.json and weights.json, from which ``report.draw_plots`` draws
    the plots that summary.md names.

    ``settings`` is a recipe's ``[finegrained]`` table: ``target_size`` (fraction of dense size),
    ``scan_sparsities``, ``scan_images`` (validation images the scan uses), ``eval_resolution``,
    ``bn_recalibration_images`` (training images BatchNorm is re-estimated on after pruning) and
    ``scan_bn_recalibration_images`` (the same for every scan point; 0, the default, is off),
    ``distill`` (KD from the dense model while fine-tuning), ``export``/``bench`` (write the sparse
    ``.pte`` and time it against the dense one), and a ``train`` table (a TrainConfig).
    """
    import copy

    from .evaluate import accuracy
    from .models import save_pickled_model, save_state_with_layout
    from .train import recalibrate_batchnorm, train

    parsed = parse_settings(settings)
    train_config, target, size = parsed["train"], parsed["target_size"], parsed["eval_resolution"]
    scan_sparsities, scan_images = parsed["scan_sparsities"], parsed["scan_images"]
    distill, do_export, do_bench = parsed["distill"], parsed["export"], parsed["bench"]
    out = Path(out_dir)
    dense = copy.deepcopy(baseline).to(device).eval()
    model = copy.deepcopy(baseline).to(device).eval()

    def measure(m: nn.Module, split: str, limit: int | None = None) -> float:
        images, labels = data.split(split)
        return accuracy(m, images[:limit], labels[:limit], device=device, size=size)

    summary = {"target_size": target, "dense_val": measure(model, "val"), "dense_test": measure(model, "test")}
    weights = {"parameters": {n: p.numel() for n, p in prunable_parameters(model).items()},
               "dense": weight_histograms(model)}
    write_json(out / "weights.json", weights, indent=None)
    if sparsity is None:
        scan_recalibration = min(parsed["scan_bn_recalibration_images"], len(data.train_labels))
        measure_scan_point = functools.partial(measure, split="val", limit=scan_images)
        key = {"scan_images": scan_images, "resolution": size}
        if scan_recalibration:  # absent when off, so scans cached before this option still match
            measure_scan_point = with_adaptive_batchnorm(measure_scan_point, data.train_images[:scan_recalibration],
                                                         size, device)
            key["bn_recalibration_images"] = scan_recalibration
        scan = sensitivity_scan(model, measure_scan_point, scan_sparsities, cache=out / "sensitivity.json",
                                progress=progress, key=key)
        sparsity = allocate_sparsity(scan, model, target)
    write_json(out / "sparsity.json", sparsity)

    pruner = FineGrainedPruner(model, sparsity)
    summary.update(relative_size=relative_size(model), sparsity=model_sparsity(model),
                   size_mib=model_size_bits(model, count_nonzero_only=True) / 8 / 2**20,
                   dense_size_mib=model_size_bits(dense) / 8 / 2**20)
    recalibration_images = min(parsed["bn_recalibration_images"], len(data.train_labels))
    if recalibration_images:
        # Before fine-tuning, what pruning did to the weights, not to BatchNorm's stale statistics.
        summary["pruned_val_dense_bn"] = measure(model, "val")
        recalibrate_batchnorm(model, data.train_images[:recalibration_images], size, device=device)
    summary.update(bn_recalibration_images=recalibration_images,
                   pruned_val=measure(model, "val"), pruned_test=measure(model, "test"))
    result = train(model, data, train_config, out / "finetune", teacher=dense if distill else None,
                   after_step=[pruner], resume=True, device=device, progress=progress, desc="fine-tune")
    model = result.model.eval()
    pruner.apply(model)  # the best epoch was saved masked; re-applying proves it costs nothing
    summary.update(finetuned_val=result.best_val_accuracy, finetuned_test=measure(model, "test"),
                   best_epoch=result.best_epoch, relative_size_after=relative_size(model),
                   finetune_epochs=train_config.epochs, finetune_images=len(data.split("train")[1]),
                   distill=distill)
    write_json(out / "weights.json", {**weights, "pruned": weight_histograms(model)}, indent=None)
    save_pickled_model(model, out / "mobilenet.pth")
    save_state_with_layout(model, out, "mobilenet")  # to rebuild the .pth under other torch versions
    if do_export:
        from .bench import bench
        from .export import export_pte

        export_pte(model, out / "mobilenet.pte")
        export_pte(dense, out / "dense.pte")
        if do_bench:
            timings = bench([out / "dense.pte", out / "mobilenet.pte"], warmup=5, repeats=30)
            summary["latency_ms"] = {f"{Path(t.model).stem}@{t.threads}": t.median_ms for t in timings}
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(finegrained_markdown(summary, len(data.test_labels)))
    return summary


def finegrained_markdown(s: dict, test_images: int) -> str:
    lines = ["# Part 1: fine-grained pruning", "",
             f"| | validation | test ({test_images} images) |", "|---|---|---|",
             f"| dense | {s['dense_val']:.4f} | {s['dense_test']:.4f} |",
             f"| pruned, before fine-tuning | {s['pruned_val']:.4f} | {s['pruned_test']:.4f} |",
             f"| pruned, fine-tuned (best epoch {s['best_epoch']}) | {s['finetuned_val']:.4f} | "
             f"{s['finetuned_test']:.4f} |", ""]
    if s.get("bn_recalibration_images"):  # older summaries and runs without it say nothing
        lines += [f"Before fine-tuning, BatchNorm statistics were re-estimated on {s['bn_recalibration_images']:,} "
                  f"training images; with the dense model's statistics the pruned model scored "
                  f"{s['pruned_val_dense_bn']:.4f} on validation.", ""]
    if "finetune_epochs" in s:  # summaries written before these were recorded lack them
        lines += [f"Fine-tuned {s['finetune_epochs']} epoch(s) on {s['finetune_images']:,} training images, "
                  f"{'distilled from the dense model' if s['distill'] else 'on labels alone (no distillation)'}.", ""]
    lines += [f"Size: {s['relative_size_after']:.2%} of dense ({s['size_mib']:.2f} MiB of non-zeros against "
              f"{s['dense_size_mib']:.2f} MiB, 32-bit; target {s['target_size']:.0%}); model sparsity "
              f"{s['sparsity']:.2%}.", ""]
    if "latency_ms" in s:
        lines += ["Latency of the `.pte` (ExecuTorch/XNNPACK, median ms per image):", "",
                  "| model | " + " | ".join(s["latency_ms"]) + " |", "|---|" + "---|" * len(s["latency_ms"]),
                  "| | " + " | ".join(f"{v:.2f}" for v in s["latency_ms"].values()) + " |", "",
                  "XNNPACK runs dense kernels: zeros in a weight tensor are multiplied like any other "
                  "number, so unstructured sparsity shrinks a compressed file but not the latency. That "
                  "is why Part 2 removes whole channels.", ""]
    lines += ["Plots: `plots/weights_dense.png`, `plots/weights_pruned.png`, `plots/sensitivity.png`, "
              "`plots/parameters.png`, `plots/sparsity.png`; chosen sparsities: `sparsity.json`.", ""]
    return "\n".join(lines)
