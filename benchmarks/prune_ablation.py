"""What each Part 2 choice buys: the recipe's channel-pruning schedule re-run with one change each.

Every variant starts from the same baseline (``runs/<recipe>/baseline``) and lands on the same
MFLOPs target; results go to ``runs/<recipe>/prune-<variant>/`` (resumable) and into the run's
REPORT.md table next to the recipe's own ``prune/``:

    python benchmarks/prune_ablation.py --recipe cpu-small            # all variants
    python benchmarks/prune_ablation.py --recipe lab2-45 --baseline runs/baseline/baseline/mobilenet.pth nokd
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from mobileprune.channel import ScheduleConfig, run_schedule
from mobileprune.data import find_data_dir, load_cifar10
from mobileprune.models import load_model
from mobileprune.recipes import load_recipe, section
from mobileprune.report import draw_plots, write_report
from mobileprune.train import default_device

# One change each against the recipe's [prune] table.
VARIANTS = {
    "nokd": {"distill": False},  # recovery on labels alone: what distillation buys
    "guided": {"prune": {"resolution_weighting": 0.5}},  # 112/56-px blocks pruned harder, 7-px ones less
    "global": {"prune": {"global_pruning": True}},  # one ranking across layers instead of a ratio per layer
    "taylor": {"prune": {"importance": "taylor"}},  # first-order loss change instead of weight magnitude
}


def variant_settings(prune: dict, change: dict) -> dict:
    settings = copy.deepcopy(prune)
    for key, value in change.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--recipe", default="cpu-small")
    parser.add_argument("--baseline", help="dense model (default: runs/<recipe>/baseline/mobilenet.pth)")
    parser.add_argument("--data")
    parser.add_argument("--device", default=str(default_device()))
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    root = Path("runs") / recipe["name"]
    baseline = load_model(args.baseline or root / "baseline" / "mobilenet.pth")
    data = load_cifar10(find_data_dir(args.data), **recipe.get("data", {}))
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        settings = variant_settings(section(recipe, "prune"), VARIANTS[name])
        settings["export"] = False  # latency depends on the layout only; the hand-in is prune/
        summary = run_schedule(baseline, data, ScheduleConfig.from_dict(settings), root / f"prune-{name}",
                               device=args.device, progress=False)
        draw_plots(root / f"prune-{name}")
        print(f"{name}: {summary['mflops']:.2f} MFLOPs, val {summary['val_accuracy']:.4f}, "
              f"test {summary['test_accuracy']:.4f}")
    print(f"report: {write_report(root)}")


if __name__ == "__main__":
    main()
