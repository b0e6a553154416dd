"""Measuring a model as the lab's grader does: MFLOPs, accuracy of the .pth and the .pte, the score.

The grader's steps, in order: ``model = torch.load("model/mobilenet.pth")``; MFLOPs =
``tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 224, 224))[0] / 1e6``; then
``./xnn_executor_runner --model_path model/mobilenet.pte`` on ``data/test_batch.bin``, which prints
the accuracy. ``grade`` reproduces them and adds the .pth's accuracy under both resize variants.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .data import INPUT_SIZE, RESIZE_VARIANTS, TEST_BIN, find_data_dir, preprocess, read_cifar_bin
from .errors import MobilepruneError

DENSE_MFLOPS = 318.969098
DENSE_PARAMS = 2_236_682
ACCURACY_BAR = 0.92
# The official CIFAR-10 test set, 10,000 (image, label) records, in any order: the sha256 of their
# sorted sha256s (``test_set_digest``). A grade on anything else says so beside its score.
OFFICIAL_TEST_IMAGES = 10_000
OFFICIAL_TEST_DIGEST = "325704b01eb92e1e2a6215ae6a916bb7db7de054af0c496be1c7be2e0fcfbf5f"


def count_mflops(model: nn.Module) -> tuple[float, int]:
    """(MFLOPs, parameters) exactly as the grader counts them: whole model, one zero image at 224."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        ops, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, device=device))
    model.train(was_training)
    return ops / 1e6, int(params)


def lab_score(mflops: float, accuracy: float) -> float:
    """The lab's Part 2 score in percent: ((200 - MFLOPs)/155 - 10*max(0, 0.92 - acc)) * 45."""
    return ((200 - mflops) / 155 - 10 * max(0.0, ACCURACY_BAR - accuracy)) * 45


@dataclass(frozen=True)
class Rules:
    """One edition of the lab's grading rules. Every edition counts MFLOPs on the .pth at 224 px and
    scores with ``lab_score``; they differ in what is handed in and whose accuracy counts."""
    name: str
    accuracy_of: str  # "pte": the .pte through the lab's runner; "pth": the .pth, eager
    resize: str  # the 32->224 resize of that evaluation (data.RESIZE_VARIANTS)
    hand_in: str  # what the edition asks students to hand in


# The order is the course's: the first edition, its 04/02 revision, the 2025 edition of the same lab.
# The runner resizes as its C++ does (``runner``); the notebooks evaluate through torchvision's resize.
RULES = (
    Rules("original", "pte", "runner", "model/mobilenet.pth and model/mobilenet.pte; accuracy of the .pte from "
                                       "xnn_executor_runner on data/test_batch.bin"),
    Rules("revised", "pth", "torchvision", "the 04/02 revision: model/mobilenet.pth and ID.ipynb only; accuracy "
                                           "of the .pth by the notebook's own evaluation"),
    Rules("2025", "pth", "torchvision", "the 2025 edition: the .pth only; accuracy of the .pth, the same formula"),
)


def scores_by_rule(mflops: float, pth_accuracy: dict[str, float] | None,
                   pte_accuracy: dict[str, float] | None) -> dict[str, dict]:
    """The score under each edition of the rules that the measured accuracies allow:
    ``{rule: {"accuracy", "resize", "score"}}``. An edition whose evaluation was measured under the
    other resize only (``grade --variant``) is scored on that one, and says so by its ``resize``."""
    scores = {}
    for rules in RULES:
        measured = pte_accuracy if rules.accuracy_of == "pte" else pth_accuracy
        if not measured:
            continue
        resize = rules.resize if rules.resize in measured else next(iter(measured))
        scores[rules.name] = {"accuracy": measured[resize], "resize": resize,
                              "score": lab_score(mflops, measured[resize])}
    return scores


