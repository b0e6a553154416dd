"""Students' training throughput alone and together: does one teacher forward for N students pay?

Each student is distilled alone for one pass over the same training images, then all of them
together on the same batches (one augmentation, one teacher forward per batch, then a step of
each). Timed passes exclude validation. On one machine, so the figures compare:

    python benchmarks/distill_throughput.py --recipe distill-cpu --students runs/distill-cpu/students \
        --teacher runs/distill-cpu/teacher/teacher.pt --images 640 --out runs/distill-cpu/throughput.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace

import torch

from mobileprune.data import find_data_dir, load_cifar10
from mobileprune.distill import StudentConfig, read_students, train_students
from mobileprune.errors import exit_code
from mobileprune.files import write_json
from mobileprune.models import TeacherNet, load_teacher
from mobileprune.recipes import load_recipe, section


def one_pass(students: dict, teacher, data, config: StudentConfig, device: str) -> dict:
    """Images per second of one timed pass (each image trained by every student)."""
    with tempfile.TemporaryDirectory() as out:
        stage = train_students(students, teacher, data, config, out, seconds=1e9, device=device, progress=False)
    return {"students": sorted(students), "images": stage["train_images"], "images_per_s": stage["images_per_s"],
            "student_images_per_s": stage["student_images_per_s"]}


def run(args) -> None:
    recipe = load_recipe(args.recipe)
    config = StudentConfig.from_dict(section(recipe, "distill"))
    config = replace(config, max_epochs=1, warmup=0.0, eval_batch_size=config.batch_size)
    students = read_students(args.students)
    if args.teacher:
        teacher = load_teacher(args.teacher)
    else:  # throughput does not depend on the weights
        teacher = TeacherNet(**{k: section(recipe, "teacher")[k] for k in ("widths", "depth")
                                if k in section(recipe, "teacher")})
    # A token validation split: the pass is what is timed, not the evaluation after it.
    data = load_cifar10(find_data_dir(args.data), val_size=config.batch_size, train_limit=args.images, test=False)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows = [one_pass({name: student}, teacher, data, config, args.device) for name, student in students.items()]
    together = one_pass(students, teacher, data, config, args.device)
    alone_seconds = sum(len(data.train_labels) / r["images_per_s"] for r in rows)
    together_seconds = len(data.train_labels) / together["images_per_s"]
    result = {"device": args.device, "threads": torch.get_num_threads(), "batch_size": config.batch_size,
              "resolution": config.resolution, "teacher": args.teacher or "untrained (same shape)",
              "alone": rows, "together": together, "alone_seconds": alone_seconds,
              "together_seconds": together_seconds, "speedup_together": alone_seconds / together_seconds}
    for r in rows:
        print(f"{r['students'][0]:<14} alone:    {r['images_per_s']:8.1f} img/s")
    print(f"all {len(rows)} together: {together['images_per_s']:8.1f} img/s ({together['student_images_per_s']:.1f} "
          f"student-images/s); one pass alone each {alone_seconds:.1f} s in all, together {together_seconds:.1f} s "
          f"({result['speedup_together']:.2f}x)")
    if args.out:
        write_json(args.out, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="distill-cpu", help="recipe whose [distill] table sets batch and "
                                                               "resolution (default: distill-cpu)")
    parser.add_argument("--students", required=True, help="folder of students (mobileprune students)")
    parser.add_argument("--teacher", help="teacher.pt (default: an untrained one of the recipe's shape)")
    parser.add_argument("--images", type=int, default=640, help="training images per pass (default 640)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    return exit_code("distill_throughput", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
