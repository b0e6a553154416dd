"""Would an fp16 program be faster than the fp32 one on a CPU with AVX512-FP16?

int8 is no faster than fp32 here (docs/method.md, "Why int8 is no faster here"): XNNPACK's int8
depthwise kernels lose what its int8 GEMMs gain. Half precision is the other narrow format XNNPACK
runs, and x86 CPUs since Sapphire Rapids (and Arm cores since ARMv8.2, a Raspberry Pi 5's among
them) compute in it natively. This exports each model as the fp32 program the hand-in uses and as
an fp16 one (weights and activations in half precision; the input cast to half on the way in and
the logits back to float on the way out, so the lab's runner feeds it as it feeds the other), checks
the fp16 program against the fp32 model on random inputs, and times them all in one interleaved
``mobileprune bench`` and, with ``--profile``, per XNNPACK operator. Accuracy is not measured
here: half precision keeps 11 significant bits, and ``mobileprune evaluate`` grades a program
that proves worth it. Run it on an otherwise idle machine:

    python benchmarks/fp16_program.py release/baseline/mobilenet.pt release/prune/mobilenet.pth
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

from mobileprune.bench import bench, format_bench, format_profile, profile
from mobileprune.errors import MobilepruneError, exit_code, quiet_libraries
from mobileprune.evaluate import count_mflops
from mobileprune.export import check_pte_agrees, export_pte
from mobileprune.files import write_json
from mobileprune.models import load_model

# fp16 rounds every activation to 11 significant bits; across 50-odd layers the logits drift by
# about 1e-2 of the largest, against the fp32 program's 1e-3.
FP16_TOLERANCE = 0.05


class HalfPrecision(nn.Module):
    """``model`` computing in fp16 behind a float interface: float images in, float logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half()).float()


def export_fp16_pte(model: nn.Module, path: Path) -> dict:
    """Write ``model`` as an fp16 XNNPACK program, checked against the fp32 ``model`` on random inputs.

    The two casts run outside the delegate, as portable kernels (XNNPACK's partitioner leaves a
    graph's input and output casts to the runtime); the profile shows what they cost."""
    half = HalfPrecision(copy.deepcopy(model).float()).eval()
    export_pte(half, path, check=False)
    inputs = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return check_pte_agrees(model.float().eval(), path, inputs, FP16_TOLERANCE)


def run(args) -> None:
    quiet_libraries()
    if not 1 <= args.rounds <= args.repeats:  # checked before minutes of exporting, not after
        raise MobilepruneError(f"--repeats {args.repeats} --rounds {args.rounds}: 1 ≤ rounds ≤ repeats")
    args.out.mkdir(parents=True, exist_ok=True)
    record, programs = {}, []
    for index, source in enumerate(args.models):
        model = load_model(source).eval()
        mflops, _ = count_mflops(model)
        stem = args.out / f"{index}.{source.stem}"
        fp32 = export_pte(model, stem.with_suffix(".fp32.pte"))
        fp16 = stem.with_suffix(".fp16.pte")
        record[str(source)] = {"MFLOPs": mflops, "fp32": str(fp32), "fp16": str(fp16),
                               **export_fp16_pte(model, fp16)}
        programs += [fp32, fp16]
        print(f"{source}: {mflops:.2f} MFLOPs, fp32 and fp16 exported", flush=True)
    timings = bench(programs, threads=(1, 2), warmup=10, repeats=args.repeats, rounds=args.rounds)
    record["bench"] = [dataclasses.asdict(t) for t in timings]
    text = f"`{' '.join(sys.argv)}`\n\n{format_bench(timings)}\n"
    if args.profile:
        text += "\n" + format_profile(profile(programs, threads=1)) + "\n"
    write_json(args.out / "fp16_program.json", record)
    (args.out / "fp16_program.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help=".pth/.pt models, each exported in fp32 and fp16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also time each program per XNNPACK operator")
    parser.add_argument("--out", type=Path, default=Path("runs/fp16-program"))
    return exit_code("fp16_program", lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
