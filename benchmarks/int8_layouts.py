"""Would int8 beat fp32 if the hand-in's channel counts were multiples of a SIMD tile?

On this x86 CPU the int8 hand-in runs no faster than the fp32 one: XNNPACK's int8 depthwise kernels
are slower than its fp32 ones at the hand-in's channel counts (10, 24, 49, …; docs/method.md,
"Why int8 is no faster here"). XNNPACK processes channels in tiles (8 or 16 floats, 16 to 64
int8 values per AVX-512 register), so a layer of 49 channels may cost what 64 cost in int8 and
what 56 cost in fp32. This takes a pruned model's channel layout (by default the released hand-in's), rounds
every channel count to the nearest multiple of each ``--multiple`` (at least one multiple; the
network's 3 input channels and 10 classes stay), builds each layout with fresh random weights,
exports an fp32 and an int8 program of it, and times them all in one interleaved
``mobileprune bench``. Latency does not depend on the weights' values, so no training is needed:
the int8 ranges are calibrated on random images and the programs' accuracy means nothing. MFLOPs
change with the rounding and are printed beside each time. Run it on an otherwise idle machine:

    python benchmarks/int8_layouts.py release/prune/mobilenet.pth --out runs/int8-layouts
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mobileprune.bench import bench
from mobileprune.errors import MobilepruneError, exit_code, quiet_libraries
from mobileprune.evaluate import count_mflops
from mobileprune.export import export_int8_pte, export_pte
from mobileprune.files import write_json
from mobileprune.models import channel_layout, load_model, model_from_layout
from mobileprune.report import markdown_table

COLUMNS = {"multiple": "", "MFLOPs": ".2f", "params": ",", "program": "", "ms, 1 thread": ".3f",
           "ms, 2 threads": ".3f", "int8 speed-up": ".2f"}


def rounded_layout(layout: dict, multiple: int) -> dict:
    """``layout`` with every channel count rounded to the nearest multiple of ``multiple`` (≥ one).

    One function of the count for every layer keeps what must agree in agreement: a depthwise
    layer's in, out and groups, a block's input and the residual added to it. The RGB input and
    the classes are left as they are.
    """
    def rounded(count: int) -> int:
        return max(multiple, multiple * round(count / multiple))

    layers = {}
    for name, shape in layout["layers"].items():
        new = {key: rounded(value) if key != "groups" or value > 1 else 1 for key, value in shape.items()}
        if name == "features.0.0":
            new["in"] = shape["in"]
        if name.startswith("classifier"):
            new["out"] = shape["out"]
        layers[name] = new
    return {**layout, "layers": layers}


def run(args) -> None:
    quiet_libraries()
    if any(multiple < 1 for multiple in args.multiple):
        raise MobilepruneError(f"--multiple {' '.join(map(str, args.multiple))}: whole numbers from 1")
    layout = channel_layout(load_model(args.model))
    torch.manual_seed(0)
    random_images = torch.randint(0, 256, (72, 3, 32, 32), dtype=torch.uint8)  # latency only: no data needed
    args.out.mkdir(parents=True, exist_ok=True)
    programs = {}
    for multiple in args.multiple:
        model = model_from_layout(rounded_layout(layout, multiple)).eval()
        mflops, params = count_mflops(model)
        info = {"multiple": multiple, "MFLOPs": mflops, "params": params}
        programs[export_pte(model, args.out / f"m{multiple}.pte")] = {**info, "program": "fp32"}
        path = args.out / f"m{multiple}.int8.pte"
        export_int8_pte(model, path, random_images[:64], random_images[64:])
        programs[path] = {**info, "program": "int8"}
        print(f"multiple {multiple}: {mflops:.2f} MFLOPs, exported", flush=True)
    timings = bench(list(programs), threads=(1, 2), warmup=10, repeats=args.repeats, rounds=args.rounds)
    ms = {(Path(t.model), t.threads): t.median_ms for t in timings}
    rows = []
    for path, info in programs.items():
        row = {**info, "ms, 1 thread": ms[path, 1], "ms, 2 threads": ms[path, 2], "int8 speed-up": None}
        if info["program"] == "int8":
            row["int8 speed-up"] = ms[path.with_name(f"m{info['multiple']}.pte"), 1] / ms[path, 1]
        rows.append(row)
    write_json(args.out / "int8_layouts.json", {"model": str(args.model), "rows": rows})
    table = markdown_table(rows, COLUMNS)
    (args.out / "int8_layouts.md").write_text(f"`{' '.join(sys.argv)}`\n\n{table}\n")
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=Path("release/prune/mobilenet.pth"),
                        help="the pruned model whose layout is rounded (default: the released hand-in)")
    parser.add_argument("--multiple", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/int8-layouts"))
    return exit_code("int8_layouts", lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
