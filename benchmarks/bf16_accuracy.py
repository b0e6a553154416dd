"""Does bf16 autocast cost accuracy? The same short teacher run in fp32 and in bf16, on validation.

Same seed, same batches, same schedule: the two runs differ only in the precision of the forward
and backward passes (the optimizer's weights stay fp32 either way), so the gap between their
validation accuracies is what bf16 costs, next to their images/s. The run is a small airbench-
shaped teacher (64/256/256, depth 2, airbench94's widths) for a few epochs of the 45,000 training
images: minutes on a 2-core CPU, long enough that the gap is not noise at epoch 0.

    python benchmarks/bf16_accuracy.py --epochs 3 --json docs/measurements/bf16-accuracy.json
"""
from __future__ import annotations

import argparse
import tempfile

from mobileprune.data import find_data_dir, load_cifar10
from mobileprune.distill import TeacherConfig, train_teacher
from mobileprune.errors import MobilepruneError, exit_code
from mobileprune.files import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=3.0, help="epochs of each run (default 3)")
    parser.add_argument("--widths", type=int, nargs=3, default=[64, 256, 256], help="teacher widths (default 64 256 256)")
    parser.add_argument("--depth", type=int, default=2, help="convolutions per group (default 2)")
    parser.add_argument("--train-limit", type=int, help="first N training images only (default: all 45,000)")
    parser.add_argument("--data", help="CIFAR-10 folder (default: as every mobileprune command)")
    parser.add_argument("--json", help="also write the two runs' figures here")
    args = parser.parse_args(argv)
    return exit_code("bf16_accuracy", lambda: run(args))


def run(args) -> None:
    if args.epochs <= 0:
        raise MobilepruneError(f"--epochs {args.epochs:g}: must be above 0")
    data = load_cifar10(find_data_dir(args.data), train_limit=args.train_limit, test=False)
    rows = []
    for bf16 in (False, True):
        config = TeacherConfig(widths=args.widths, depth=args.depth, epochs=args.epochs, bf16=bf16, tta_level=0)
        with tempfile.TemporaryDirectory() as out:
            _, summary = train_teacher(data, config, out, progress=False)
        rows.append({"precision": "bf16" if bf16 else "fp32", "val_accuracy": summary["val_accuracy"],
                     "train_seconds": summary["seconds"], "epochs": args.epochs})
        print(f"{rows[-1]['precision']}: validation {summary['val_accuracy']:.4f} after {args.epochs:g} epochs, "
              f"{rows[-1]['train_seconds'] / 60:.1f} min")
    gap = rows[1]["val_accuracy"] - rows[0]["val_accuracy"]
    speed = rows[0]["train_seconds"] / rows[1]["train_seconds"]
    print(f"bf16 - fp32: {gap * 100:+.2f} points of validation accuracy, {speed:.2f}x the speed")
    if args.json:
        write_json(args.json, {"widths": args.widths, "depth": args.depth, "runs": rows, "gap": gap, "speed": speed})


if __name__ == "__main__":
    raise SystemExit(main())
