"""Which layout suits a student fed an upsampled 32-px image? Compared on validation after a short KD run.

Each variant prunes the dense baseline in one step to the same MFLOPs target, BatchNorm
re-estimated: on the strict track by criterion (per-layer L2 at resolution weightings 0, 0.5 and
-0.5, global L2, Taylor), on the open track by stride plan first (the stem at 7 or 4, the CIFAR
layout of stem 7 and ``features.2`` at 1, one between). Then all variants that reach the target are
distilled together on the same batches from the same teacher (``distill.train_students``) and
validated on the same images; the table gives each one's training speed too, since a student on
32-px maps steps several times faster than one on 112-px maps:

    python benchmarks/student_layouts.py --baseline release/baseline/mobilenet.pt --target 20 \
        --teacher runs/distill-cpu/teacher/teacher.pt --train-images 2000 --epochs 2 --val-images 1000 \
        --out runs/layouts
    python benchmarks/student_layouts.py stem7 stem7-f4s1 cifar stem4 --baseline ... (the open track's, issue #33)

A student on 32-px maps steps several times faster than one on 112-px maps, so the fair question
is which is best after the same CPU time, not the same epochs: ``--seconds-each S`` trains each
variant alone for S seconds (its learning rate following the fraction of S spent), and
``--cache-dir`` builds the teacher's logits once for every variant (``[distill] teacher_cache``),
so that the teacher's forward does not set every variant's pace alike:

    python benchmarks/student_layouts.py stem7 stem7-f4s1 cifar stem4 --recipe distill-cpu \
        --baseline release/baseline/mobilenet.pt --teacher release/teacher/teacher.pt --train-images 45000 \
        --seconds-each 600 --val-images 5000 --cache-dir runs/teacher-cache --out runs/layouts-open
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from mobileprune.channel import StudentsConfig, prepare_students
from mobileprune.data import find_data_dir, load_cifar10, train_window
from mobileprune.distill import StudentConfig, build_teacher_cache, cache_path, read_students, train_students
from mobileprune.errors import MobilepruneError, exit_code
from mobileprune.files import write_json
from mobileprune.models import load_model, load_teacher
from mobileprune.recipes import load_recipe, section
from mobileprune.report import markdown_table
from mobileprune.train import keep_freed_memory

# One change each against per-layer L2 at a uniform ratio. Resolution weighting w scales a block's
# ratio by (resolution / 14) ** w: w > 0 prunes the 112- and 56-px blocks harder, w < 0 spares them
# (their upsampled input is smooth, but they are also the most sensitive layers in Part 1's scan).
# A "strides" entry is an open-track stride plan (models.set_strides) applied before the cut. Dense
# MFLOPs with every channel: stem 7 26.05, the CIFAR layout (stem 7, features.2 at 1: maps of
# 32/32/16/8/4 px) 92.8; stem 7 with features.4 at 1 (32/16/16/8/4) and stem 4 (56-px maps) between.
VARIANTS = {
    "l2": {},
    "l2-rw0.5": {"resolution_weighting": 0.5},
    "l2-rw-0.5": {"resolution_weighting": -0.5},
    "l2-global": {"global_pruning": True},
    "taylor": {"importance": "taylor"},
    "stem7": {"strides": {"features.0": 7}},
    "stem7-f4s1": {"strides": {"features.0": 7, "features.4": 1}},
    "cifar": {"strides": {"features.0": 7, "features.2": 1}},
    "stem4": {"strides": {"features.0": 4}},
}
COLUMNS = {"variant": "", "MFLOPs": ".2f", "params": ",", "val after pruning": ".4f", "val after KD": ".4f",
           "epochs": "", "best epoch": "", "images/s": ".0f"}


def _rate(precision: dict) -> float | None:
    """A student's training images/s in the precision it trained in, as the bf16 probe measured it
    (none where bf16 was set rather than measured)."""
    return precision.get("bf16_images_per_s" if precision["bf16"] else "fp32_images_per_s")


def run(args) -> None:
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        raise MobilepruneError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    recipe = load_recipe(args.recipe)
    baseline, teacher = load_model(args.baseline), load_teacher(args.teacher)
    data = load_cifar10(find_data_dir(args.data), **recipe.get("data", {}), test=False)
    data = replace(data, val_images=data.val_images[:args.val_images], val_labels=data.val_labels[:args.val_images])
    students, unreachable = {}, {}
    for name in args.variants:
        prune = {k: v for k, v in VARIANTS[name].items() if k != "strides"}
        config = StudentsConfig(targets=[args.target], prune={"importance": "l2", **prune},
                                strides=VARIANTS[name].get("strides", {}), val_images=args.val_images)
        try:
            prepare_students(baseline, data, config, args.out / name, device=args.device, progress=False)
        except MobilepruneError as e:  # a layout that cannot reach the target is a finding, not a stop
            print(f"{name}: {e}", flush=True)
            unreachable[name] = str(e)
            continue
        model, record = next(iter(read_students(args.out / name).values()))  # its one student
        students[name] = (model, record)
        print(f"{name}: {record['mflops']:.2f} MFLOPs, val {record['val_accuracy']:.4f} after pruning", flush=True)
    config = replace(StudentConfig.from_dict(section(recipe, "distill")), max_epochs=args.epochs)
    window = train_window(data, 0, args.train_images)
    cache = None
    if args.cache_dir:
        cache = build_teacher_cache(teacher, window.train_images,
                                    cache_path(args.cache_dir, config.translate, config.teacher_flip),
                                    config.translate, config.teacher_flip, config.bf16, device=args.device)
    if args.seconds_each:  # each alone, the same seconds: (its result, its precision, its epochs)
        config = replace(config, max_epochs=0, budget_s=args.seconds_each)
        results = {}
        for name in students:
            stage = train_students({name: students[name]}, teacher, window, config, args.out / "kd" / name,
                                   seconds=args.seconds_each, device=args.device, progress=False, cache=cache)
            results[name] = (stage["students"][name], stage["precision"][name], stage["epochs"])
    else:  # all together on the same batches, the same epochs
        stage = train_students(students, teacher, window, config, args.out / "kd", seconds=1e9,
                               device=args.device, progress=False, cache=cache)
        results = {name: (r, stage["precision"][name], stage["epochs"]) for name, r in stage["students"].items()}
    rows = [{"variant": name, "MFLOPs": students[name][1]["mflops"], "params": students[name][1]["params"],
             "val after pruning": r["val_after_pruning"], "val after KD": r["val_accuracy"],
             "epochs": epochs, "best epoch": r["best_epoch"], "images/s": _rate(precision)}
            for name, (r, precision, epochs) in results.items()]
    table = markdown_table(sorted(rows, key=lambda r: -r["val after KD"]), COLUMNS)
    print(table)
    write_json(args.out / "layouts.json", {"target": args.target, "train_images": args.train_images,
                                           "epochs": None if args.seconds_each else args.epochs,
                                           "seconds_each": args.seconds_each, "teacher_cache": bool(args.cache_dir),
                                           "val_images": args.val_images, "rows": rows,
                                           "unreachable": unreachable})
    (args.out / "layouts.md").write_text(table + "\n")


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    keep_freed_memory()  # as the CLI does: the runs compared here train as `mobileprune distill` would
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--recipe", default="distill-cpu", help="[data] and [distill] (default: distill-cpu)")
    parser.add_argument("--baseline", required=True, help="the dense model to prune")
    parser.add_argument("--teacher", required=True, help="teacher.pt (mobileprune teacher)")
    parser.add_argument("--target", type=float, default=20.0, help="MFLOPs of every variant (default 20)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of all variants together (default 2)")
    parser.add_argument("--seconds-each", type=float, help="instead: each variant alone for this many seconds")
    parser.add_argument("--cache-dir", help="build (or read) the teacher's logits of every view here")
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/layouts"))
    args = parser.parse_args(argv)
    return exit_code("student_layouts", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
