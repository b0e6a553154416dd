"""First minute on a GPU machine: do the CUDA paths run, and how fast is an epoch?

Random CIFAR-shaped data (no dataset needed), so it can run while the real data is still on its
way. It trains the dense model one short epoch per resolution (bf16, channels_last), prunes it to
20 MFLOPs with a fine-tuning step under KD, and runs Part 1 with a two-point scan, all on CUDA, and
prints images per second for each, so the release recipes' epochs can be fitted to the time left:

    PYTHONPATH=src python3 benchmarks/gpu_smoke.py [--images 10240]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mobileprune.channel import ScheduleConfig, run_schedule
from mobileprune.data import Cifar10
from mobileprune.finegrained import run_finegrained
from mobileprune.models import build_mobilenet_v2
from mobileprune.train import TrainConfig, train


def random_cifar(n_train: int, n_eval: int = 512) -> Cifar10:
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)

    return Cifar10(*split(n_train), *split(n_eval), *split(n_eval))


def images_per_second(history: list[dict], n: int) -> float:
    return n / history[-1]["seconds"]  # the last epoch: cuDNN's autotuning is behind it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10240)
    parser.add_argument("--device", default="cuda", help="cpu only to check this script itself")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="dense training resolutions")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA device")
    print(torch.cuda.get_device_name() if device == "cuda" else "cpu", torch.__version__, flush=True)
    data = random_cifar(args.images)
    out = Path(tempfile.mkdtemp())
    for size in args.sizes:
        config = TrainConfig(epochs=2, batch_size=512, resolutions=[size], warmup_epochs=0)
        result = train(build_mobilenet_v2(), data, config, out / f"dense{size}", device=device, progress=False)
        print(f"dense train @{size}px: {images_per_second(result.history, args.images):.0f} img/s", flush=True)
    dense = result.model.cpu()

    started = time.time()
    schedule = ScheduleConfig(target_mflops=20, steps=2, distill=True, export=False,
                              finetune={"epochs": 2, "batch_size": 512, "kd_alpha": 0.7, "warmup_epochs": 0})
    summary = run_schedule(dense, data, schedule, out / "prune", device=device, progress=False)
    history = (out / "prune" / "step_2" / "finetune" / "history.csv").read_text().splitlines()
    seconds = float(history[-1].split(",")[-1])
    print(f"prune to {summary['mflops']:.2f} MFLOPs in 2 steps: {time.time() - started:.0f}s; "
          f"KD fine-tune @224px of the 20-MFLOP model: {args.images / seconds:.0f} img/s", flush=True)

    started = time.time()
    settings = {"target_size": 0.3, "scan_sparsities": [0.5, 0.9], "scan_images": 512, "export": False,
                "train": {"epochs": 1, "batch_size": 512, "kd_alpha": 0.7, "warmup_epochs": 0}}
    s = run_finegrained(dense, data, settings, out / "finegrained", device=device, progress=False)
    print(f"Part 1 (scan, prune to {s['relative_size_after']:.1%}, 1 KD epoch): {time.time() - started:.0f}s")
    if device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
