"""What post-training int8 costs a pruned model, and what cheaply wins it back, measured on validation.

Each variant quantizes the same model (``export.export_int8_pte``) with one change against the
default (1,024 calibration images, min/max observer, every operator int8): fewer or more
calibration images, the histogram observer, the first conv and the classifier kept in fp32.
Calibration images are the first training images, checks the next 64; every program is measured
on the validation split through the ExecuTorch runtime with the lab runner's resize, beside the
fp32 program of the same model. The choice is made here, on validation; the hand-in's int8 test
figure comes from ``mobileprune grade`` after.

    python benchmarks/int8_calibration.py release/prune/mobilenet.pth --out runs/int8-calibration
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mobileprune.data import find_data_dir, load_cifar10
from mobileprune.errors import exit_code, quiet_libraries
from mobileprune.evaluate import accuracy
from mobileprune.export import CALIBRATION_IMAGES, INT8_OBSERVER, PteModel, export_int8_pte, export_pte, set_runtime_threads
from mobileprune.files import write_json
from mobileprune.models import load_model
from mobileprune.report import markdown_table

CHECK_IMAGES = 64
VARIANTS = {
    "int8": {},
    "int8, 256 calibration images": {"calibration": 256},
    "int8, 4,096 calibration images": {"calibration": 4096},
    "int8, histogram observer": {"observer": "histogram"},
    "int8, first conv + classifier fp32": {"keep_fp32": ("features.0", "classifier")},
}
COLUMNS = {"program": "", "calibration images": ",", "val accuracy": ".4f", "vs fp32 (points)": "+.2f",
           "logit error": ".3f", "export s": ".0f"}


def run(args) -> None:
    quiet_libraries()
    set_runtime_threads(1)  # sized before first use; these runs measure accuracy, not speed
    model = load_model(args.model)
    data = load_cifar10(find_data_dir(args.data), test=False)
    val_images, val_labels = data.val_images[:args.val_images], data.val_labels[:args.val_images]
    args.out.mkdir(parents=True, exist_ok=True)
    fp32 = export_pte(model, args.out / "fp32.pte")
    reference = accuracy(PteModel(fp32), val_images, val_labels, "runner")
    rows = [{"program": "fp32", "calibration images": 0, "val accuracy": reference, "vs fp32 (points)": 0.0,
             "logit error": 0.0, "export s": 0.0}]
    print(f"fp32: val {reference:.4f}", flush=True)
    for index, (name, change) in enumerate(VARIANTS.items()):
        count = change.get("calibration", CALIBRATION_IMAGES)
        started = time.perf_counter()
        path = args.out / f"int8-{index}.pte"
        check = export_int8_pte(model, path, data.train_images[:count],
                                data.train_images[count:count + CHECK_IMAGES],
                                keep_fp32=change.get("keep_fp32", ()), observer=change.get("observer", INT8_OBSERVER))
        seconds = time.perf_counter() - started
        found = accuracy(PteModel(path), val_images, val_labels, "runner")
        rows.append({"program": name, "calibration images": count, "val accuracy": found,
                     "vs fp32 (points)": 100 * (found - reference), "logit error": check["relative_error"],
                     "export s": seconds, "file": path.name})
        print(f"{name}: val {found:.4f} ({100 * (found - reference):+.2f} points), export {seconds:.0f} s",
              flush=True)
    write_json(args.out / "int8_calibration.json", {"model": str(args.model), "val_images": len(val_labels),
                                                    "resize": "runner", "rows": rows})
    table = markdown_table(rows, COLUMNS)
    (args.out / "int8_calibration.md").write_text(f"`{' '.join(sys.argv)}`\n\n{table}\n")
    print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the pruned model (.pth, or .pt with its layout)")
    parser.add_argument("--out", type=Path, default=Path("runs/int8-calibration"))
    parser.add_argument("--val-images", type=int, default=5000, help="validation images measured (default all 5,000)")
    parser.add_argument("--data", help="CIFAR-10 folder (default: found as mobileprune finds it)")
    return exit_code("int8_calibration", lambda: run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
