"""Spend MFLOPs where the picture is: a stem that downsamples the 224-px upsample harder, then channel pruning.

The lab's input is a 32-px CIFAR-10 image upsampled 7x to 224 px, and torchvision's stem (a 3x3
convolution at stride 2) turns it into 112-px feature maps: 40 of the dense model's 319 MFLOPs run
at 112 px and 47 at 56 px, on a picture that holds 32x32 pixels. At stem stride 7 the network sees
32-px maps instead and the dense model costs 26.05 MFLOPs with every channel kept; channel pruning
then takes it to the target with most of its width, where pruning alone keeps about a quarter.

This starts from a trained dense model (its weights do not depend on the stride), sets the stem's
stride, re-estimates BatchNorm, prunes to ``--target`` MFLOPs in one per-layer L2 step (BatchNorm
re-estimated again), then trains with `train.train` (labels; ``--kd-alpha`` adds distillation from
the dense model at 224 px, four times the cost of a step on a CPU) and keeps the best epoch on
validation. The result is a plain torchvision MobileNetV2 (`best.pt` + layout, the stride recorded
in it): `mobileprune export` and `mobileprune grade` take it as any other.

    python benchmarks/stem_stride.py --baseline release/baseline/mobilenet.pt --stride 7 --target 20 \\
        --epochs 10 --out runs/stem-stride
    python benchmarks/stem_stride.py --split     # where the MFLOPs are, by resolution, at stride 2 and 7
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mobileprune.channel import PruneStepConfig, prune_to_mflops
from mobileprune.data import INPUT_SIZE, find_data_dir, load_cifar10, train_window
from mobileprune.errors import exit_code
from mobileprune.evaluate import accuracy, count_mflops
from mobileprune.files import write_json
from mobileprune.models import load_model, save_state_with_layout, set_stem_stride
from mobileprune.train import TrainConfig, recalibrate_batchnorm, train


def mflops_by_resolution(model) -> dict[int, float]:
    """Convolution MFLOPs (multiply-adds, as the grader counts them) by output resolution, at a 224 input."""
    split: dict[int, float] = {}

    def count(module, inputs, output):
        per_pixel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        split[output.shape[-1]] = split.get(output.shape[-1], 0.0) + output.numel() * per_pixel / 1e6

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    for hook in hooks:
        hook.remove()
    return dict(sorted(split.items(), reverse=True))


def print_split(baseline: Path, stride: int) -> None:
    for name, model in (("torchvision stem (stride 2)", load_model(baseline)),
                        (f"stem stride {stride}", set_stem_stride(load_model(baseline), stride))):
        split = mflops_by_resolution(model)
        print(f"{name}: {count_mflops(model)[0]:.2f} MFLOPs; convolutions by output resolution: "
              + ", ".join(f"{size} px {mflops:.1f}" for size, mflops in split.items()))


def save_half(weights: Path, out: Path) -> Path:
    """``out/mobilenet.pt`` (+ layout): the model at ``weights`` with its floating-point tensors in fp16.

    Half the bytes in release/ (3.5 MB for this 1.7 M-parameter model), which a GPU call's upload
    carries beside two data parts; loading copies them back into fp32 parameters, so the model
    graded is exactly the one stored.
    """
    model = load_model(weights)
    model.half()
    path, _ = save_state_with_layout(model, out, "mobilenet")
    return path


def run(args) -> dict:
    started = time.time()
    dense = load_model(args.baseline)
    model = set_stem_stride(copy.deepcopy(dense), args.stride)  # bad input fails here, before the data loads
    data = load_cifar10(find_data_dir(args.data), val_size=args.val_size, test=False)
    if args.train_images:
        data = train_window(data, 0, args.train_images)
    if args.val_images:
        data = replace(data, val_images=data.val_images[:args.val_images], val_labels=data.val_labels[:args.val_images])
    # The keys of a Part 2 summary (target_mflops, mflops, val_accuracy, prune, distill): the report
    # lists the run in its Part 2 table, with its stem stride, and puts it on the accuracy plot.
    record = {"baseline": str(args.baseline), "stem_stride": args.stride, "target_mflops": args.target or None,
              "start_val": accuracy(dense, data.val_images, data.val_labels)}
    calibration = data.train_images[:args.bn_images]
    recalibrate_batchnorm(model, calibration)
    record["stride_mflops"] = count_mflops(model)[0]
    record["val_after_stride"] = accuracy(model, data.val_images, data.val_labels)
    print(f"stem stride {args.stride}: {record['stride_mflops']:.2f} MFLOPs, val {record['val_after_stride']:.4f} "
          f"before training (the start: {record['start_val']:.4f})", flush=True)
    if args.target and args.target < record["stride_mflops"]:
        model = recalibrate_batchnorm(prune_to_mflops(model, args.target, PruneStepConfig(importance="l2")), calibration)
        record["val_after_prune"] = accuracy(model, data.val_images, data.val_labels)
        record["prune"] = {"importance": "l2", "global_pruning": False}
    record["mflops"], record["params"] = count_mflops(model)
    if "prune" in record:
        print(f"pruned to {record['mflops']:.2f} MFLOPs: val {record['val_after_prune']:.4f}", flush=True)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup,
                         resize_variants=["torchvision", "runner"], kd_alpha=args.kd_alpha)
    result = train(model, data, config, args.out, teacher=dense if args.kd_alpha else None, device=args.device,
                   progress=False, desc=f"stride {args.stride}")
    record.update(val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch, epochs=args.epochs,
                  lr=args.lr, batch_size=args.batch_size, distill=args.kd_alpha > 0, kd_alpha=args.kd_alpha,
                  train_images=len(data.train_labels), val_images=len(data.val_labels),
                  seconds=round(time.time() - started, 1))
    write_json(args.out / "summary.json", record)
    print(f"best epoch {result.best_epoch}: val {result.best_val_accuracy:.4f} at {record['mflops']:.2f} MFLOPs "
          f"({record['seconds']:.0f} s); model: {args.out / 'best.pt'}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=Path("release/baseline/mobilenet.pt"))
    parser.add_argument("--stride", type=int, default=7, help="the stem's stride (torchvision's: 2)")
    parser.add_argument("--target", type=float, default=20.0, help="MFLOPs after pruning; 0: no pruning")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.04)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up, in epochs")
    parser.add_argument("--kd-alpha", type=float, default=0.0, help="> 0: distil from the dense baseline at 224 px")
    parser.add_argument("--train-images", type=int, default=0, help="0: the whole training split")
    parser.add_argument("--val-size", type=int, default=5000, help="images held out of training (the recipes' 5,000)")
    parser.add_argument("--val-images", type=int, default=0, help="validate on the first N of them; 0: all")
    parser.add_argument("--bn-images", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data")
    parser.add_argument("--out", type=Path, default=Path("runs/stem-stride"))
    parser.add_argument("--split", action="store_true", help="only print where the MFLOPs are, by resolution")
    parser.add_argument("--half", type=Path, metavar="WEIGHTS",
                        help="only write WEIGHTS (a .pt with its layout) in fp16 as --out/mobilenet.pt")
    args = parser.parse_args(argv)
    if args.split:
        return exit_code("stem_stride", lambda: print_split(args.baseline, args.stride))
    if args.half:
        return exit_code("stem_stride", lambda: print(f"wrote {save_half(args.half, args.out)}"))
    return exit_code("stem_stride", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
