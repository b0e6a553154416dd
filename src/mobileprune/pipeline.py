"""The whole job from one recipe: baseline (if missing) -> Part 1 -> Part 2 -> hand-in -> grade -> report.

Every stage writes under ``runs/<recipe>/`` and is skipped when its output is already there, so a
second ``mobileprune run`` resumes where the first stopped.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import MobilepruneError
from .files import write_json


def train_baseline(recipe: dict, data, out_dir: str | Path, device: str = "cpu", resume: bool = True,
                   epochs: int | None = None, progress: bool = True) -> dict:
    """Train the dense baseline of ``recipe``'s ``[baseline]`` table; write mobilenet.pth and summary.json.

    The test accuracy is measured at the recipe's ``eval_resolution``, as its validation was.
    """
    from .evaluate import accuracy, count_mflops
    from .models import build_mobilenet_v2, save_pickled_model
    from .recipes import section
    from .train import TrainConfig, train

    config = TrainConfig.from_dict(section(recipe, "baseline"))
    if epochs:
        config.epochs = epochs
    out = Path(out_dir)
    result = train(build_mobilenet_v2(), data, config, out, resume=resume, device=device, progress=progress,
                   desc="baseline")
    save_pickled_model(result.model, out / "mobilenet.pth")
    mflops, params = count_mflops(result.model)
    summary = {"recipe": recipe["name"], "best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy,
               "test_accuracy": accuracy(result.model, data.test_images, data.test_labels, device=device,
                                         size=config.eval_resolution),
               "test_images": len(data.test_labels), "mflops": mflops, "params": params}
    write_json(out / "summary.json", summary)
    return summary


def run_pipeline(recipe: dict, data_dir: str | Path, out_root: str | Path, device: str = "cpu",
                 progress: bool = True, grade_limit: int | None = None, log=print) -> Path:
    """Run every stage of ``recipe`` on the CIFAR-10 folder ``data_dir``; returns the report's path.

    The hand-in is graded on ``data_dir``'s test batch (its first ``grade_limit`` images).
    """
    from .channel import ScheduleConfig, run_schedule
    from .data import load_cifar10
    from .evaluate import format_grade, grade, save_grade
    from .finegrained import run_finegrained
    from .models import load_model
    from .report import draw_plots, write_report

    root = Path(out_root)
    data = load_cifar10(Path(data_dir), **recipe.get("data", {}))
    baseline_pth = root / "baseline" / "mobilenet.pth"
    if not baseline_pth.is_file():
        if "baseline" not in recipe:
            raise MobilepruneError(f"{baseline_pth}: no baseline and recipe {recipe['name']!r} has no [baseline]")
        log(f"[1/4] training the dense baseline ({recipe['name']} recipe) -> {baseline_pth.parent}")
        train_baseline(recipe, data, root / "baseline", device=device, progress=progress)
    else:
        log(f"[1/4] baseline found: {baseline_pth}")
    baseline = load_model(baseline_pth)

    if "finegrained" in recipe and not (root / "finegrained" / "summary.json").is_file():
        log("[2/4] Part 1: fine-grained pruning")
        run_finegrained(baseline, data, recipe["finegrained"], root / "finegrained", device=device, progress=progress)
        draw_plots(root / "finegrained")
    else:
        log("[2/4] Part 1: " + ("done already" if "finegrained" in recipe else "not in this recipe"))

    if "prune" not in recipe:
        raise MobilepruneError(f"recipe {recipe['name']!r} has no [prune] table: nothing to hand in")
    if not (root / "prune" / "summary.json").is_file():
        log("[3/4] Part 2: channel pruning")
        run_schedule(baseline, data, ScheduleConfig.from_dict(recipe["prune"]), root / "prune", device=device,
                     progress=progress)
        draw_plots(root / "prune")
    else:
        log("[3/4] Part 2: done already")

    submission = root / "submission"
    (submission / "model").mkdir(parents=True, exist_ok=True)
    for name in ("mobilenet.pth", "mobilenet.pte"):
        if (root / "prune" / name).is_file():
            shutil.copy(root / "prune" / name, submission / "model" / name)
    log(f"[4/4] grading the hand-in {submission}")
    result = grade(submission, data=data_dir, limit=grade_limit, device=device, progress=progress)
    save_grade(result, root)
    log(format_grade(result))
    report = write_report(root)
    log(f"report: {report}")
    return report


def run_demo(recipe: dict, data_dir: str | Path, out_root: str | Path, device: str = "cpu", progress: bool = True,
             log=print) -> dict:
    """What mobileprune does, in minutes on a CPU, with real figures (``make run``).

    The released hand-in is packaged into the lab's zip and graded as the lab does (all 10,000 test
    images, .pth and .pte, both resize variants); its .pte is timed against the dense model's; and
    one real channel-pruning step from the released dense baseline, with a brief distilled
    recovery on a few training images, shows the method itself (a demonstration: its accuracy
    after so little training is not a result). Resumable like ``run_pipeline``.
    """
    from .bench import bench, format_bench
    from .channel import ScheduleConfig, run_schedule
    from .data import load_cifar10
    from .evaluate import format_grade, save_grade
    from .export import INT8_PTE, export_pte
    from .models import load_model
    from .package import package
    from .recipes import section
    from .report import draw_plots, write_report

    demo = section(recipe, "demo")
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    hand_in, baseline_path = Path(demo["hand_in"]), Path(demo["baseline"])
    for path in (hand_in / "mobilenet.pth", hand_in / "mobilenet.pte", baseline_path):
        if not path.is_file():
            raise MobilepruneError(f"{path}: not there (the [demo] table names the released hand-in and baseline)")

    log(f"[1/4] packaging the released hand-in {hand_in} into the lab's zip and grading it as the lab does")
    archive, graded = package(demo.get("student_id", "demo"), hand_in, root, data=data_dir, progress=progress)
    save_grade(graded, root)
    log(format_grade(graded))

    log(f"[2/4] timing the hand-in's .pte (and its int8 program, when released) against the dense model's "
        f"({baseline_path})")
    dense_pte = root / "dense.pte"
    if not dense_pte.is_file():
        export_pte(load_model(baseline_path), dense_pte)
    programs = [dense_pte, hand_in / "mobilenet.pte"] + [p for p in [hand_in / INT8_PTE] if p.is_file()]
    timings = bench(programs, warmup=5, repeats=int(demo.get("bench_repeats", 30)))
    (root / "bench.txt").write_text(format_bench(timings) + "\n")
    log(format_bench(timings))

    log(f"[3/4] a pruning demonstration: one channel-pruning step from {baseline_path}, then a brief recovery")
    data = load_cifar10(Path(data_dir), **recipe.get("data", {}))
    config = ScheduleConfig.from_dict(dict(section(recipe, "prune")))
    pruned = run_schedule(load_model(baseline_path), data, config, root / "prune-demo", device=device,
                          progress=progress)
    draw_plots(root / "prune-demo")
    rows = json.loads((root / "prune-demo" / "step_1" / "done.json").read_text())
    log(f"demo: {rows['mflops']:.2f} MFLOPs, validation {rows['val_pruned']:.4f} right after pruning, "
        f"{pruned['val_accuracy']:.4f} after {len(data.train_labels):,} training images of recovery "
        f"(first {len(data.val_labels):,} validation images; a demonstration, not a result)")

    report = write_report(root)
    log("[4/4] done")
    log(f"hand-in zip: {archive}  (MFLOPs {graded.mflops:.2f}, .pte accuracy {graded.score_accuracy:.4f}, "
        f"lab score {graded.score:.2f} %)")
    log(f"report: {report}; the release's report and plot: release/REPORT.md, release/accuracy_vs_mflops.png")
    return {"grade": graded.to_dict(), "demo": pruned}
