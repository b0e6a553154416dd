"""What stale BatchNorm statistics hide: accuracy right after pruning, before and after recalibration.

A pruned model in eval mode still normalises each layer with the running mean and variance of
the dense model, whose outputs it no longer produces. This prunes a baseline (fine-grained with a
per-layer sparsity dict, and/or channel pruning to MFLOPs targets, one step each), then measures
validation accuracy with the dense statistics and after ``recalibrate_batchnorm`` on the first N
training images for each N asked. No training happens anywhere. On 2 CPU cores at 224 px:

    python benchmarks/bn_recalibration.py --baseline release/baseline/mobilenet.pt \\
        --sparsity-json 4ac0345:release/h100/finegrained-20/sparsity.json --mflops 160 45
"""
from __future__ import annotations

import argparse
import copy
import sys

from mobileprune.channel import PruneStepConfig, prune_to_mflops
from mobileprune.data import find_data_dir, load_cifar10
from mobileprune.errors import exit_code
from mobileprune.evaluate import accuracy, count_mflops
from mobileprune.files import write_json
from mobileprune.finegrained import FineGrainedPruner, read_sparsity_json, relative_size
from mobileprune.models import load_model
from mobileprune.train import recalibrate_batchnorm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="dense model (.pth or .pt)")
    parser.add_argument("--sparsity-json", help="Part 1: per-layer sparsities ({param_name: sparsity})")
    parser.add_argument("--mflops", type=float, nargs="*", default=[], help="Part 2: one-step targets")
    parser.add_argument("--images", type=int, nargs="+", default=[256, 1000],
                        help="training images to recalibrate on (each a separate estimate)")
    parser.add_argument("--val-images", type=int, default=500, help="validation images measured")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--data", help="CIFAR-10 folder (default: as every mobileprune command)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    return exit_code("bn_recalibration", lambda: run(args))


def run(args) -> None:
    baseline = load_model(args.baseline)  # the inputs first: a bad path fails before the data loads
    sparsity = read_sparsity_json(args.sparsity_json) if args.sparsity_json else None
    data = load_cifar10(find_data_dir(args.data))
    val_images, val_labels = data.val_images[:args.val_images], data.val_labels[:args.val_images]
    candidates = []
    if sparsity is not None:
        model = copy.deepcopy(baseline)
        FineGrainedPruner(model, sparsity)
        candidates.append((f"fine-grained, {relative_size(model):.2%} of dense size", model))
    for target in args.mflops:
        model = prune_to_mflops(baseline, target, PruneStepConfig())
        candidates.append((f"channels, {count_mflops(model)[0]:.2f} MFLOPs", model))

    rows = [{"model": "dense", "statistics": "its own",
             "val_accuracy": accuracy(baseline, val_images, val_labels, size=args.size)}]
    for name, model in candidates:
        rows.append({"model": name, "statistics": "the dense model's",
                     "val_accuracy": accuracy(model, val_images, val_labels, size=args.size)})
        for n in args.images:  # each estimate from scratch: recalibration forgets what came before
            recalibrate_batchnorm(model, data.train_images[:n], args.size)
            rows.append({"model": name, "statistics": f"re-estimated on {n} training images",
                         "val_accuracy": accuracy(model, val_images, val_labels, size=args.size)})
    print(f"validation accuracy on {len(val_labels)} images at {args.size} px, no training:")
    for row in rows:
        print(f"  {row['model']:<40} {row['statistics']:<38} {row['val_accuracy']:.4f}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    sys.exit(main())
