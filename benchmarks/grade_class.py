"""How long a TA waits: a class of N copies of one hand-in, graded by `mobileprune grade FOLDER --csv`.

Each copy is its own zip in the lab's layout (``model/mobilenet.pth``, ``model/mobilenet.pte``,
``ID.ipynb``), so every one is unpacked, checked and measured as a stranger's would be: the .pth
under torchvision's resize, the .pte under the runner's, on all 10,000 test images, two
submissions at a time. Prints the wall time, the time a hand-in and the time 60 would take at
that rate (a projection unless N is 60):

    python benchmarks/grade_class.py --model-dir release/prune --copies 60
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from mobileprune.errors import MobilepruneError, exit_code
from mobileprune.gradebook import grade_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="release/prune", help="folder with mobilenet.pth and mobilenet.pte")
    parser.add_argument("--copies", type=int, default=60, help="hand-ins in the class (default 60)")
    parser.add_argument("--workers", type=int, default=2, help="submissions graded at once (default 2)")
    parser.add_argument("--limit", type=int, help="first N test images only (default: all 10,000)")
    parser.add_argument("--data", help="CIFAR-10 folder (default: as every mobileprune command)")
    parser.add_argument("--keep", help="write the class's scores.csv here too")
    args = parser.parse_args(argv)
    return exit_code("grade_class", lambda: run(args))


def run(args) -> None:
    model_dir = Path(args.model_dir)
    files = [model_dir / "mobilenet.pth", model_dir / "mobilenet.pte"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MobilepruneError(f"{', '.join(missing)}: no such file (a hand-in folder: mobileprune export MODEL --out DIR)")
    if args.copies < 1 or args.workers < 1:
        raise MobilepruneError("--copies and --workers must be 1 or more")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "class"
        folder.mkdir()
        for i in range(args.copies):
            sid = f"{1000000 + i}"
            with zipfile.ZipFile(folder / f"{sid}.zip", "w", zipfile.ZIP_DEFLATED) as z:
                for f in files:
                    z.write(f, f"model/{f.name}")
                z.writestr(f"{sid}.ipynb", "{}")
        table = Path(tmp) / "scores.csv"
        started = time.perf_counter()
        rows = grade_class([folder], table, data=args.data, limit=args.limit, workers=args.workers)
        seconds = time.perf_counter() - started
        if args.keep:
            shutil.copy(table, args.keep)
    graded = sum(r["status"] == "graded" for r in rows)
    each = seconds / args.copies
    print(f"{args.copies} hand-ins of {model_dir} ({graded} graded), {args.workers} at a time: {seconds / 60:.1f} min, "
          f"{each:.1f} s a hand-in; 60 at this rate: {60 * each / 60:.1f} min"
          + ("" if args.copies == 60 else " (a projection)"))


if __name__ == "__main__":
    raise SystemExit(main())
