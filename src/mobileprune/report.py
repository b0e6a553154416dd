"""Plots (PNG, no display needed) and markdown summaries for each stage."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import nn  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("features.", "f").replace(".conv.", ".").replace("classifier", "fc")


def _layer_grid(names: list[str], draw, path: str | Path, title: str, sharey: bool = False) -> Path:
    """One small panel per layer, eight to a row; ``draw(ax, name)`` fills a panel."""
    cols = 8
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), sharey=sharey)
    for ax, name in zip(axes.flat, names):
        draw(ax, name)
        ax.set_title(_short(name), fontsize=7)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_weight_distribution(model: nn.Module, path: str | Path, bins: int = 128) -> Path:
    """Histogram of each prunable layer's non-zero weights (the lab's first question)."""
    weights = {n: p.detach().cpu().flatten().numpy() for n, p in model.named_parameters() if p.dim() > 1}

    def draw(ax, name):
        w = weights[name]
        ax.hist(w[w != 0], bins=bins, color="tab:blue", density=True)

    return _layer_grid(list(weights), draw, path, "Weight distribution per layer (non-zero weights)")


def plot_sensitivity(scan: dict, path: str | Path, chosen: dict[str, float] | None = None) -> Path:
    def draw(ax, name):
        ax.plot(scan["sparsities"], scan["accuracy"][name], "o-", ms=2)
        ax.axhline(scan["dense"], color="grey", lw=0.6, ls="--")
        if chosen and name in chosen:
            ax.axvline(chosen[name], color="tab:red", lw=0.8)
        ax.set_xlim(0, 1)

    return _layer_grid(list(scan["accuracy"]), draw, path,
                       "Sensitivity: validation accuracy with one layer pruned (red: chosen sparsity)", sharey=True)


def plot_bars(values: dict[str, float], path: str | Path, title: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.bar(range(len(values)), list(values.values()), color="tab:blue")
    ax.set_xticks(range(len(values)), [_short(n) for n in values], rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_schedule(rows: list[dict], path: str | Path, target: float | None = None) -> Path:
    """Validation accuracy against MFLOPs over a channel-pruning schedule."""
    fig, ax = plt.subplots(figsize=(6, 4))
    mflops = [r["mflops"] for r in rows]
    for key, label in (("val_pruned", "after pruning"), ("val_finetuned", "after fine-tuning")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(mflops, values, "o-", label=label)
    if target is not None:
        ax.axvline(target, color="tab:red", ls="--", lw=0.8, label=f"target {target:g} MFLOPs")
    ax.axhline(0.92, color="grey", ls=":", lw=0.8, label="lab bar 92 %")
    ax.invert_xaxis()
    ax.set_xlabel("MFLOPs (grader's count)")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_channels(before: dict, after: dict, path: str | Path) -> Path:
    """Output channels of every convolution, dense against pruned (from two channel layouts)."""
    names = [n for n, v in before["layers"].items() if "groups" in v]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.bar(x, [before["layers"][n]["out"] for n in names], color="lightgrey", label="dense")
    ax.bar(x, [after["layers"][n]["out"] for n in names], color="tab:blue", label="pruned")
    ax.set_xticks(x, [_short(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend()
    return _save(fig, path)
