"""Part 1: fine-grained (unstructured) magnitude pruning, sensitivity scans and per-layer sparsity.

The lab's semantics throughout: a weight tensor pruned to sparsity ``s`` loses its
``round(numel * s)`` smallest-magnitude entries; a sparse model's size counts only its non-zeros
(``non-zeros * bit width``). Masks are kept and re-applied after every optimiser step, so pruned
weights stay zero through fine-tuning.
"""
from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .errors import MobilepruneError

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
@torch.no_grad()
def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float],
                     sparsities: tuple[float, ...] = DEFAULT_SCAN_SPARSITIES, cache: str | Path | None = None,
                     progress: bool = True) -> dict:
    """Accuracy with one layer at a time pruned to each sparsity, others dense.

    Returns ``{"dense": acc, "sparsities": [...], "accuracy": {param_name: [acc per sparsity]}}``;
    with ``cache``, a finished scan for the same sparsities is read back instead of recomputed.
    """
    sparsities = [float(s) for s in sparsities]
    if cache is not None and Path(cache).is_file():
        cached = json.loads(Path(cache).read_text())
        if cached.get("sparsities") == sparsities and set(cached["accuracy"]) == set(prunable_parameters(model)):
            return cached
    result = {"dense": evaluate(model), "sparsities": sparsities, "accuracy": {}}
    params = prunable_parameters(model)
    jobs = tqdm(params.items(), desc="sensitivity scan", disable=not progress, unit="layer")
    for name, param in jobs:
        original = param.detach().clone()
        accuracies = []
        for s in sparsities:
            fine_grained_prune(param.data, s)
            accuracies.append(evaluate(model))
            param.data.copy_(original)
        result["accuracy"][name] = accuracies
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(result, indent=1) + "\n")
    return result


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

    heap = [(price(name), name) for name in params]
    heapq.heapify(heap)
    removed = 0.0
    while removed < to_remove:
        _, name = heapq.heappop(heap)
        level[name] += 1
        removed += params[name].numel() * step
        if level[name] + 1 < len(grid):
            heapq.heappush(heap, (price(name), name))
    return {name: float(grid[i]) for name, i in level.items()}


def uniform_sparsity(model: nn.Module, sparsity: float) -> dict[str, float]:
    return {name: sparsity for name in prunable_parameters(model)}
