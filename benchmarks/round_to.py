"""Does rounding channel counts to multiples of 4/8/16 make the XNNPACK .pte faster?

XNNPACK packs channels in SIMD-width tiles, so a layer with 37 channels may cost what 40 cost;
rounding to multiples wastes no lanes but, at the same MFLOPs budget, leaves fewer channels
elsewhere. This prunes one model to each target with each ``round_to`` (one step, per-layer L2,
landing as ``prune_to_mflops`` does), exports each ``.pte`` and times it with ``mobileprune bench``
(each model in a fresh process). Run it on an otherwise idle machine:

    python benchmarks/round_to.py --baseline runs/cpu-small/baseline/mobilenet.pth --targets 45 20
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mobileprune.bench import bench
from mobileprune.channel import PruneStepConfig, prune_to_mflops
from mobileprune.errors import MobilepruneError
from mobileprune.evaluate import count_mflops
from mobileprune.export import export_pte
from mobileprune.models import build_mobilenet_v2, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="model to prune (default: a freshly built dense MobileNetV2)")
    parser.add_argument("--targets", type=float, nargs="+", default=[45.0, 20.0])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    baseline = load_model(args.baseline) if args.baseline else build_mobilenet_v2().eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for target in args.targets:
            for multiple in args.round_to:
                config = PruneStepConfig(round_to=multiple if multiple > 1 else None)
                try:
                    model = prune_to_mflops(baseline, target, config)
                except MobilepruneError as e:
                    rows.append({"target": target, "round_to": multiple, "error": str(e)})
                    continue
                mflops, params = count_mflops(model)
                path = export_pte(model, Path(tmp) / f"t{target:g}_r{multiple}.pte")
                files[path] = {"target": target, "round_to": multiple, "mflops": mflops, "params": params}
        timings = bench(list(files), threads=tuple(args.threads), warmup=10, repeats=args.repeats)
        for path, info in files.items():
            row = dict(info)
            for t in timings:
                if Path(t.model) == path:
                    row[f"ms@{t.threads}"] = t.median_ms
            rows.append(row)

    header = ["target", "round_to", "mflops", "params"] + [f"ms@{n}" for n in args.threads]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in sorted(rows, key=lambda r: (-r["target"], r["round_to"])):
        if "error" in row:
            print(f"| {row['target']:g} | {row['round_to']} | not reached: {row['error']} |")
            continue
        print(f"| {row['target']:g} | {row['round_to']} | {row['mflops']:.2f} | {row['params']:,} | "
              + " | ".join(f"{row[f'ms@{n}']:.3f}" for n in args.threads) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
