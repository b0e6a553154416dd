"""Issue #34's question: do most epochs at 112 px and a finish at 224 teach the hand-in more per CPU
second than every epoch at 224? Reads distill runs made at the same --budget-s (each one a whole
schedule: the lr falls to 0 at the budget) and draws their validation against the seconds spent.

    mobileprune students --recipe handin-kd-cpu --baseline release/prune/mobilenet.pth --with-start \
        --out runs/handin-kd/students
    mobileprune distill --recipe handin-kd-cpu-112 --teacher release/teacher/teacher.pt \
        --cache-dir runs/teacher-cache --students runs/handin-kd/students --out runs/handin-kd/cmp-112 --budget-s 2400
    mobileprune distill --recipe handin-kd-cpu --teacher release/teacher/teacher.pt \
        --cache-dir runs/teacher-cache --students runs/handin-kd/students --out runs/handin-kd/cmp-224 --budget-s 2400
    python benchmarks/resolution_schedule.py "112 then 224=runs/handin-kd/cmp-112" "224=runs/handin-kd/cmp-224" \
        --figure docs/figures/handin-resolution.png --json docs/measurements/handin-resolution-<date>.json
"""
import argparse
import json
import platform
from pathlib import Path

from mobileprune.files import read_csv
from mobileprune.report import plot_distill


def summarise(rows: list[dict]) -> dict:
    """A run's end (its last epoch), best epoch at 224 and cost, from a student's history.csv rows."""
    last = rows[-1]  # None at 224 if the run stopped before its finish at 224
    best = max(rows, key=lambda r: max(r["val_accuracy"] or 0, r.get("val_ema") or 0))
    return {"epochs": len(rows), "seconds": last["spent"], "images": sum(r["images"] for r in rows),
            "train_resolutions": sorted({r.get("train_resolution") for r in rows if r.get("train_resolution")}),
            "val_last": last["val_accuracy"], "val_ema_last": last.get("val_ema"),
            "val_best": max(best["val_accuracy"] or 0, best.get("val_ema") or 0), "best_epoch": best["epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=DIR: a student's folder, a distill --out folder with one "
                                                "student, or a variant's under student_layouts.py's kd/")
    parser.add_argument("--figure", default="runs/handin-resolution.png")
    parser.add_argument("--json", help="write the table here as well")
    parser.add_argument("--title", default="Runs trained apart, by the seconds each spent")
    args = parser.parse_args()
    histories, table, folders = {}, {}, {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        if not label:
            parser.error(f"{spec!r}: give each run as LABEL=DIR")
        # the student's own folder, or a run's student-*/ or a layout study's variant/ (never the
        # teacher a distill run trained itself)
        files = [Path(folder) / "history.csv"] if (Path(folder) / "history.csv").is_file() else \
            sorted(f for f in Path(folder).glob("*/history.csv") if f.parent.name != "teacher")
        if len(files) != 1:
            parser.error(f"{folder}: expected one */history.csv (one student), found {len(files)}")
        folders[label] = folder
        histories[label] = read_csv(files[0])
        table[label] = summarise(histories[label])
    plot_distill(histories, args.figure, title=args.title)
    print("| run | epochs | seconds | images | last (EMA) at 224 | best at 224 (epoch) |")
    print("|---|---|---|---|---|---|")
    for label, r in table.items():
        last = "–" if r["val_last"] is None else f"{r['val_last']:.4f}"
        ema = f" ({r['val_ema_last']:.4f})" if r["val_ema_last"] is not None else ""
        print(f"| {label} | {r['epochs']} | {r['seconds']:.0f} | {r['images']} | {last}{ema} "
              f"| {r['val_best']:.4f} ({r['best_epoch']}) |")
    print(f"figure: {args.figure}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                               "runs": {label: {"folder": folders[label], **table[label]}
                                                        for label in table}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