@torch.no_grad()  # not inference_mode: the folded weights must stay usable outside it
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode; changed in place) with each BatchNorm folded into the convolution
    before it, for inference; ``model`` as it is where FX cannot trace it (a stranger's forward)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=True)
    except Exception:  # noqa: BLE001 - any tracing failure: unfolded is merely slower
        return model


@torch.inference_mode()
def predict(model, images: torch.Tensor, variant: str = "torchvision", batch_size: int | None = None,
            device: str | torch.device = "cpu", progress: bool = False, desc: str = "eval",
            size: int = INPUT_SIZE) -> torch.Tensor:
    """Predicted classes of uint8 CIFAR images; ``model`` is an nn.Module or a PteModel.

    On a CPU, small batches (16) in channels_last run a MobileNetV2 at 224 px about 4x faster than
    batches of 250 in the default layout (2.2 against 9-13 ms an image on 2 cores): a batch's
    activations then fit in the caches. Each BatchNorm is folded into its convolution too
    (``fold_batchnorm``): 3.4 -> 2.4 ms an image for the hand-in at one thread. Same predictions:
    on the 10,000 test images the hand-in's logits differ by at most 2.6e-6 of the largest, and no
    prediction changes (its closest top-2 margin is 1.8e-4; 2-core EPYC, 2026-12-06).
    ``size`` other than 224 is for quick CPU runs only; grading always runs at 224.
    """
    is_module = isinstance(model, nn.Module)
    on_gpu = is_module and torch.device(device).type == "cuda"
    batch_size = batch_size or (250 if on_gpu else 16)
    if is_module:  # a channels_last copy: the caller's model keeps its layout (and its training mode)
        model = fold_batchnorm(copy.deepcopy(model).to(device).eval()).to(memory_format=torch.channels_last)
    predictions = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = images[start:start + batch_size].to(device if is_module else "cpu")
        x = preprocess(batch, size, variant)
        if is_module:
            x = x.contiguous(memory_format=torch.channels_last)
        predictions.append(model(x).argmax(1).cpu())
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, variant: str = "torchvision", **kwargs) -> float:
    if len(labels) == 0:
        raise MobilepruneError("no images to evaluate")
    return (predict(model, images, variant, **kwargs) == labels).float().mean().item()


# ----------------------------------------------------------------------------- grading
@dataclass
class GradeResult:
    submission: str
    mflops: float
    params: int
    images: int
    pth_accuracy: dict[str, float]
    pte_accuracy: dict[str, float] | None
    score_accuracy: float
    score: float
    notes: list[str] = field(default_factory=list)
    not_lab_grade: str | None = None  # why the score is not the lab's (not the official 10,000 test images)
    runner_accuracy: float | None = None  # what the native runner printed, when one was given
    pte_file: str | None = None  # the program graded (an int8 one is named mobilenet.int8.pte beside the .pth)
    scores: dict[str, dict] = field(default_factory=dict)  # by edition of the rules: scores_by_rule
    strides: dict[str, int] = field(default_factory=dict)  # blocks whose stride is not torchvision's: the open track

    def to_dict(self) -> dict:
        return asdict(self)


# Said beside every grade of a model whose strides are not torchvision's (issue #33's ruling).
OPEN_TRACK_NOTE = ("open track: strides changed from torchvision's, then channels pruned; Part 2 asks for channel "
                   "pruning, so the course must accept the change (docs/method.md, two tracks)")


def unpack_submission(submission: Path, workdir: Path) -> Path:
    """The folder to grade: ``submission`` itself (a folder or a .pth), or its zip extracted into
    ``workdir`` within bounds (``files.safe_extract``: a zip from a stranger may be a bomb)."""
    from .files import safe_extract

    if not submission.exists():
        raise MobilepruneError(f"{submission}: no such file or folder")
    if submission.is_dir() or submission.suffix == ".pth":
        return submission
    if not zipfile.is_zipfile(submission):
        raise MobilepruneError(f"{submission}: neither a folder nor a zip file (a truncated zip reads as neither)")
    safe_extract(submission, workdir)
    # A zip may wrap everything in one top folder.
    for candidate in (workdir, *sorted(p for p in workdir.iterdir() if p.is_dir())):
        if (candidate / "model" / "mobilenet.pth").is_file() or (candidate / "mobilenet.pth").is_file():
            return candidate
    return workdir


def missing_notebook(root: Path) -> list[str]:
    """A note when a hand-in in the lab's layout (``model/``) has no notebook beside it, else none."""
    if root.is_dir() and (root / "model").is_dir() and not any(root.glob("*.ipynb")):
        return ["no ID.ipynb beside model/: the revised rules ask for one"]
    return []


