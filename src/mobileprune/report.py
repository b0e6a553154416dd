"""Plots (PNG, no display needed) and the markdown report of a run or a release, drawn from files alone.

A stage writes its data files (summaries, tables, histograms, channel counts); ``draw_plots`` draws
a stage's plots from them (the pipeline and the CLI ask for it after each stage), and
``write_report`` (``mobileprune report``) redraws them all and writes one REPORT.md for a run
folder or a release of several. Nothing here imports a stage: data flows one way.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .errors import MobilepruneError  # noqa: E402
from .files import read_csv  # noqa: E402

OFFICIAL_TEST_IMAGES = 10_000  # as evaluate.OFFICIAL_TEST_IMAGES: a point on fewer is not plotted


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("features.", "f").replace(".conv.", ".").replace("classifier", "fc")


def _layer_grid(names: list[str], draw, path: str | Path, title: str, sharey: bool = False) -> Path:
    """One small panel per layer, eight to a row; ``draw(ax, name)`` fills a panel.

    Margins are set in inches rather than by ``tight_layout``, which renders a grid of 53 panels
    once more only to measure it (half the time of the whole figure).
    """
    cols = 8
    rows = -(-len(names) // cols)
    width, height = 2.2 * cols, 1.8 * rows
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), sharey=sharey, squeeze=False)
    for ax, name in zip(axes.flat, names):
        draw(ax, name)
        ax.set_title(_short(name), fontsize=7)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.45 / width, right=1 - 0.15 / width, bottom=0.3 / height, top=1 - 0.75 / height,
                        wspace=0.35, hspace=0.75)
    fig.suptitle(title, y=1 - 0.15 / height, va="top")
    return _save(fig, path, tight=False)


def plot_weight_distribution(histograms: dict[str, dict], path: str | Path) -> Path:
    """Each prunable layer's histogram of non-zero weights (``finegrained.weight_histograms``; the lab's first question)."""
    def draw(ax, name):
        counts = np.asarray(histograms[name]["counts"], dtype=float)
        edges = np.linspace(*histograms[name]["range"], len(counts) + 1)
        density = counts / max(counts.sum() * (edges[1] - edges[0]), 1e-30)
        ax.stairs(density, edges, fill=True, color="tab:blue")  # one artist, not a patch a bin (3x faster)

    return _layer_grid(list(histograms), draw, path, "Weight distribution per layer (non-zero weights)")


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


def plot_average(val_by_fraction: dict[str, float], kept: float, path: str | Path) -> Path:
    """Validation accuracy along the line from one checkpoint (0) to the other (1)."""
    fractions = sorted(float(f) for f in val_by_fraction)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(fractions, [val_by_fraction[str(f)] for f in fractions], "o-")
    ax.axvline(kept, color="tab:red", ls="--", lw=0.8, label=f"kept: {kept:g}")
    ax.set_xlabel("fraction of the second model's weights")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Weight averaging of two checkpoints")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_channels(rows: list[dict], path: str | Path) -> Path:
    """Output channels of every convolution, dense against pruned (the rows of a stage's channels.csv)."""
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.bar(x, [r["before"] for r in rows], color="lightgrey", label="dense")
    ax.bar(x, [r["after"] for r in rows], color="tab:blue", label="pruned")
    ax.set_xticks(x, [_short(r["layer"]) for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend()
    return _save(fig, path)


def plot_distill(histories: dict[str, list[dict]], path: str | Path, teacher_val: float | None = None,
                 title: str = "Students distilled together") -> Path:
    """Validation accuracy of each student against the seconds spent (a distill run's history.csv files,
    or runs that trained apart, ``title`` saying which)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, all_rows in histories.items():
        rows = [r for r in all_rows if r["val_accuracy"] is not None]  # at the grader's size
        line, = ax.plot([r["spent"] for r in rows], [r["val_accuracy"] for r in rows], "o-", ms=2, label=name)
        if any(r.get("val_ema") is not None for r in rows):
            ax.plot([r["spent"] for r in rows], [r["val_ema"] for r in rows], ":", color=line.get_color(),
                    label=f"{name} (EMA)")
        low = [r for r in all_rows if r.get("val_at_train_resolution") is not None]
        if low:  # epochs trained below the grader's size, validated at their own size as well
            ax.plot([r["spent"] for r in low], [r["val_at_train_resolution"] for r in low], "o", mfc="none",
                    color=line.get_color(), label=f"{name} at its training size "
                                                  f"({', '.join(sorted({str(r['train_resolution']) for r in low}))} px)")
    if teacher_val is not None:
        ax.axhline(teacher_val, color="black", ls="--", lw=0.8, label=f"teacher {teacher_val:.4f}")
    ax.axhline(0.92, color="grey", ls=":", lw=0.8, label="lab bar 92 %")
    ax.set_xlabel("seconds of the students' budget spent")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_teacher(rows: list[dict], path: str | Path, summary: dict) -> Path:
    """The teacher's validation accuracy and training loss by epoch (its history.csv), the finished
    teacher's single-view, mirror-mean (the students' targets) and TTA accuracy marked at the end."""
    fig, (val_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    epochs = [r["epoch"] for r in rows]
    val_ax.plot(epochs, [r["val_accuracy"] for r in rows], "o-", ms=3, label="validation, one view, each epoch")
    last = epochs[-1] if epochs else summary.get("epochs", 0)
    for key, marker, label in (("val_accuracy", "s", "finished, one view"),
                               ("val_accuracy_flip", "D", "finished, view and mirror (the students' targets)"),
                               ("val_accuracy_tta", "^", f"finished, TTA level {summary.get('tta_level')}"),
                               ("test_accuracy", "x", "test, one view (reported)")):
        if summary.get(key) is not None:
            val_ax.plot([last], [summary[key]], marker, ms=7, label=f"{label}: {summary[key]:.4f}")
    val_ax.set_xlabel("epoch")
    val_ax.set_ylabel("accuracy")
    val_ax.legend(fontsize=7, loc="lower right")
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, color="tab:grey")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss (label smoothing, per image)")
    hours = f", {summary['seconds'] / 3600:.1f} h on {summary.get('machine') or summary.get('device')}" \
        if summary.get("seconds") else ""
    fig.suptitle(f"32-px teacher {summary.get('widths')} x{summary.get('depth')}{hours}", fontsize=9)
    return _save(fig, path)


# Public hand-ins of this lab (MFLOPs, test accuracy), the reference points of ``plot_pareto``.
# The best, 26.33 MFLOPs at 92.32 %, was made from the course's 96.3 % checkpoint.
PUBLIC_HAND_INS = ((26.33, 0.9232), (39.34, 0.9272), (44.51, 0.9248), (60.39, 0.9167))
SCORE_CONTOURS = (20, 30, 40, 50, 60)  # lab score in percent


def lab_score(mflops, accuracy):
    """The lab's score in percent (``evaluate.lab_score``, restated for arrays: report imports no stage)."""
    return ((200 - np.asarray(mflops)) / 155 - 10 * np.maximum(0.0, 0.92 - np.asarray(accuracy))) * 45


def plot_pareto(points: list[dict], path: str | Path, hand_in: dict | None = None,
                public: tuple = PUBLIC_HAND_INS) -> Path:
    """Test accuracy against MFLOPs: our points, the public hand-ins, the lab's 92 % bar and score contours.

    ``points`` are ``{"label", "mflops", "accuracy"}`` (``pareto_points``); ``hand_in`` is marked.
    """
    fig, ax = plt.subplots(figsize=(7.5, 5))
    mflops = np.linspace(10, 130, 300)
    accuracy = np.linspace(0.84, 0.96, 300)
    grid_m, grid_a = np.meshgrid(mflops, accuracy)
    contours = ax.contour(grid_m, grid_a, lab_score(grid_m, grid_a), levels=SCORE_CONTOURS, colors="lightgrey",
                          linewidths=0.7)
    ax.clabel(contours, fmt="score %d %%", fontsize=7)
    ax.axhline(0.92, color="grey", ls=":", lw=0.9, label="lab bar 92 %")
    ax.scatter(*zip(*public), marker="s", color="tab:grey", s=28, label="public hand-ins of this lab")
    if points:
        ax.scatter([p["mflops"] for p in points], [p["accuracy"] for p in points], color="tab:blue", s=26,
                   label="mobileprune")
        for p in points:
            if hand_in and (p["mflops"], p["accuracy"]) == (hand_in["mflops"], hand_in["accuracy"]):
                continue  # the star says it
            ax.annotate(p["label"], (p["mflops"], p["accuracy"]), fontsize=6, xytext=(4, -8),
                        textcoords="offset points")
    if hand_in:
        ax.scatter([hand_in["mflops"]], [hand_in["accuracy"]], marker="*", s=220, color="tab:red", zorder=3,
                   label=f"our hand-in ({hand_in['mflops']:.2f} MFLOPs, {hand_in['accuracy']:.4f})")
    ax.set_xlim(10, 130)
    ax.set_ylim(0.84, 0.96)
    ax.set_xlabel("MFLOPs (grader's count)")
    ax.set_ylabel("test accuracy (.pte, runner resize where graded)")
    ax.set_title("Accuracy against MFLOPs; grey lines: lab score")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_schedules(schedules: dict[str, list[dict]], path: str | Path, lab_line: float = 0.92) -> Path:
    """Validation accuracy after fine-tuning against MFLOPs, one line per channel-pruning run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in schedules.items():
        points = [(r["mflops"], r["val_finetuned"]) for r in rows if r.get("val_finetuned") is not None]
        ax.plot(*zip(*points), "o-", ms=3, label=label)
    ax.axhline(lab_line, color="grey", ls=":", lw=0.8, label="lab bar 92 %")
    ax.set_xscale("log")
    ticks = [20, 45, 100, 200, 319]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("MFLOPs (grader's count, log scale)")
    ax.set_ylabel("validation accuracy after fine-tuning")
    ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- reports from a folder
# A stage folder is recognised by its summary.json: Part 2 writes target_mflops, Part 1
# relative_size_after, the baseline best_epoch, `mobileprune recover` val_before, `mobileprune
# average` val_by_fraction, `mobileprune recalibrate` val_by_resize (with target_mflops too when it
# carries a Part 2 run forward). A hand-in grade is grade.json, its int8 program's grade.int8.json.
STAGE_KEYS = {"prune": "target_mflops", "finegrained": "relative_size_after", "baseline": "best_epoch",
              "recover": "val_before", "average": "val_by_fraction", "recalibrate": "val_by_resize",
              "distill": "students", "teacher": "tta_level"}
# A graded hand-in's files (stem.json, stem.txt) and how the report names its row.
GRADE_STEMS = {"grade": "", "grade.int8": " int8"}
# What ``collect_release`` copies from a run: summaries, tables and plots, and the channel-pruned
# models (a few MB). Not the dense-sized models (baseline, Part 1's sparse model: 9 MB each, kept
# in runs/), the hand-in copy under submission/, or the per-epoch checkpoints only resuming needs.
RELEASE_FILES = ("summary.json", "summary.md", "history.csv", "schedule.csv", "channels.csv", "sensitivity.json",
                 "sparsity.json", "weights.json", "grade.json", "grade.txt", "grade.int8.json", "grade.int8.txt",
                 "plots/*.png", "*.png")
RELEASE_MODELS = ("mobilenet.pth", "mobilenet.pte", "mobilenet.pt", "mobilenet.layout.json", "mobilenet.int8.pte",
                  "mobilenet.int8.json")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def stage_kinds(summary: dict) -> list[str]:
    """What a stage's summary.json says it is (STAGE_KEYS), one kind or more."""
    # A recovery of a Part 2 run is both: a row in the Part 2 table and one in the recovery
    # table. Part 1 also records its best epoch: "baseline" is only what is nothing else.
    kinds = [kind for kind, key in STAGE_KEYS.items() if key in summary and kind != "baseline"]
    return kinds or (["baseline"] if STAGE_KEYS["baseline"] in summary else [])


def find_stages(root: str | Path) -> dict[str, list[Path]]:
    """Stage folders under ``root`` (itself included), by kind, and the folders holding a grade.json."""
    root = Path(root)
    found: dict[str, list[Path]] = {kind: [] for kind in (*STAGE_KEYS, *GRADE_STEMS)}
    for path in sorted(root.rglob("summary.json")):
        for kind in stage_kinds(_read_json(path) or {}):
            found[kind].append(path.parent)
    for stem in GRADE_STEMS:
        found[stem] = sorted(p.parent for p in root.rglob(f"{stem}.json") if _read_json(p))
    return found


def read_schedule(path: str | Path) -> list[dict]:
    """schedule.csv back into rows of numbers (empty cells become None)."""
    return read_csv(path)


def draw_plots(stage: str | Path) -> list[Path]:
    """Draw a stage folder's plots from the files the stage wrote; returns the files drawn.

    Part 2 (and recover, average): schedule.png from schedule.csv, channels.png from channels.csv,
    average.png from summary.json; Part 1: plots/ from sensitivity.json, sparsity.json and
    weights.json. A file that is not there is a plot not drawn.
    """
    stage = Path(stage)
    summary = _read_json(stage / "summary.json") or {}
    kinds = stage_kinds(summary)
    written = []
    if {"prune", "recover", "average"} & set(kinds):
        if (stage / "schedule.csv").is_file():
            written.append(plot_schedule(read_csv(stage / "schedule.csv"), stage / "schedule.png",
                                         summary.get("target_mflops")))
        if (stage / "channels.csv").is_file():
            written.append(plot_channels(read_csv(stage / "channels.csv"), stage / "channels.png"))
    if "average" in kinds:
        written.append(plot_average(summary["val_by_fraction"], summary["fraction"], stage / "average.png"))
    if "distill" in kinds:
        histories = {name: read_csv(stage / name / "history.csv") for name in summary["students"]
                     if (stage / name / "history.csv").is_file()}
        teacher = _read_json(stage / "teacher" / "summary.json") or {}
        if histories:
            written.append(plot_distill(histories, stage / "distill.png", teacher.get("val_accuracy_tta")
                                        or teacher.get("val_accuracy")))
    if "teacher" in kinds and (stage / "history.csv").is_file():
        written.append(plot_teacher(read_csv(stage / "history.csv"), stage / "teacher.png", summary))
    if "finegrained" in kinds:
        plots = stage / "plots"
        sparsity, scan = _read_json(stage / "sparsity.json"), _read_json(stage / "sensitivity.json")
        weights = _read_json(stage / "weights.json") or {}
        if weights.get("parameters"):
            written.append(plot_bars(weights["parameters"], plots / "parameters.png", "Parameters per layer",
                                     "parameters"))
        if scan:
            written.append(plot_sensitivity(scan, plots / "sensitivity.png", sparsity))
        if sparsity:
            written.append(plot_bars(sparsity, plots / "sparsity.png", "Chosen sparsity per layer", "sparsity"))
        for key, name in (("dense", "weights_dense.png"), ("pruned", "weights_pruned.png")):
            if weights.get(key):
                written.append(plot_weight_distribution(weights[key], plots / name))
    return written


def _label(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else "."


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None or value == "" else format(value, spec)


# The Part 2 table: each run's settings and results, as ``prune_rows`` gives them.
# A stride other than torchvision's is a change beyond channel pruning (the open track, models.set_strides).
PRUNE_COLUMNS = {"run": "", "target": "g", "MFLOPs": ".2f", "params": ",", "strides": "", "criterion": "",
                 "global": "", "resolution weighting": "g", "round_to": "", "KD": "", "validation": ".4f",
                 "test": ".4f", "test images": ""}


def _strides(summary: dict) -> str:
    """A run's changed strides as the table shows them: "torchvision", or the open track's plan."""
    strides = summary.get("strides")
    if strides is None:  # written before stride plans: the stem's stride alone
        stem = summary.get("stem_stride", 2)
        strides = {"features.0": stem} if stem != 2 else {}
    return ", ".join(f"{block} {stride}" for block, stride in strides.items()) or "torchvision"


def prune_rows(root: str | Path, stages: list[Path] | None = None) -> list[dict]:
    """One row per channel-pruning run under ``root`` (or in ``stages``): settings and results, by PRUNE_COLUMNS."""
    root = Path(root)
    rows = []
    for stage in find_stages(root)["prune"] if stages is None else stages:
        s = _read_json(stage / "summary.json")
        p = s.get("prune") or {}  # a student trained as it was has no pruning settings
        rows.append({"run": _label(stage, root), "target": s["target_mflops"], "MFLOPs": s["mflops"],
                     "params": s.get("params"), "strides": _strides(s),
                     "criterion": p.get("importance", "l2"),
                     "global": "yes" if p.get("global_pruning") else "no",
                     "resolution weighting": p.get("resolution_weighting", 0), "round_to": p.get("round_to") or 1,
                     "KD": "yes" if s.get("distill") else "no", "validation": s["val_accuracy"],
                     "test": s.get("test_accuracy"), "test images": s.get("test_images")})
    return rows


RECOVER_COLUMNS = {"run": "", "from": "", "MFLOPs": ".2f", "params": ",", "KD": "", "images": ",",
                   "first image": ",", "epochs": "", "lr": "g", "validation before": ".4f", "validation trained": ".4f",
                   "kept": "", "test": ".4f", "test images": ""}


def recover_row(stage: Path, root: Path) -> dict:
    """A ``mobileprune recover`` run's settings and results, by RECOVER_COLUMNS."""
    s = _read_json(stage / "summary.json")
    return {"run": f"`{_label(stage, root)}`", "from": f"`{s['recovered_from']}`" if "recovered_from" in s else None,
            "MFLOPs": s["mflops"], "params": s["params"], "KD": "yes" if s["distill"] else "no",
            "images": s["images"], "first image": s["skip_images"], "epochs": s["epochs"],
            "lr": s.get("lr"),
            "validation before": s["val_before"], "validation trained": s["val_trained"], "kept": s["kept"],
            "test": s["test_accuracy"], "test images": s["test_images"]}


RECALIBRATE_COLUMNS = {"run": "", "from": "", "MFLOPs": ".2f", "images": ",", "validation as is": "",
                       "re-estimated": "", "kept": "", "test": ".4f", "test images": ""}


def recalibrate_row(stage: Path, root: Path) -> dict:
    """A ``mobileprune recalibrate`` run's two candidates and the one kept, by RECALIBRATE_COLUMNS."""
    s = _read_json(stage / "summary.json")
    both = {name: f"{_fmt(v['torchvision'])} / {_fmt(v['runner'])}" for name, v in s["val_by_resize"].items()}
    return {"run": f"`{_label(stage, root)}`", "from": f"`{s['recovered_from']}`" if "recovered_from" in s else None,
            "MFLOPs": s["mflops"], "images": s["recalibration_images"], "validation as is": both.get("as is"),
            "re-estimated": both.get("recalibrated"), "kept": s["kept"], "test": s["test_accuracy"],
            "test images": s["test_images"]}


DISTILL_COLUMNS = {"student": "", "target": "g", "MFLOPs": ".2f", "validation after pruning": ".4f",
                   "validation": ".4f", "best epoch": "", "kept": ""}
AVERAGE_COLUMNS = {"run": "", "first": "", "second": "", "MFLOPs": ".2f", "validation first": ".4f",
                   "validation second": ".4f", "fraction kept": "g", "validation": ".4f", "test": ".4f",
                   "test images": ""}


def average_row(stage: Path, root: Path) -> dict:
    """A ``mobileprune average`` run's inputs and results, by AVERAGE_COLUMNS."""
    s = _read_json(stage / "summary.json")
    first, second = s["averaged"]
    return {"run": f"`{_label(stage, root)}`", "first": f"`{first}`", "second": f"`{second}`", "MFLOPs": s["mflops"],
            "validation first": s["val_first"], "validation second": s["val_second"], "fraction kept": s["fraction"],
            "validation": s["val_accuracy"], "test": s["test_accuracy"], "test images": s["test_images"]}


def write_report(root: str | Path, plots: bool = False) -> Path:
    """``root/REPORT.md`` from every stage and grade under ``root`` (a run folder or a release of several).

    With ``plots``, every stage's plots are redrawn from its files first.
    """
    root = Path(root)
    if not root.is_dir():
        raise MobilepruneError(f"{root}: no such folder")
    stages = find_stages(root)
    if plots:
        for stage in sorted({stage for kind, found in stages.items() if kind in STAGE_KEYS for stage in found}):
            draw_plots(stage)
    lines = [f"# mobileprune report: `{root}`", "",
             f"Written by `mobileprune report {root}` from the summaries, tables and channel layouts the stages "
             "saved. MFLOPs are counted as the grader counts them (`tp.utils.count_ops_and_params` at "
             "1×3×224×224); checkpoints were chosen on the validation split, and the test set was only reported.",
             ""]
    if not any(stages.values()):
        lines += ["No stage results here yet (no `summary.json` or `grade.json`).", ""]

    if stages["baseline"]:
        lines += ["## Dense baseline", "", "| run | best epoch | validation | test | test images | MFLOPs |",
                  "|---|---|---|---|---|---|"]
        for stage in stages["baseline"]:
            s = _read_json(stage / "summary.json")
            lines.append(f"| `{_label(stage, root)}` | {s['best_epoch']} | {_fmt(s['val_accuracy'])} | "
                         f"{_fmt(s['test_accuracy'])} | {s.get('test_images', '–')} | {s['mflops']:.2f} |")
        lines.append("")

    for stage in stages["finegrained"]:
        rel = _label(stage, root)
        lines += [f"## Part 1: fine-grained pruning (`{rel}`)", ""]
        if (stage / "summary.md").is_file():
            body = (stage / "summary.md").read_text().split("\n", 2)[2]
            lines.append(body.replace("`plots/", f"`{rel}/plots/").replace("`sparsity.json`", f"`{rel}/sparsity.json`"))
        lines += [f"![{name}]({rel}/plots/{name}.png)" for name in ("sensitivity", "sparsity", "weights_dense")
                  if (stage / "plots" / f"{name}.png").is_file()] + [""]

    if stages["prune"]:
        rows = prune_rows(root, stages["prune"])
        lines += ["## Part 2: channel pruning", "",
                  markdown_table([{**r, "run": f"`{r['run']}`"} for r in rows], PRUNE_COLUMNS)]
        schedules = {r["run"]: read_schedule(root / r["run"] / "schedule.csv") for r in rows
                     if (root / r["run"] / "schedule.csv").is_file()}
        lines.append("")
        points, hand_in = pareto_points(root)
        if points or hand_in:
            plot_pareto(points, root / "accuracy_vs_mflops.png", hand_in)
            lines += ["Test accuracy against MFLOPs, with the public hand-ins of this lab, the 92 % bar and the lab "
                      "score's contours (our hand-in: the star):", "",
                      "![accuracy against MFLOPs](accuracy_vs_mflops.png)", ""]
        if schedules:
            plot_schedules(schedules, root / "schedules.png")
            lines += ["Validation accuracy after each prune-and-fine-tune step:", "",
                      "![validation along each schedule](schedules.png)", ""]
        for stage in stages["prune"]:
            if (stage / "channels.png").is_file():
                lines += [f"Channels per layer, `{_label(stage, root)}`:", "",
                          f"![channels]({_label(stage, root)}/channels.png)", ""]

    if stages["recover"]:
        lines += ["## Part 2: more recovery (`mobileprune recover`)", "",
                  "A pruned model trained further with its channels unchanged; the model kept is the better of the "
                  "start and the best trained epoch on validation.", "",
                  markdown_table([recover_row(stage, root) for stage in stages["recover"]], RECOVER_COLUMNS), ""]

    if stages["recalibrate"]:
        lines += ["## Part 2: BatchNorm re-estimated (`mobileprune recalibrate`)", "",
                  "A trained model's BatchNorm statistics estimated afresh on training images; validation under "
                  "torchvision's / the runner's resize, and the model kept is the one higher under the worse of "
                  "the two.", "",
                  markdown_table([recalibrate_row(stage, root) for stage in stages["recalibrate"]],
                                 RECALIBRATE_COLUMNS), ""]

    for stage in stages["distill"]:
        s = _read_json(stage / "summary.json")
        rel = _label(stage, root)
        teacher = s.get("teacher", {})
        lines += [f"## Distillation: a 32-px teacher and {len(s['students'])} students (`{rel}`)", "",
                  f"Budget {s.get('budget_s', 0):.0f} s on `{s.get('device')}`: teacher "
                  f"{s.get('teacher_seconds', 0):.0f} s (validation {_fmt(teacher.get('val_accuracy'))}, "
                  f"{_fmt(teacher.get('val_accuracy_tta'))} with test-time augmentation), students "
                  f"{s.get('student_seconds', 0):.0f} s together ({s.get('epochs_per_student', 0):g} epochs each, "
                  f"{s.get('student_images_per_s', 0):,.0f} student-images/s).", "",
                  markdown_table([{"student": f"`{name}`", "target": r["target_mflops"], "MFLOPs": r["mflops"],
                                   "validation after pruning": r["val_after_pruning"], "validation": r["val_accuracy"],
                                   "best epoch": r["best_epoch"], "kept": r["kept"]}
                                  for name, r in s["students"].items()], DISTILL_COLUMNS), ""]
        if (stage / "distill.png").is_file():
            lines += [f"![validation of the students]({rel}/distill.png)", ""]

    for stage in stages["teacher"]:
        s = _read_json(stage / "summary.json")
        rel = _label(stage, root)
        lines += [f"## The 32-px teacher (`{rel}`)", "",
                  f"{s.get('widths')} x{s.get('depth')}, {s.get('params', 0):,} parameters, {s.get('epochs', 0):g} "
                  f"epochs in {s.get('seconds', 0) / 3600:.2f} h on {s.get('machine') or s.get('device')}: validation "
                  f"{_fmt(s.get('val_accuracy'))} one view, {_fmt(s.get('val_accuracy_flip'))} with the mirror, "
                  f"{_fmt(s.get('val_accuracy_tta'))} at TTA level {s.get('tta_level')}"
                  + (f"; test {_fmt(s['test_accuracy'])} and {_fmt(s.get('test_accuracy_tta'))} "
                     f"({s.get('test_images', 0):,} images, reported only)" if s.get("test_accuracy") is not None
                     else "") + ".", ""]
        if s.get("command"):
            lines += ["```", s["command"], "```", ""]
        if (stage / "teacher.png").is_file():
            lines += [f"![the teacher by epoch]({rel}/teacher.png)", ""]

    if stages["average"]:
        lines += ["## Part 2: weight averaging (`mobileprune average`)", "",
                  "Two checkpoints of one pruned model interpolated weight by weight; the point kept is the best "
                  "on validation (the two ends included, so never worse than the better input).", "",
                  markdown_table([average_row(stage, root) for stage in stages["average"]], AVERAGE_COLUMNS), ""]
        for stage in stages["average"]:
            if (stage / "average.png").is_file():
                lines += [f"![validation along the interpolation]({_label(stage, root)}/average.png)", ""]

    # One order for the table and the grades below it: by folder, each fp32 grade before its int8 one.
    graded = sorted((folder, stem, program) for stem, program in GRADE_STEMS.items() for folder in stages[stem])
    if graded:
        lines += ["## Hand-ins, graded as the lab does", ""]
        if stages["grade.int8"]:
            lines += ["The int8 rows grade `mobilenet.int8.pte` (`mobileprune export --int8`) exactly as the fp32 "
                      "program, against the same `.pth`.", ""]
        lines += ["| hand-in | MFLOPs | `.pte` accuracy (torchvision resize) | (runner resize) | test images | score |",
                  "|---|---|---|---|---|---|"]
        for folder, stem, program in graded:
            g = _read_json(folder / f"{stem}.json")
            pte = g.get("pte_accuracy") or {}
            lines.append(f"| `{_label(folder, root)}`{program} | {g['mflops']:.2f} | {_fmt(pte.get('torchvision'))} | "
                         f"{_fmt(pte.get('runner'))} | {g['images']} | {_fmt(g.get('score'), '.2f')} % |")
        lines.append("")
        for folder, stem, program in graded:
            if (folder / f"{stem}.txt").is_file():
                lines += [f"`{_label(folder, root)}`{program}:", "", "```", (folder / f"{stem}.txt").read_text().rstrip(),
                          "```", ""]
    if (root / "bench.txt").is_file():
        lines += ["## Latency", "", "One image through ExecuTorch/XNNPACK, the programs timed in interleaved rounds "
                  "(`mobileprune bench`; the command and the machine are the file's first lines):", "", "```",
                  (root / "bench.txt").read_text().rstrip(), "```", ""]
    path = root / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def collect_release(runs: list[str | Path], release: str | Path) -> list[Path]:
    """Copy each run folder's results (not its resume checkpoints) to ``release/<run name>/``."""
    release = Path(release)
    copied = []
    for run in map(Path, runs):
        if not run.is_dir():
            raise MobilepruneError(f"{run}: no such run folder")
        stages = find_stages(run)
        pruned_stages = set(stages["prune"] + stages["recover"] + stages["average"] + stages["recalibrate"])
        for path in sorted(run.rglob("*")):
            rel = path.relative_to(run)
            if not path.is_file() or any(part.startswith("step_") or part in ("finetune", "recovery", "submission")
                                         for part in rel.parts[:-1]):
                continue
            is_pruned_model = path.name in RELEASE_MODELS and path.parent in pruned_stages
            if not is_pruned_model and not any(rel.match(pattern) for pattern in RELEASE_FILES):
                continue
            target = release / run.name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(target)
    return copied


# Where the notebook and ``package`` look for results, best first: the release (its prune/ is the
# hand-in), then what a CPU run of the small-scale study or the from-scratch smoke recipe leaves.
RESULT_FOLDERS = ("release", "runs/cpu-small", "runs/quick")


def project_root() -> Path:
    """The mobileprune checkout: the working folder or one above it, else the one this package runs from.

    So that the notebook finds the results wherever it is opened (``jupyter execute`` from anywhere).
    """
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parents[2]):
        if (folder / "pyproject.toml").is_file() and (folder / "src" / "mobileprune").is_dir():
            return folder
    raise MobilepruneError(f"{here}: not inside a mobileprune checkout, and the package is not installed from one")


def find_results(project: str | Path = ".", stages: tuple[str, ...] = ("prune",)) -> Path:
    """``$MOBILEPRUNE_RESULTS``, else the first of RESULT_FOLDERS under ``project`` with all ``stages`` done.

    The hand-in needs only Part 2 (``prune``); the notebook also answers Part 1 (``finegrained``).
    """
    def complete(folder: Path) -> bool:
        return all((folder / stage / "summary.json").is_file() for stage in stages)

    if os.environ.get("MOBILEPRUNE_RESULTS"):
        folder = Path(os.environ["MOBILEPRUNE_RESULTS"])
        if not complete(folder):
            raise MobilepruneError(f"$MOBILEPRUNE_RESULTS={folder}: needs {', '.join(s + '/summary.json' for s in stages)}")
        return folder
    for name in RESULT_FOLDERS:
        if complete(Path(project) / name):
            return Path(project) / name
    raise MobilepruneError(f"no results with {' and '.join(stages)} in {', '.join(RESULT_FOLDERS)}: run `make run` "
                           "(CPU smoke run) or a GPU recipe first, or set $MOBILEPRUNE_RESULTS")


def pareto_points(root: str | Path) -> tuple[list[dict], dict | None]:
    """Our accuracy-against-MFLOPs points under ``root`` and the hand-in among them (the plot's inputs).

    A point per Part 2 result with a test accuracy: its graded ``.pte`` accuracy under the
    runner's resize (what the lab's runner measures) where a grade.json sits beside it, else its
    summary's test accuracy. The hand-in is the grade.json at ``root`` itself. Test accuracy is
    reported here only; every model was chosen on validation.
    """
    root = Path(root)
    stages = find_stages(root)
    points = []
    for stage in stages["prune"]:
        summary = _read_json(stage / "summary.json") or {}
        grade = _read_json(stage / "grade.json") or {}
        accuracy = grade.get("score_accuracy", summary.get("test_accuracy"))
        if accuracy is None or summary.get("test_images", OFFICIAL_TEST_IMAGES) < OFFICIAL_TEST_IMAGES:
            continue
        points.append({"label": stage.name, "mflops": summary["mflops"], "accuracy": accuracy})
    hand_in = _read_json(root / "grade.json")
    if hand_in:
        hand_in = {"label": "hand-in", "mflops": hand_in["mflops"], "accuracy": hand_in["score_accuracy"]}
    return points, hand_in


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of ``rows``; ``columns`` maps each key to its format spec ('' for str)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k), spec) for k, spec in columns.items()) + " |" for r in rows]
    return "\n".join(lines)
