"""``mobileprune``: a thin command line over the library. Every bad input ends in one line, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

from .errors import VERBOSE_ENV, MobilepruneError, exit_code, quiet_libraries


def _threads(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2 (got {text!r})") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1 (got {text!r})")
    return values


def _positive_of(kind: type, name: str):
    """An argparse type: ``kind(text)`` when it is above 0, else a usage error naming ``name``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} (got {text!r})") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected {name} (got {text!r})")
        return value
    return parse


_positive = _positive_of(int, "a positive integer")
_positive_float = _positive_of(float, "a positive number")


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more (a count of images to skip, say)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more (got {text})")
    return value


def _device(text: str) -> str:
    """An argparse type: cpu, cuda or cuda:N, and only a device this machine has."""
    import re

    if text != "cpu" and not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (got {text!r})")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                                             "False); use --device cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, ``mobileprune: error: ...``, exit 2, like every other bad input."""

    def error(self, message: str):
        command = self.prog.removeprefix("mobileprune").strip()
        hint = f" (see mobileprune {command + ' ' if command else ''}--help)"
        self.exit(2, f"mobileprune: error: {command + ': ' if command else ''}{message}{hint}\n")


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (got {text!r})") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1 (got {text})")
    return value


TRUST_PICKLE = "unpickle any class (only for files you trust; by default only a MobileNetV2's classes load)"


def _add_model_stage_args(p, stage: str) -> None:
    """What a stage that reworks a trained Part 2 model without training it (average, recalibrate) takes."""
    p.add_argument("--recipe", default="lab2-45", help="recipe whose [data] sets the validation split (default: "
                                                       "lab2-45)")
    p.add_argument("--out", help=f"output folder (default: runs/<recipe>/{stage})")
    _add_device_arg(p)
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--no-export", action="store_true", help="write no .pte")
    _add_data_args(p)


def _add_device_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--device", type=_device, default=default,
                   help=f"cpu, cuda or cuda:N (default: {default or 'cuda when present, else cpu'})")


def _add_chunk_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop-after", type=_positive_float, metavar="MINUTES",
                   help="end this chunk of a long schedule at an epoch boundary before MINUTES have passed (the "
                        "state is kept; the same command resumes it; exit code 75 until the schedule is done)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="CIFAR-10 folder (binary or python format); default $MOBILEPRUNE_DATA, "
                                  "./data/cifar-10-batches-bin, ../shared/data/cifar-10-batches-bin")
    p.add_argument("--download", action="store_true", help="download the official archive if no data is found")


def _add_int8_args(p: argparse.ArgumentParser) -> None:
    from .export import CALIBRATION_IMAGES, INT8_OBSERVER

    p.add_argument("--int8", action="store_true",
                   help="also write model/mobilenet.int8.pte: post-training int8 (per-channel symmetric weights, "
                        "activations calibrated on training images), checked against the eager int8 model")
    p.add_argument("--calibration", type=_positive, default=CALIBRATION_IMAGES,
                   help=f"training images to calibrate int8 activations on (default {CALIBRATION_IMAGES:,})")
    p.add_argument("--observer", choices=("histogram", "minmax"), default=INT8_OBSERVER,
                   help=f"int8 activation ranges: minmax (the observed range) or histogram (least quantization "
                        f"error, outliers clipped); default {INT8_OBSERVER}, chosen on validation")
    p.add_argument("--keep-fp32", type=_module_names, default=(), metavar="MODULES",
                   help="comma-separated modules whose operators stay fp32 in the int8 program, e.g. "
                        "features.0,classifier")
    _add_data_args(p)


def _module_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected module names like features.0,classifier (got {text!r})")
    return names


def _add_stage_args(p: argparse.ArgumentParser, stage: str, default_recipe: str, export: bool = True) -> None:
    """What every stage that starts from the dense baseline takes: recipe, baseline, output, device, data."""
    p.add_argument("--baseline", help="dense model (default: runs/<recipe>/baseline/mobilenet.pth)")
    p.add_argument("--recipe", default=default_recipe,
                   help=f"recipe with a [{stage}] table (default: {default_recipe})")
    p.add_argument("--out", help=f"output folder (default: runs/<recipe>/{stage})")
    _add_device_arg(p)
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    if export:
        p.add_argument("--no-export", action="store_true",
                       help="write no .pte (for a machine without ExecuTorch; `mobileprune export` makes it later)")
    _add_data_args(p)


def _variants(text: str) -> tuple[str, ...]:
    from .data import RESIZE_VARIANTS

    return RESIZE_VARIANTS if text == "both" else (text,)


def build_parser() -> argparse.ArgumentParser:
    from .data import RESIZE_VARIANTS
    from .package import PACKAGE_RULES, TRACKS

    parser = _Parser(prog="mobileprune", description=__doc__)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only on a terminal; elsewhere one line per epoch)")
    parser.add_argument("--verbose", action="store_true", help="also show the ExecuTorch runtime's and libraries' "
                                                               "own log lines and warnings")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train the dense baseline from scratch with a recipe")
    _add_chunk_arg(p)
    p.add_argument("--recipe", default="baseline", help="recipe name or .toml path (default: baseline)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe>/baseline)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (implied by --stop-after)")
    p.add_argument("--epochs", type=_positive, help="override the recipe's epochs")
    _add_device_arg(p)
    _add_data_args(p)

    p = sub.add_parser("evaluate", help="accuracy (and MFLOPs) of a .pth/.pt model or a .pte")
    p.add_argument("model", help="a whole pickled model (.pth), a state_dict with its layout (.pt) or an "
                                 "ExecuTorch program (.pte)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split (default: test)")
    p.add_argument("--variant", choices=(*RESIZE_VARIANTS, "both"), default="both",
                   help="the 32->224 resize: torchvision's, the C++ runner's, or both (default)")
    p.add_argument("--limit", type=_positive, help="first N images only")
    p.add_argument("--val-size", type=_count, default=5000, help="size of the validation split (default 5000)")
    _add_device_arg(p, "cpu")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    _add_data_args(p)

    p = sub.add_parser("export", help="write a hand-in folder: model/mobilenet.pth, .pte, state_dict + layout")
    p.add_argument("model", help="the model to hand in: .pth, or .pt with its .layout.json")
    p.add_argument("--out", required=True, help="folder; files go to OUT/model/")
    p.add_argument("--no-check", action="store_true", help="skip comparing the .pte with eager")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    _add_int8_args(p)

    p = sub.add_parser("grade", help="grade a hand-in as the lab does (MFLOPs, .pth and .pte accuracy, the score "
                                     "under each edition of the rules), or a whole class into a CSV")
    p.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                   help="a hand-in folder in the lab's layout (model/mobilenet.pth, model/mobilenet.pte, "
                        "data/test_batch.bin) or its zip, a folder holding mobilenet.pth and mobilenet.pte, or a "
                        ".pth followed by the .pte to grade with it (default: the .pte of the same name beside it); "
                        "several, or a folder of zips, with --csv")
    p.add_argument("--csv", metavar="FILE", help="grade a class: one row per submission into FILE (a rerun skips the "
                                                 "rows already there), each in its own process with a time limit")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --csv: the most one submission may take (default 900)")
    p.add_argument("--workers", type=_positive, default=2, help="with --csv: submissions graded at once (default 2)")
    p.add_argument("--limit", type=_positive, help="first N test images only (the score is then not the lab's)")
    p.add_argument("--variant", choices=(*RESIZE_VARIANTS, "both"), default="both",
                   help="the 32->224 resize: torchvision's, the C++ runner's (what the lab's runner does), or both "
                        "(default)")
    _add_device_arg(p, "cpu")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--json", action="store_true", help="print the grade as JSON")
    p.add_argument("--save", metavar="FOLDER", help="also write FOLDER/grade.json and grade.txt (what "
                                                     "`mobileprune report` reads from a run folder)")
    p.add_argument("--runner", help="also grade the .pte with this native runner (default: "
                                    "build/xnn_executor_runner when built; `make runner`)")
    p.add_argument("--no-runner", action="store_true", help="do not run the native runner")
    p.add_argument("--int8", action="store_true", help="grade mobilenet.int8.pte beside the .pth (export --int8 "
                                                       "writes it) instead of mobilenet.pte; --save writes "
                                                       "grade.int8.json")
    _add_data_args(p)

    p = sub.add_parser("finegrained", help="Part 1: sensitivity scan, per-layer sparsity, masked fine-tuning")
    _add_chunk_arg(p)
    _add_stage_args(p, "finegrained", default_recipe="baseline")
    p.add_argument("--target-size", type=_fraction, help="fraction of dense size, e.g. 0.25 (overrides the recipe)")
    p.add_argument("--sparsity-json", help="per-layer sparsities by hand ({param_name: sparsity}); skips the scan")

    p = sub.add_parser("prune", help="Part 2: channel pruning to an MFLOPs target, in steps with KD recovery")
    _add_chunk_arg(p)
    _add_stage_args(p, "prune", default_recipe="lab2-45")
    p.add_argument("--target-mflops", type=_positive_float, help="override the recipe's target")
    p.add_argument("--importance", help="override the criterion: l1, l2, taylor, hessian, bn, lamp, fpgm, random")
    p.add_argument("--no-distill", action="store_true", help="recover without the dense teacher")

    p = sub.add_parser("recover", help="Part 2: train a pruned model further (channels unchanged), with KD")
    _add_chunk_arg(p)
    p.add_argument("model", help="pruned model: .pt with its .layout.json, or a pickled .pth")
    p.add_argument("--teacher", help="dense model to distil from (the baseline the model was pruned from)")
    p.add_argument("--recipe", default="cpu-224-handin-kd-more", help="recipe with a [recover] table "
                                                                      "(default: cpu-224-handin-kd-more)")
    p.add_argument("--out", help="output folder (default: runs/<recipe>/recover)")
    p.add_argument("--epochs", type=_positive, help="override the recipe's epochs")
    p.add_argument("--lr", type=_positive_float, help="override the recipe's peak learning rate")
    p.add_argument("--images", type=_positive, help="override the recipe's window of training images")
    p.add_argument("--skip-images", type=_count, help="override where the window starts in the training split")
    p.add_argument("--no-distill", action="store_true", help="train on labels alone (no --teacher needed)")
    _add_device_arg(p)
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--no-export", action="store_true", help="write no .pte")
    _add_data_args(p)

    p = sub.add_parser("average", help="Part 2: interpolate two checkpoints of one pruned model, keep the best "
                                       "on validation")
    p.add_argument("first", help="the earlier checkpoint (.pt with its layout, or .pth)")
    p.add_argument("second", help="the later checkpoint, same channels; its Part 2 run record is carried forward")
    p.add_argument("--fractions", type=_fraction, nargs="+", default=[0.25, 0.5, 0.75],
                   help="weights of SECOND to try, each in (0, 1); the ends 0 and 1 are always tried "
                        "(default: 0.25 0.5 0.75)")
    _add_model_stage_args(p, "average")

    p = sub.add_parser("recalibrate", help="Part 2: re-estimate a trained model's BatchNorm statistics on training "
                                           "images; keep it if it validates higher under the worse of the two resizes")
    p.add_argument("model", help="the trained model (.pt with its layout, or .pth); the Part 2 record beside it "
                                 "(schedule.csv) is carried forward")
    p.add_argument("--images", type=_positive, default=10000, help="training images to estimate the statistics on "
                                                                  "(default: 10000)")
    _add_model_stage_args(p, "recalibrate")

    p = sub.add_parser("students", help="prune the dense baseline to each MFLOPs target in one step: students for "
                                        "`mobileprune distill`")
    _add_stage_args(p, "students", default_recipe="distill", export=False)
    p.add_argument("--targets", type=_positive_float, nargs="+", help="MFLOPs targets (overrides the recipe's)")
    p.add_argument("--with-start", action="store_true", help="also add the --baseline model itself, unpruned, as a "
                                                             "student (one already pruned and trained, say)")
    p.add_argument("--stem-stride", type=_positive, help="set the stem's stride before the cut (torchvision's is 2; 7 "
                                                   "hands the network 32-px maps of the 32-px picture)")
    p.add_argument("--strides", help="the open track's stride plan, set before the cut: BLOCK=STRIDE,... over "
                                      "features.0 (the stem), features.2, .4, .7, .14; features.0=7,features.2=1 "
                                      "is the CIFAR layout (32/32/16/8/4-px maps)")

    p = sub.add_parser("teacher", help="train the 32-px teacher alone (what `mobileprune distill` trains first)")
    _add_chunk_arg(p)
    p.add_argument("--recipe", default="distill", help="recipe with a [teacher] table (default: distill)")
    p.add_argument("--budget-s", type=_positive_float, help="stop the schedule after this many seconds (a CPU "
                                                           "measured in fixed time); overrides [teacher] budget_s")
    p.add_argument("--out", help="output folder (default: runs/<recipe>/teacher)")
    p.add_argument("--release", metavar="DIR", help="once the teacher is finished, release it to DIR: teacher.pt, "
                                                    "history, its test accuracy (measured once), the CPU hours and "
                                                    "this command")
    _add_device_arg(p)
    _add_data_args(p)

    p = sub.add_parser("distill", help="train the 32-px teacher (or load one), then every student together on one "
                                       "wall-clock budget")
    _add_chunk_arg(p)
    p.add_argument("--recipe", default="distill", help="recipe with [teacher] and [distill] tables (default: distill)")
    p.add_argument("--students", help="folder of students (default: runs/<recipe>/students)")
    p.add_argument("--teacher", help="a trained teacher.pt to load instead of training one")
    p.add_argument("--budget-s", type=_positive_float, help="seconds for the whole command (overrides the recipe's)")
    p.add_argument("--out", help="run folder (default: runs/<recipe>/distill)")
    p.add_argument("--cache-dir", help="with [distill] teacher_cache: where the teacher's logits are kept, to share "
                                       "them between runs from one teacher (default: the run's teacher/ folder)")
    p.add_argument("--cache-only", action="store_true", help="with --teacher and --cache-dir: build the teacher's "
                                                             "logits there and stop, so that runs sharing the cache "
                                                             "do not pay for it out of the first one's budget")
    p.add_argument("--pack", metavar="DIR", help="then pack what must come back from a GPU machine into DIR "
                                                 "(at most 8 files of 16 MiB)")
    p.add_argument("--milestone", metavar="FILE", help="keep the students' state in FILE (bf16, small enough to "
                                                       "commit) when the command ends, and resume from it when OUT "
                                                       "has not come as far: a run outlives a lost runs/ folder")
    _add_device_arg(p)
    _add_data_args(p)

    p = sub.add_parser("pack", help="pack a distill run's results into at most 8 files of 16 MiB")
    p.add_argument("run", help="a `mobileprune distill` run folder")
    p.add_argument("out", help="folder for the pieces and pack.json")

    p = sub.add_parser("unpack", help="unpack a packed distill run, rebuild each student's .pth and .pte, measure "
                                      "its test accuracy")
    p.add_argument("pack", help="folder holding pack.json and its pieces")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--no-export", action="store_true", help="write no .pte")
    _add_device_arg(p, "cpu")
    _add_data_args(p)

    p = sub.add_parser("run", help="the whole pipeline from one recipe: baseline, Part 1, Part 2, grade, report")
    _add_chunk_arg(p)
    p.add_argument("--recipe", default="quick", help="recipe name or .toml path (default: quick)")
    p.add_argument("--out", help="output folder (default: runs/<recipe>)")
    _add_device_arg(p)
    p.add_argument("--grade-limit", type=_positive, help="grade on the first N test images (default: the recipe's "
                                                          "test_limit, else all)")
    _add_data_args(p)

    p = sub.add_parser("package", help="write STUDENT_ID.zip in the lab's layout, then grade it as the lab will")
    p.add_argument("--id", required=True, dest="student_id", help="student id: names the zip and the notebook")
    p.add_argument("--model-dir", help="folder with mobilenet.pth and mobilenet.pte (default: prune/ of the first "
                                       "results folder present, release/ first (the list: "
                                       "mobileprune.report.RESULT_FOLDERS), or $MOBILEPRUNE_RESULTS)")
    p.add_argument("--out", default=".", help="folder for the zip (default: .)")
    p.add_argument("--notebook", help="notebook to include (default: notebooks/lab2.ipynb if present)")
    p.add_argument("--runner", help="runner binary to include (default: build/xnn_executor_runner if built)")
    p.add_argument("--grade-limit", type=_positive, help="grade on the first N test images only")
    p.add_argument("--int8", action="store_true", help="hand in the int8 program: MODEL_DIR/mobilenet.int8.pte "
                                                       "becomes the zip's model/mobilenet.pte (use another --out to "
                                                       "keep the fp32 zip too)")
    p.add_argument("--rules", choices=PACKAGE_RULES, default="original",
                   help="the lab's layout (default) or the 04/02 revision's: model/mobilenet.pth and STUDENT_ID.ipynb "
                        "only, graded on the .pth")
    p.add_argument("--track", choices=TRACKS, default="strict",
                   help="strict (default): torchvision's strides, channel pruning only; open: a model with strides "
                        "changed is handed in too (Part 2 asks for channel pruning: the course must accept it)")
    _add_data_args(p)

    p = sub.add_parser("report", help="redraw the plots and write REPORT.md of a run folder or a release")
    p.add_argument("folder", nargs="?", default="release", help="run folder or release folder (default: release)")
    p.add_argument("--collect", nargs="+", metavar="RUN",
                   help="first copy these run folders' results (not their checkpoints) into FOLDER/<run name>/")
    p.add_argument("--no-plots", action="store_true", help="keep the plots as they are; only write REPORT.md")

    p = sub.add_parser("bench", help="per-image latency of .pte files (and eager models), side by side")
    p.add_argument("models", nargs="+", help=".pte files (timed through ExecuTorch) or .pth/.pt models (eager); "
                                             "the first is the reference of the speed-up column")
    p.add_argument("--threads", type=_threads, help="thread counts, e.g. 1,2 (default: 1 and all cores)")
    p.add_argument("--warmup", type=_positive, default=10, help="untimed runs first (default 10)")
    p.add_argument("--repeats", type=_positive, default=50, help="timed runs of each model (default 50)")
    p.add_argument("--rounds", type=_positive, default=None,
                   help="the timed runs come in this many rounds, the models taking turns (default 5, "
                        "or one per run when there are fewer runs)")
    p.add_argument("--runner", help="also time each .pte through this native runner (e.g. build/xnn_executor_runner)")
    p.add_argument("--profile", action="store_true",
                   help="instead, time each .pte's operators (ExecuTorch's ETDump), summed by XNNPACK operator "
                        "kind, at the first of --threads (default 1)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(p)
    return parser


# ----------------------------------------------------------------------------- commands
def load_data(args, recipe: dict | None = None, test: bool = True):
    from .data import find_data_dir, load_cifar10

    settings = dict((recipe or {}).get("data", {}))
    folder = find_data_dir(args.data, download=args.download)
    return load_cifar10(folder, **settings, test=test)


def cmd_train(args) -> None:
    from .pipeline import train_baseline
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("runs") / recipe["name"] / "baseline")
    s = train_baseline(recipe, load_data(args, recipe), out, device=args.device or _auto_device(),
                       resume=args.resume or args.stop_after is not None, epochs=args.epochs,
                       progress=not args.no_progress)
    print(f"best epoch {s['best_epoch']}: val {s['val_accuracy']:.4f}, test {s['test_accuracy']:.4f} "
          f"({s['test_images']} images); wrote {out}/mobilenet.pth and best.pt")


def _draw_plots(stage: Path) -> None:
    """A stage writes its data files; the report draws its plots from them (data flows one way)."""
    from .report import draw_plots

    draw_plots(stage)


def _auto_device() -> str:
    from .train import default_device

    return str(default_device())


def cmd_evaluate(args) -> None:
    from .evaluate import accuracy, count_mflops
    from .export import PteModel
    from .models import load_model

    # The model first: a wrong model path is the likelier mistake, and loading data takes longer.
    path = Path(args.model)
    result = {"model": str(path), "split": args.split}
    if path.suffix == ".pte":
        model, kwargs = PteModel(path, isolate=True), {"batch_size": 100}
    else:
        model, kwargs = load_model(path, args.trust_pickle), {"device": args.device}
        result["mflops"], result["params"] = count_mflops(model)
    if args.split == "test":  # the test batch alone: the training batches need not even be there
        from .data import find_data_dir, load_split

        images, labels = load_split(find_data_dir(args.data, download=args.download), "test")
    else:
        images, labels = load_data(args, {"data": {"val_size": args.val_size}}, test=False).split("val")
    images, labels = images[:args.limit], labels[:args.limit]
    result["images"] = len(labels)
    result["accuracy"] = {v: accuracy(model, images, labels, v, progress=not args.no_progress, desc=v, **kwargs)
                          for v in _variants(args.variant)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    if "mflops" in result:
        print(f"MFLOPs {result['mflops']:.6f}   params {result['params']:,}")
    for variant, acc in result["accuracy"].items():
        print(f"accuracy ({args.split}, {len(labels)} images, {variant} resize): {acc:.4f}")


def cmd_export(args) -> None:
    from .evaluate import count_mflops
    from .export import export_pte
    from .models import load_model, save_pickled_model, save_state_with_layout

    model = load_model(args.model, args.trust_pickle).eval()
    folder = Path(args.out) / "model"
    pth = save_pickled_model(model, folder / "mobilenet.pth")
    save_state_with_layout(model, folder, "mobilenet")
    pte = export_pte(model, folder / "mobilenet.pte", check=not args.no_check)
    mflops, params = count_mflops(model)
    print(f"wrote {pth}, {pte} and mobilenet.pt + mobilenet.layout.json ({mflops:.2f} MFLOPs, {params:,} params"
          f"{'' if args.no_check else ', .pte checked against eager'})")
    if args.int8:
        _export_int8(args, model, folder)


def _export_int8(args, model, folder: Path) -> None:
    from .export import export_int8_hand_in

    train_images = load_data(args, test=False).train_images
    path, check = export_int8_hand_in(model, folder, train_images, args.calibration, args.keep_fp32, args.observer,
                                      progress=not args.no_progress)
    print(f"wrote {path} (int8, calibrated on {args.calibration:,} training images; same class as the eager int8 "
          f"model on {check['agreement']:.1%} of {check['check_inputs']} others, logits within "
          f"{check['relative_error']:.3f} of the largest)")


def cmd_grade(args) -> None:
    from .evaluate import format_grade, grade, save_grade
    from .package import DEFAULT_RUNNER

    submissions, pte = args.submissions, None
    if len(submissions) == 2 and submissions[1].endswith(".pte") and submissions[0].endswith(".pth"):
        submissions, pte = submissions[:1], submissions[1]
    if args.csv or len(submissions) > 1:
        return _grade_class(args, submissions)
    if args.time_limit:
        raise MobilepruneError("--time-limit is for a class (--csv); one grade runs to its end")
    runner = None if args.no_runner else args.runner or (DEFAULT_RUNNER if DEFAULT_RUNNER.is_file() else None)
    result = grade(submissions[0], data=args.data, limit=args.limit, variants=_variants(args.variant),
                   trust_pickle=args.trust_pickle, device=args.device, progress=not args.no_progress, pte=pte,
                   runner=runner, int8=args.int8)
    if args.save:
        save_grade(result, args.save, "grade.int8" if args.int8 else "grade")
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_grade(result))


def _grade_class(args, submissions: list[str]) -> None:
    from .gradebook import DEFAULT_TIME_LIMIT_S, grade_class

    if not args.csv:
        raise MobilepruneError("several submissions make a table: add --csv scores.csv")
    if any(p.endswith(".pte") for p in submissions):
        raise MobilepruneError("a .pte named beside several submissions: a class is graded from zips or folders")
    asked = [flag for flag, on in (("--trust-pickle", args.trust_pickle), ("--int8", args.int8), ("--save", args.save),
                                   ("--json", args.json), ("--runner", args.runner)) if on]
    if asked:  # a class from strangers is never unpickled on trust, and its table is the one output
        raise MobilepruneError(f"{', '.join(asked)}: for one grade, not with --csv")
    grade_class(submissions, args.csv, data=args.data, limit=args.limit,
                time_limit_s=args.time_limit or DEFAULT_TIME_LIMIT_S, workers=args.workers,
                progress=not args.no_progress)


def _baseline(args, recipe: dict):
    from .models import load_model

    path = Path(args.baseline or Path("runs") / recipe["name"] / "baseline" / "mobilenet.pth")
    if not args.baseline and not path.is_file():
        raise MobilepruneError(f"{path}: no baseline yet; train one (mobileprune train --recipe {recipe['name']}) "
                               "or pass --baseline MODEL")
    return load_model(path, args.trust_pickle)


def cmd_finegrained(args) -> None:
    from .finegrained import read_sparsity_json, run_finegrained
    from .recipes import load_recipe, section

    recipe = load_recipe(args.recipe)
    settings = section(recipe, "finegrained")
    if args.no_export:
        settings["export"] = False
    if args.target_size is not None:
        if not 0 < args.target_size < 1:
            raise MobilepruneError(f"--target-size {args.target_size} must be a fraction between 0 and 1")
        settings["target_size"] = args.target_size
    sparsity = None
    if args.sparsity_json:
        sparsity = read_sparsity_json(args.sparsity_json)
    baseline = _baseline(args, recipe)
    out = Path(args.out or Path("runs") / recipe["name"] / "finegrained")
    summary = run_finegrained(baseline, load_data(args, recipe), settings, out, device=args.device or _auto_device(),
                              sparsity=sparsity, progress=not args.no_progress)
    _draw_plots(out)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/mobilenet.pth, mobilenet.pt, sparsity.json, plots/, summary.md "
          f"({summary['relative_size_after']:.2%} of dense size)")


def cmd_prune(args) -> None:
    from .channel import ScheduleConfig, check_target_below, run_schedule
    from .recipes import load_recipe, section

    recipe = load_recipe(args.recipe)
    settings = section(recipe, "prune")
    if args.target_mflops is not None:
        settings["target_mflops"] = args.target_mflops
    if args.importance:
        settings["prune"] = {**settings.get("prune", {}), "importance": args.importance}
    if args.no_distill:
        settings["distill"] = False
    if args.no_export:
        settings["export"] = False
    config = ScheduleConfig.from_dict(settings)
    baseline = _baseline(args, recipe)
    check_target_below(baseline, config.target_mflops)  # before the data loads
    out = Path(args.out or Path("runs") / recipe["name"] / "prune")
    s = run_schedule(baseline, load_data(args, recipe), config, out, device=args.device or _auto_device(),
                     progress=not args.no_progress)
    _draw_plots(out)
    print(f"{s['mflops']:.2f} MFLOPs (target {s['target_mflops']:g}), {s['params']:,} params: val "
          f"{s['val_accuracy']:.4f}, test {s['test_accuracy']:.4f} ({s['test_images']} images)")
    print(f"wrote {out}/mobilenet.pth, {'' if args.no_export else 'mobilenet.pte, '}mobilenet.pt + layout, "
          "schedule.csv/.png, channels.csv/.png")


def _part2_run_of(model_path: str) -> Path | None:
    """The Part 2 run folder a model sits in (one with schedule.csv), whose record a later stage carries forward."""
    folder = Path(model_path).parent
    return folder if (folder / "schedule.csv").is_file() else None


def cmd_recover(args) -> None:
    from .channel import RecoveryConfig, recover
    from .models import load_model
    from .recipes import load_recipe, section

    recipe = load_recipe(args.recipe)
    settings = section(recipe, "recover")
    if args.no_distill:
        settings["distill"] = False
    if args.no_export:
        settings["export"] = False
    for name in ("epochs", "lr"):
        if getattr(args, name) is not None:
            settings["train"] = {**settings.get("train", {}), name: getattr(args, name)}
    for name in ("images", "skip_images"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    config = RecoveryConfig.from_dict(settings)
    if config.distill and not args.teacher:
        raise MobilepruneError("distillation needs --teacher DENSE_MODEL (the baseline it was pruned from), "
                               "or pass --no-distill")
    model = load_model(args.model, args.trust_pickle)
    teacher = load_model(args.teacher, args.trust_pickle) if config.distill else None
    out = Path(args.out or Path("runs") / recipe["name"] / "recover")
    source_run = _part2_run_of(args.model)
    s = recover(model, load_data(args, recipe), config, out, teacher, device=args.device or _auto_device(),
                progress=not args.no_progress, source_run=source_run)
    _draw_plots(out)
    print(f"{s['mflops']:.2f} MFLOPs, val {s['val_before']:.4f} -> {s['val_trained']:.4f} (kept the {s['kept']} "
          f"model), test {s['test_accuracy']:.4f} ({s['test_images']} images)")
    print(f"wrote {out}/mobilenet.pth, {'' if args.no_export else 'mobilenet.pte, '}mobilenet.pt + layout, summary.json"
          + (f", and {source_run}'s schedule with this recovery added" if source_run else ""))


def cmd_average(args) -> None:
    from .channel import average
    from .models import load_model
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe)
    first, second = load_model(args.first, args.trust_pickle), load_model(args.second, args.trust_pickle)
    out = Path(args.out or Path("runs") / recipe["name"] / "average")
    source_run = _part2_run_of(args.second)
    s = average(first, second, load_data(args, recipe), args.fractions, out, device=args.device or _auto_device(),
                progress=not args.no_progress, source_run=source_run, export=not args.no_export,
                names=(args.first, args.second))
    _draw_plots(out)
    tried = ", ".join(f"{f}: {v:.4f}" for f, v in s["val_by_fraction"].items())
    print(f"validation by fraction of the second model: {tried}; kept {s['fraction']:g}, test "
          f"{s['test_accuracy']:.4f} ({s['test_images']} images), {s['mflops']:.2f} MFLOPs")
    print(f"wrote {out}/mobilenet.pth, {'' if args.no_export else 'mobilenet.pte, '}mobilenet.pt + layout, "
          f"average.png, summary.json" + (f", and {source_run}'s schedule with an average row" if source_run else ""))


def cmd_recalibrate(args) -> None:
    from .channel import recalibrate
    from .models import load_model
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe)
    model = load_model(args.model, args.trust_pickle)
    out = Path(args.out or Path("runs") / recipe["name"] / "recalibrate")
    s = recalibrate(model, load_data(args, recipe), args.images, out, device=args.device or _auto_device(),
                    progress=not args.no_progress, source_run=_part2_run_of(args.model), export=not args.no_export)
    _draw_plots(out)
    tried = "; ".join(f"{name} {v['torchvision']:.4f} / {v['runner']:.4f}" for name, v in s["val_by_resize"].items())
    print(f"validation, torchvision / runner resize: {tried}; kept {s['kept']}, test {s['test_accuracy']:.4f} "
          f"({s['test_images']:,} images, torchvision resize), {s['mflops']:.2f} MFLOPs")
    print(f"wrote {out}/mobilenet.pth, {'' if args.no_export else 'mobilenet.pte, '}mobilenet.pt + layout, summary.json")


def cmd_students(args) -> None:
    from .channel import StudentsConfig, prepare_students, student_name, student_strides
    from .models import parse_stride_plan
    from .recipes import load_recipe, section

    recipe = load_recipe(args.recipe)
    settings = section(recipe, "students")
    if args.targets:
        settings["targets"] = list(args.targets)
    if args.stem_stride is not None:
        settings["stem_stride"] = args.stem_stride
    if args.strides is not None:
        settings["strides"] = parse_stride_plan(args.strides)
    config = StudentsConfig.from_dict(settings)
    if not config.targets and not args.with_start:
        raise MobilepruneError("no students to make: the recipe's [students] targets are empty; give --targets or "
                               "--with-start (the --baseline model itself, uncut)")
    baseline = _baseline(args, recipe)
    out = Path(args.out or Path("runs") / recipe["name"] / "students")
    start = args.baseline or str(Path("runs") / recipe["name"] / "baseline" / "mobilenet.pth")
    records = prepare_students(baseline, load_data(args, recipe, test=False), config, out,
                               device=args.device or _auto_device(), progress=not args.no_progress,
                               keep_start=args.with_start, start=start)
    for r in records:
        how = "after pruning" if r.get("pruned", True) else "as it is"
        name = student_name(r["target_mflops"], student_strides(r))
        print(f"{name}: {r['mflops']:.2f} MFLOPs, {r['params']:,} params, val {r['val_accuracy']:.4f} {how} "
              f"({r['val_images']:,} images)")
    print(f"wrote {out}/student-*/ (mobilenet.pt + layout, student.json): `mobileprune distill --students {out}`")


def _command_line(args) -> str:
    import shlex

    return "mobileprune " + shlex.join(args.argv)


def cmd_teacher(args) -> None:
    from .distill import TeacherConfig, release_teacher, train_teacher
    from .recipes import load_recipe, section

    recipe = load_recipe(args.recipe)
    settings = section(recipe, "teacher")
    if args.budget_s:
        settings["budget_s"] = args.budget_s
    config = TeacherConfig.from_dict(settings)
    out = Path(args.out or Path("runs") / recipe["name"] / "teacher")
    data = load_data(args, recipe, test=args.release is not None)
    _, s = train_teacher(data, config, out, device=args.device or _auto_device(), progress=not args.no_progress)
    print(f"teacher {s['widths']} x{s['depth']}: {s['epochs']:g} epochs in {s['seconds']:.0f} s "
          f"({s['images_per_s']:.0f} img/s), val {s['val_accuracy']:.4f}, {s['val_accuracy_tta']:.4f} with TTA "
          f"level {s['tta_level']}; wrote {out}/teacher.pt")
    if args.release:
        from .train import describe_cpu

        release = Path(args.release)
        r, measured = release_teacher(out, release, (data.val_images, data.val_labels),
                                      (data.test_images, data.test_labels), _command_line(args), describe_cpu(),
                                      progress=not args.no_progress)
        _draw_plots(release)
        print(f"{'released' if measured else 'already released (the test set is looked at once)'}: {release}/ "
              f"teacher.pt (bf16), val {r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f} "
              f"({r['test_accuracy_tta']:.4f} with TTA level {r['tta_level']}), {r['cpu_hours']:.2f} CPU hours")


def cmd_distill(args) -> None:
    from .distill import (StudentConfig, TeacherConfig, pack_run, read_students, restore_milestone, run_distill,
                          save_milestone)
    from .recipes import load_recipe, section

    recipe = load_recipe(args.recipe)
    # A loaded teacher needs no [teacher] table (its evaluation batch at most).
    teacher_config = TeacherConfig.from_dict(dict(recipe.get("teacher", {})) if args.teacher
                                             else section(recipe, "teacher"))
    config = StudentConfig.from_dict(section(recipe, "distill"))
    if args.cache_only:
        return _build_cache_only(args, recipe, config)
    students = read_students(args.students or Path("runs") / recipe["name"] / "students")
    out = Path(args.out or Path("runs") / recipe["name"] / "distill")
    if args.milestone and Path(args.milestone).is_file():
        restored = restore_milestone(args.milestone, out)
        if restored is not None:
            print(f"restored {out} from {args.milestone}: after epoch {restored}, weights rounded to bf16")
    try:
        # The test split is never looked at here (a GPU machine is sent the training batches alone).
        s = run_distill(students, load_data(args, recipe, test=False), teacher_config, config, out,
                        teacher=args.teacher, budget_s=args.budget_s, device=args.device or _auto_device(),
                        progress=not args.no_progress, cache_dir=args.cache_dir)
    finally:  # a chunk that stops (--stop-after) leaves its milestone too
        if args.milestone and (out / "last.pt").is_file():
            kept = save_milestone(out, args.milestone)
            if kept is not None:
                print(f"milestone: {args.milestone} holds the run after epoch {kept}; commit it")
    _draw_plots(out)
    teacher = s["teacher"]
    print(f"teacher: val {teacher['val_accuracy']:.4f}" + (f", {teacher['val_accuracy_tta']:.4f} with TTA"
                                                          if teacher.get("val_accuracy_tta") else "")
          + f" ({s['teacher_seconds']:.0f} s); students: {s['epochs_per_student']:g} epochs in "
          f"{s['student_seconds']:.0f} s, {s['student_images_per_s']:.0f} student-images/s")
    for name, r in s["students"].items():
        print(f"  {name}: {r['mflops']:.2f} MFLOPs, val {r['val_after_pruning']:.4f} after pruning -> "
              f"{r['val_accuracy']:.4f} (epoch {r['best_epoch']}, {r['kept']})")
    print(f"wrote {out}")
    if args.pack:
        pieces = pack_run(out, args.pack)
        print(f"packed into {args.pack}: " + ", ".join(p.name for p in pieces))


def _build_cache_only(args, recipe: dict, config) -> None:
    from .distill import build_teacher_cache, cache_path, load_teacher

    if not (args.teacher and args.cache_dir and config.teacher_cache):
        raise MobilepruneError("--cache-only needs --teacher, --cache-dir and a recipe with [distill] "
                               "teacher_cache = true")
    path = cache_path(args.cache_dir, config.translate, config.teacher_flip)
    logits = build_teacher_cache(load_teacher(args.teacher), load_data(args, recipe, test=False).train_images, path,
                                 config.translate, config.teacher_flip, config.bf16, config.eval_batch_size,
                                 args.device or _auto_device())
    print(f"teacher cache: {path}, {logits.shape[0]:,} images x {logits.shape[1] * logits.shape[2]} crop offsets "
          f"x {logits.shape[3]} view(s); `mobileprune distill ... --cache-dir {args.cache_dir}` reads it")


def cmd_pack(args) -> None:
    from .distill import pack_run

    pieces = pack_run(args.run, args.out)
    print(f"packed {args.run} into {args.out}: " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)"
                                                            for p in pieces))


def cmd_unpack(args) -> None:
    from .channel import student_strides
    from .data import find_data_dir, load_split
    from .distill import choose_by_validation, finish_students
    from .evaluate import lab_score
    from .files import unpack
    from .report import write_report

    test = load_split(find_data_dir(args.data, download=args.download), "test")  # before anything is written
    unpack(args.pack, args.out)
    summaries = finish_students(args.out, test, export=not args.no_export, device=args.device,
                                progress=not args.no_progress)
    for s in summaries:
        _draw_plots(Path(args.out) / s["student"])
        print(f"{s['student']}: {s['mflops']:.2f} MFLOPs, val {s['val_accuracy']:.4f}, test {s['test_accuracy']:.4f} "
              f"({s['test_images']:,} images), lab score by validation {lab_score(s['mflops'], s['val_accuracy']):.2f} %")
    best = choose_by_validation(summaries)
    if best:
        print(f"by validation the hand-in is {best['student']}: grade it with `mobileprune grade "
              f"{args.out}/{best['student']}`")
    plans = {json.dumps(student_strides(s), sort_keys=True) for s in summaries} - {"{}"}
    for plan in sorted(plans):
        strides = json.loads(plan)
        where = ", ".join(f"{block} stride {stride}" for block, stride in strides.items())
        print(f"beside it, the best on the open track with {where} (not channel pruning alone, docs/method.md): "
              f"{choose_by_validation(summaries, strides)['student']}")
    print(f"report: {write_report(args.out, plots=True)}")


def cmd_run(args) -> None:
    from .data import find_data_dir
    from .pipeline import run_demo, run_pipeline
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("runs") / recipe["name"])
    if "demo" in recipe:  # what `make run` shows: the released hand-in, graded, timed, and one pruning step
        run_demo(recipe, find_data_dir(args.data, download=args.download), out, device=args.device or _auto_device(),
                 progress=not args.no_progress)
        return
    limit = args.grade_limit or recipe.get("data", {}).get("test_limit")
    run_pipeline(recipe, find_data_dir(args.data, download=args.download), out, device=args.device or _auto_device(),
                 progress=not args.no_progress, grade_limit=limit)


def cmd_package(args) -> None:
    from .evaluate import format_grade
    from .package import package
    from .report import find_results

    model_dir = args.model_dir or find_results() / "prune"
    archive, result = package(args.student_id, model_dir, args.out, args.notebook, args.runner, args.data,
                              args.grade_limit, progress=not args.no_progress, int8=args.int8, rules=args.rules,
                              track=args.track)
    with zipfile.ZipFile(archive) as z:
        print(f"wrote {archive}: " + ", ".join(z.namelist()))
    print(format_grade(result))


def cmd_report(args) -> None:
    from .report import collect_release, write_report

    if args.collect:
        copied = collect_release(args.collect, args.folder)
        print(f"copied {len(copied)} files from {', '.join(args.collect)} into {args.folder}")
    path = write_report(args.folder, plots=not args.no_plots)
    print(f"wrote {path}")


def cmd_bench(args) -> None:
    from dataclasses import asdict

    from .bench import bench, format_bench

    if args.profile:  # where the time goes, by operator: ExecuTorch's event tracer (ETDump)
        from .bench import format_profile, profile

        rows = profile(args.models, (args.threads or (1,))[0], args.repeats)
        print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else format_profile(rows))
        return
    results = bench(args.models, args.threads, args.warmup, args.repeats, args.trust_pickle, args.runner, args.data,
                    args.rounds)
    print(json.dumps([asdict(r) for r in results], indent=1) if args.json else format_bench(results))


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "grade": cmd_grade,
            "bench": cmd_bench, "finegrained": cmd_finegrained, "prune": cmd_prune, "recover": cmd_recover,
            "average": cmd_average, "recalibrate": cmd_recalibrate, "students": cmd_students, "teacher": cmd_teacher,
            "distill": cmd_distill, "pack": cmd_pack,
            "unpack": cmd_unpack, "run": cmd_run, "package": cmd_package, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a release records as its command
    # Library warnings (torch.export, pytree) and the ExecuTorch runtime's log lines are noise on a
    # user's terminal: shown only with --verbose (child processes read the variable too).
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    quiet_libraries()
    # Progress bars belong on a terminal; a log file or CI gets one plain line per epoch instead,
    # written as it happens (a chunk running in the background is watched through its log).
    args.no_progress = args.no_progress or not sys.stderr.isatty()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    os.environ.setdefault("TQDM_DISABLE", "1" if args.no_progress else "")
    # Before the first big tensor: glibc would otherwise hand every freed activation back to the kernel
    # and fault it in again next step (a training step of the hand-in at 224 px: 2.75x faster kept).
    from .train import keep_freed_memory

    keep_freed_memory()
    return exit_code("mobileprune", lambda: _in_chunk(args, COMMANDS[args.command]))


def _in_chunk(args, command) -> None:
    """Run ``command``; with --stop-after, every training loop in it ends at an epoch boundary in time."""
    if getattr(args, "stop_after", None) is None:
        return command(args)
    from .train import chunk

    with chunk(args.stop_after * 60):
        return command(args)


if __name__ == "__main__":
    sys.exit(main())