def test_set_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """An order-free digest of (image, label) records: the sha256 of their sorted sha256s."""
    import hashlib

    records = torch.cat([labels.to(torch.uint8)[:, None], images.reshape(len(labels), -1)], dim=1).numpy()
    return hashlib.sha256(b"".join(sorted(hashlib.sha256(r.tobytes()).digest() for r in records))).hexdigest()


def not_the_lab_test_set(images: torch.Tensor, labels: torch.Tensor, limit: int | None) -> str | None:
    """Why a grade on these images is not the lab's grade, or None when they are the official 10,000."""
    if limit is not None and limit < OFFICIAL_TEST_IMAGES:
        return f"graded on the first {len(labels):,} test images (--limit), not the official {OFFICIAL_TEST_IMAGES:,}"
    if len(labels) != OFFICIAL_TEST_IMAGES:
        return f"graded on {len(labels):,} test images, not the official {OFFICIAL_TEST_IMAGES:,}"
    if test_set_digest(images, labels) != OFFICIAL_TEST_DIGEST:
        return f"graded on {len(labels):,} test images that are not the official CIFAR-10 test set"
    return None


def model_files(submission: Path, root: Path) -> tuple[Path, Path]:
    """The .pth to grade and the .pte beside it: a .pth given by name, or mobilenet.pth in the lab's
    ``model/`` folder, in the folder itself (as a run's stage folder holds it) or in its ``prune/``
    (a run or a release, whose hand-in that is)."""
    if root.suffix == ".pth":
        return root, root.with_suffix(".pte")
    for folder in (root / "model", root, root / "prune"):
        if (folder / "mobilenet.pth").is_file():
            return folder / "mobilenet.pth", folder / "mobilenet.pte"
    raise MobilepruneError(f"{submission}: holds no mobilenet.pth (looked in model/, prune/ and the folder itself)")


def _predict_file(kind: str, model_path: str, test_file: str, limit: int | None, variant: str,
                  trust_pickle: bool) -> torch.Tensor:
    """A grading job in a worker process: one model file's predictions on one resize of the test batch.

    One thread each: two such workers on two cores get more done than one process with two threads
    (a small MobileNetV2's convolutions split poorly), and a .pte that aborts the runtime kills a
    worker, not the command.
    """
    torch.set_num_threads(1)
    images = read_cifar_bin(test_file)[0][:limit]
    if kind == "pte":
        from .errors import quiet_libraries
        from .export import PteModel, set_runtime_threads

        quiet_libraries()
        set_runtime_threads(1)  # before the pool is first used: resizing a used one can abort
        return predict(PteModel(model_path), images, variant)
    from .models import load_pickled_model

    return predict(load_pickled_model(model_path, trust_pickle=trust_pickle), images, variant)


