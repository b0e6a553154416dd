"""What the teacher cache saves and costs: the same students distilled on the fly and from the cache.

Same teacher, students, seed, batches and epochs; the runs differ only in where each batch's
targets come from. On the fly, the teacher runs on every batch's own augmented view; from the
cache (`[distill] teacher_cache`), its logits were computed once for the finite set of views a
batch can draw ((2 translate + 1)^2 crop offsets, mirror-averaged) and are read back. The cache
is built first, timed on its own: its cost, the students' seconds per epoch both ways and the
epochs after which it has paid for itself are printed beside each student's validation accuracy.

    python benchmarks/teacher_cache.py --teacher runs/teacher-cpu/teacher.pt --students runs/open/students \
        --train-limit 10000 --epochs 4 --translate 1 --json docs/measurements/teacher-cache.json
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mobileprune.data import find_data_dir, load_cifar10
from mobileprune.distill import (StudentConfig, build_teacher_cache, load_teacher, read_students,
                                 train_students)
from mobileprune.errors import MobilepruneError, exit_code
from mobileprune.files import write_json
from mobileprune.train import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # as the CLI does: the runs compared here train as `mobileprune distill` would
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a trained teacher (teacher.pt of `mobileprune teacher`)")
    parser.add_argument("--students", required=True, help="a folder of students (`mobileprune students`)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each run (default 4)")
    parser.add_argument("--translate", type=int, default=1, help="crop offsets each way (default 1: 9 views)")
    parser.add_argument("--batch-size", type=int, default=128, help="the students' batch (default 128)")
    parser.add_argument("--train-limit", type=int, help="first N training images only (default: all 45,000)")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images held out (default 5,000)")
    parser.add_argument("--resolution", type=int, default=224, help="the students' input (default 224, the lab's)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast: auto (a measured probe per model, as the recipes), on or off")
    parser.add_argument("--data", help="CIFAR-10 folder (default: as every mobileprune command)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    return exit_code("teacher_cache", lambda: run(args))


def run(args) -> None:
    if args.epochs <= 0 or args.translate < 0:
        raise MobilepruneError(f"--epochs {args.epochs} and --translate {args.translate}: need epochs above 0 "
                               "and translate 0 or more")
    for path in (Path(args.teacher), Path(args.students)):
        if not path.exists():
            raise MobilepruneError(f"{path}: no such file or folder")
    students = read_students(args.students)
    teacher = load_teacher(args.teacher)
    data = load_cifar10(find_data_dir(args.data), val_size=args.val_size, train_limit=args.train_limit,
                        test=False)
    bf16 = {"auto": "auto", "on": True, "off": False}[args.bf16]
    config = dict(budget_s=0, max_epochs=args.epochs, translate=args.translate, batch_size=args.batch_size,
                  resolution=args.resolution, reserve_s=0, bf16=bf16)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        cache = build_teacher_cache(teacher, data.train_images, Path(tmp) / "cache.pt", args.translate,
                                    bf16=bf16, log=False)
        cache_seconds = time.monotonic() - started
        print(f"cache: {(2 * args.translate + 1) ** 2} views of {len(data.train_labels):,} images in "
              f"{cache_seconds:.0f} s")
        for name, use_cache in (("on the fly", False), ("cached", True)):
            stage = train_students(students, teacher, data, StudentConfig(**config, teacher_cache=use_cache),
                                   Path(tmp) / name.replace(" ", "-"), None, progress=False, log_epochs=False,
                                   cache=cache if use_cache else None)
            runs[name] = {"seconds": stage["seconds"], "seconds_per_epoch": stage["seconds"] / args.epochs,
                          "val_accuracy": {s: r["val_accuracy"] for s, r in stage["students"].items()}}
            print(f"{name}: {runs[name]['seconds_per_epoch']:.0f} s an epoch; validation " +
                  ", ".join(f"{s} {v:.4f}" for s, v in runs[name]["val_accuracy"].items()))
    saved = runs["on the fly"]["seconds_per_epoch"] - runs["cached"]["seconds_per_epoch"]
    break_even = cache_seconds / saved if saved > 0 else None
    print(f"the cache saves {saved:.0f} s an epoch and pays for itself after "
          + (f"{break_even:.1f} epochs" if break_even else "never (no epoch is faster)"))
    if args.json:
        write_json(args.json, {"epochs": args.epochs, "translate": args.translate, "batch_size": args.batch_size,
                               "train_images": len(data.train_labels), "teacher": args.teacher,
                               "cache_seconds": cache_seconds, "runs": runs, "break_even_epochs": break_even})


if __name__ == "__main__":
    raise SystemExit(main())
