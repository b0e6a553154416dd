"""Does glibc's allocator cost the CPU runs time? A distill run of the hand-in at 112 px spent about 30 %
of its CPU time in the kernel (utime 13.96 s against stime 5.81 s over 10 s, 2026-12-07, 2-core Zen 4
EPYC), with 342 million minor page faults in 20 minutes: glibc hands big tensors back to the kernel
(munmap, heap trim) when they are freed and faults fresh zeroed pages in on the next step.

Each setting runs in its own process (mallopt is process-wide and set before the first big tensor):
SGD steps of the hand-in on random input, images/s and minor page faults per step.

    python benchmarks/cpu_allocator.py --model release/prune/mobilenet.pth --sizes 112 224 --steps 8
"""
import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = ("glibc-default", "no-mmap", "mmap-32m")


def child(setting: str, model_path: str, size: int, batch: int, steps: int, bf16: bool) -> dict:
    import torch

    from mobileprune.models import load_model
    from mobileprune.train import keep_freed_memory, training_rate

    if setting != "glibc-default":
        assert keep_freed_memory(setting)
    model = load_model(model_path)
    training_rate(model, size, batch, torch.device("cpu"), bf16, steps=1)  # warm: kernels, the heap
    faults, started = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    rate = training_rate(model, size, batch, torch.device("cpu"), bf16, steps=steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"setting": setting, "size": size, "bf16": bf16, "images_per_s": round(rate, 1),
            "minor_faults_per_step": round((after.ru_minflt - faults.ru_minflt) / (steps + 1)),
            "system_share": round((after.ru_stime - faults.ru_stime) / max(1e-9, time.process_time() - started), 3),
            "peak_rss_mib": round(after.ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="release/prune/mobilenet.pth")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="each setting this many times, interleaved")
    parser.add_argument("--json", help="write the rows here as well")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.sizes[0], args.batch_size, args.steps, args.bf16)))
        return
    rows = []
    for size in args.sizes:
        for _ in range(args.repeats):
            for setting in SETTINGS:
                out = subprocess.run([sys.executable, __file__, "--child", setting, "--model", args.model, "--sizes",
                                      str(size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
                                     + ["--bf16"] * args.bf16, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
