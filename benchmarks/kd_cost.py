"""What distillation costs in training time: the same pass over the same images, labels alone and with KD.

The teacher (the dense model) runs a forward pass on every training batch, so a distilled pass is
slower by about the teacher's FLOPs over the student's forward and backward. This measures it on one
machine, where epochs timed in different runs may come from different machines:

    python benchmarks/kd_cost.py --teacher release/baseline/mobilenet.pt 4ac0345:release/h100/prune-schedule/mobilenet.pt
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

from torch import nn

from mobileprune.data import Cifar10, find_data_dir, load_cifar10
from mobileprune.errors import exit_code
from mobileprune.evaluate import count_mflops
from mobileprune.models import load_model
from mobileprune.train import TrainConfig, train


def time_passes(student: nn.Module, teacher: nn.Module, data: Cifar10, batch_size: int, size: int = 224,
                device: str = "cpu", kd_alpha: float = 0.7) -> dict[str, float]:
    """Seconds for one pass over ``data.train`` on labels alone and distilled, from the same weights."""
    seconds = {}
    for name, alpha in (("labels alone", 0.0), ("distilled", kd_alpha)):
        config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, warmup_epochs=0, kd_alpha=alpha,
                             resolutions=[size], eval_resolution=size, resize_variants=["torchvision", "runner"])
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            train(copy.deepcopy(student), data, config, out, teacher=teacher if alpha else None,
                  device=device, progress=False, log_epochs=False)
            seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("students", nargs="+", help="models to fine-tune (.pt or .pth)")
    parser.add_argument("--teacher", required=True, help="dense model the students distil from")
    parser.add_argument("--images", type=int, default=960, help="training images per pass (default 960)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", help="CIFAR-10 folder (default: as every mobileprune command)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    return exit_code("kd_cost", lambda: run(args))


def run(args) -> None:
    # The inputs first: a bad path fails before the data loads.
    teacher = load_model(args.teacher).eval()
    students = {path: load_model(path) for path in args.students}
    # A token validation split: the pass is what is timed, not the evaluation after it.
    data = load_cifar10(find_data_dir(args.data), val_size=args.batch_size, train_limit=args.images)
    print(f"{len(data.train_labels)} training images, batch {args.batch_size}, at 224 px on {args.device}; "
          f"teacher {count_mflops(teacher)[0]:.1f} MFLOPs")
    for path, student in students.items():
        seconds = time_passes(student, teacher, data, args.batch_size, device=args.device)
        print(f"{path} ({count_mflops(student)[0]:.1f} MFLOPs): labels alone {seconds['labels alone']:.1f} s, "
              f"distilled {seconds['distilled']:.1f} s ({seconds['distilled'] / seconds['labels alone']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