def _graded_predictions(jobs: list[tuple], progress: bool) -> dict[tuple, torch.Tensor]:
    """Run ``_predict_file`` jobs on two spawned worker processes; a worker that dies is named in one line."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    results = {}
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {job: pool.submit(_predict_file, *job) for job in jobs}
        for job, future in tqdm(futures.items(), desc="grading", disable=not progress, leave=False, unit="pass"):
            try:
                results[job] = future.result()
            except BrokenProcessPool:
                raise MobilepruneError(_which_died(jobs, job)) from None
    return results


def _which_died(jobs: list[tuple], first_broken: tuple) -> str:
    """The one line for a broken pool. A worker's death breaks every pending job, so the first broken
    one need not be the culprit: a .pte that aborts the runtime may end its worker while the .pth's is
    still running. A .pte among the jobs is run alone in a child process to say which."""
    from .export import probe_pte

    for kind, path, *_ in jobs:
        if kind == "pte":
            try:
                probe_pte(path)
            except MobilepruneError:
                return f"{path}: not a loadable ExecuTorch program (the runtime aborted on it)"
    return f"{first_broken[1]}: its evaluation process died"


def grade(submission: str | Path, data: str | Path | None = None, limit: int | None = None,
          variants: tuple[str, ...] = RESIZE_VARIANTS, trust_pickle: bool = False, device: str = "cpu",
          progress: bool = True, pte: str | Path | None = None, runner: str | Path | None = None,
          int8: bool = False) -> GradeResult:
    """Grade a hand-in as the lab's graders do: a folder in the lab's layout (``model/mobilenet.pth``,
    ``model/mobilenet.pte``, ``data/test_batch.bin``) or its zip, a folder holding mobilenet.pth and
    mobilenet.pte (a stage folder, or a run whose ``prune/`` holds them), or a .pth (with ``pte``,
    else the .pte of the same name beside it, if any).

    The .pth (eager, under each resize) and the .pte (ExecuTorch, likewise) are measured in two
    worker processes: a damaged program from elsewhere ends in a one-line error, not in a native
    abort of this process, and the grade of a 45-MFLOP hand-in takes about a minute and a half on
    2 cores, not six. With ``runner`` (``build/xnn_executor_runner``) the .pte is also graded by the
    lab's own command, beside them. On a GPU (``device``) the .pth is measured here. ``int8``: grade
    ``mobilenet.int8.pte`` beside the .pth instead (``export --int8`` writes it), exactly as the fp32 one.
    """
    from .export import check_pte_file
    from .models import changed_strides, load_pickled_model

    submission = Path(submission)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack_submission(submission, Path(tmp))
        pth, found_pte = model_files(submission, root)
        root = root if root.is_dir() else root.parent
        if pte is not None and not Path(pte).is_file():
            raise MobilepruneError(f"{pte}: no such file")
        pte = Path(pte) if pte is not None else found_pte.with_suffix(".int8.pte") if int8 else found_pte
        if int8 and not pte.is_file():
            raise MobilepruneError(f"{pte}: no such file (write it: mobileprune export MODEL --out DIR --int8)")
        model = load_pickled_model(pth, trust_pickle=trust_pickle)  # checks it is a torchvision MobileNetV2
        mflops, params = count_mflops(model)
        strides = changed_strides(model)
        if strides:
            notes.append(OPEN_TRACK_NOTE)
        has_pte = pte.is_file()
        if has_pte:
            check_pte_file(pte)  # a file that is no program at all is refused before any process starts
        test_file = root / "data" / TEST_BIN
        if not test_file.is_file():
            test_file = find_data_dir(data) / TEST_BIN
            notes.append(f"data/{TEST_BIN} not in the submission: used {test_file}")
        images, labels = read_cifar_bin(test_file)
        images, labels = images[:limit], labels[:limit]
        caveat = not_the_lab_test_set(images, labels, limit)
        on_cpu = torch.device(device).type == "cpu"
        jobs = [("pth", str(pth), str(test_file), limit, v, trust_pickle) for v in variants if on_cpu]
        jobs += [("pte", str(pte), str(test_file), limit, v, False) for v in variants if has_pte]
        native = start_native_runner(runner, pte, test_file, limit) if runner is not None and has_pte else None
        predictions = {(job[0], job[4]): found for job, found in _graded_predictions(jobs, progress).items()}
        if not on_cpu:
            predictions.update({("pth", v): predict(model, images, v, device=device) for v in variants})
        pth_accuracy = {v: (predictions["pth", v] == labels).float().mean().item() for v in variants}
        pte_accuracy = {v: (predictions["pte", v] == labels).float().mean().item() for v in variants} \
            if has_pte else None
        scores = scores_by_rule(mflops, pth_accuracy, pte_accuracy)
        notes += missing_notebook(root)
        if has_pte:
            runner_accuracy = finish_native_runner(native, runner, pte) if native is not None else None
            # Our runner resizes as torchvision does unless told otherwise (--resize runner).
            if runner_accuracy is not None and "torchvision" in pte_accuracy and \
                    abs(runner_accuracy - pte_accuracy["torchvision"]) > 5e-5:
                notes.append(f"the native runner printed {runner_accuracy:.4f}, the Python runtime gives "
                             f"{pte_accuracy['torchvision']:.4f} (torchvision resize)")
        else:
            runner_accuracy = None
            shown = pte.relative_to(root).as_posix() if pte.is_relative_to(root) else pte
            notes.append(f"no {shown}: graded the .pth alone (the lab's revised rules allow it)")
        shutil.rmtree(tmp, ignore_errors=True)
    # The headline score: the first edition's where the .pte allows it, else the revised one's.
    headline = scores["original" if has_pte else "revised"]
    return GradeResult(str(submission), mflops, params, len(labels), pth_accuracy, pte_accuracy,
                       headline["accuracy"], headline["score"], notes, caveat, runner_accuracy,
                       pte_file=str(pte) if has_pte else None, scores=scores, strides=strides)


def start_native_runner(runner: str | Path, pte: Path, test_file: Path, limit: int | None = None):
    """Begin the lab's command, ``xnn_executor_runner --model_path PTE``, on ``test_file``."""
    import subprocess

    runner = Path(runner)
    if not runner.is_file():
        raise MobilepruneError(f"{runner}: no runner there (build it: make runner)")
    command = [str(runner), "--model_path", str(pte), "--data", str(test_file)]
    return subprocess.Popen(command + (["--limit", str(limit)] if limit else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_native_runner(child, runner: str | Path, pte: Path) -> float:
    """The accuracy the runner printed (its last line, ``Accuracy: 0.xxxx``)."""
    stdout, stderr = child.communicate()
    last = (stdout.strip().splitlines() or [""])[-1]
    if child.returncode != 0 or not last.startswith("Accuracy: "):
        why = (stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]
        raise MobilepruneError(f"{runner}: failed on {pte} ({why})")
    return float(last.removeprefix("Accuracy: "))


def save_grade(result: GradeResult, folder: str | Path, stem: str = "grade") -> Path:
    """``folder/grade.json`` and ``grade.txt`` (``stem`` grade.int8 for the int8 program's): what
    ``report`` reads of a graded hand-in."""
    from .files import write_json

    folder = Path(folder)
    write_json(folder / f"{stem}.json", result.to_dict())
    (folder / f"{stem}.txt").write_text(format_grade(result) + "\n")
    return folder / f"{stem}.json"


def format_scores_by_rule(scores: dict[str, dict]) -> list[str]:
    """One line per edition of the rules: its score, whose accuracy and under which resize."""
    lines = []
    for rules in RULES:
        if rules.name in scores:
            s = scores[rules.name]
            lines.append(f"{'  ' + rules.name:<12} {s['score']:6.2f} %   (.{rules.accuracy_of} {s['accuracy']:.4f}, "
                         f"{s['resize']} resize{'' if s['resize'] == rules.resize else ', not the ' + rules.resize + ' one'})")
        else:
            lines.append(f"{'  ' + rules.name:<12}     --     (no .{rules.accuracy_of} to grade)")
    return lines


def format_grade(result: GradeResult) -> str:
    from .models import describe_strides

    lines = [f"submission   {result.submission}",
             f"model        {describe_strides(result.strides)}, checked",
             f"MFLOPs       {result.mflops:.6f}   ({result.mflops / DENSE_MFLOPS:.1%} of dense)",
             f"parameters   {result.params:,}",
             f"test images  {result.images:,}",
             "",
             f"{'accuracy':<12} " + "  ".join(f"{v:>11}" for v in result.pth_accuracy)]
    lines.append(f"{'.pth eager':<12} " + "  ".join(f"{a:>11.4f}" for a in result.pth_accuracy.values()))
    if result.pte_accuracy is not None:
        label = ".int8.pte" if (result.pte_file or "").endswith(".int8.pte") else ".pte xnnpack"
        lines.append(f"{label:<12} " + "  ".join(f"{a:>11.4f}" for a in result.pte_accuracy.values()))
    if result.runner_accuracy is not None:
        lines.append(f"{'.pte runner':<12} {result.runner_accuracy:>11.4f}  {'':>11}   (build/xnn_executor_runner, "
                     "the lab's command: torchvision's resize)")
    lines += ["", f"lab score    {result.score:.2f} %   (MFLOPs {result.mflops:.2f}, accuracy "
                  f"{result.score_accuracy:.4f}; full marks at 45 MFLOPs and >= {ACCURACY_BAR})"]
    lines += format_scores_by_rule(result.scores)
    if result.not_lab_grade:
        lines.append(f"NOT THE LAB'S SCORE: {result.not_lab_grade}")
    lines += [f"note         {n}" for n in result.notes]
    return "\n".join(lines)
