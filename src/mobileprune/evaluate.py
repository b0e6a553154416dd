"""Measuring a model as the lab's grader does: MFLOPs, accuracy of the .pth and the .pte, the score.

The grader's steps, in order: ``model = torch.load("model/mobilenet.pth")``; MFLOPs =
``tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 224, 224))[0] / 1e6``; then
``./xnn_executor_runner --model_path model/mobilenet.pte`` on ``data/test_batch.bin``, which prints
the accuracy. ``grade`` reproduces them and adds the .pth's accuracy under both resize variants.
"""
from __future__ import annotations

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


@torch.no_grad()
def predict(model, images: torch.Tensor, variant: str = "torchvision", batch_size: int = 250,
            device: str | torch.device = "cpu", progress: bool = False, desc: str = "eval",
            size: int = INPUT_SIZE) -> torch.Tensor:
    """Predicted classes of uint8 CIFAR images; ``model`` is an nn.Module or a PteModel.

    ``size`` other than 224 is for quick CPU runs only; grading always runs at 224.
    """
    is_module = isinstance(model, nn.Module)
    if is_module:
        model = model.to(device).eval()
    predictions = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = images[start:start + batch_size].to(device if is_module else "cpu")
        x = preprocess(batch, size, variant)
        if is_module and torch.device(device).type == "cuda":
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

    def to_dict(self) -> dict:
        return asdict(self)


def _unpack(submission: Path, workdir: Path) -> Path:
    if not submission.exists():
        raise MobilepruneError(f"{submission}: no such file or folder")
    if submission.is_dir() or submission.suffix == ".pth":
        return submission
    if not zipfile.is_zipfile(submission):
        raise MobilepruneError(f"{submission}: neither a folder nor a zip file")
    with zipfile.ZipFile(submission) as z:
        z.extractall(workdir)
    # A zip may wrap everything in one top folder.
    for candidate in (workdir, *sorted(p for p in workdir.iterdir() if p.is_dir())):
        if (candidate / "model" / "mobilenet.pth").is_file() or (candidate / "mobilenet.pth").is_file():
            return candidate
    return workdir


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


def _model_files(submission: Path, root: Path) -> tuple[Path, Path]:
    """The .pth to grade and the .pte beside it: a .pth given by name, or mobilenet.pth in the lab's
    ``model/`` folder or in the folder itself (as a run's stage folder holds it)."""
    if root.suffix == ".pth":
        return root, root.with_suffix(".pte")
    for folder in (root / "model", root):
        if (folder / "mobilenet.pth").is_file():
            return folder / "mobilenet.pth", folder / "mobilenet.pte"
    raise MobilepruneError(f"{submission}: holds no mobilenet.pth (looked in model/ and in the folder itself)")


def grade(submission: str | Path, data: str | Path | None = None, limit: int | None = None,
          variants: tuple[str, ...] = RESIZE_VARIANTS, trust_pickle: bool = False, device: str = "cpu",
          progress: bool = True, pte: str | Path | None = None) -> GradeResult:
    """Grade a hand-in as the lab's graders do: a folder in the lab's layout (``model/mobilenet.pth``,
    ``model/mobilenet.pte``, ``data/test_batch.bin``) or its zip, a folder holding mobilenet.pth and
    mobilenet.pte, or a .pth (with ``pte``, else the .pte of the same name beside it, if any).

    The .pte is first loaded in a child process (``export.probe_pte``): a damaged program from
    elsewhere ends in a one-line error, not in a native abort of this process.
    """
    from .export import PteModel
    from .models import load_pickled_model

    submission = Path(submission)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _unpack(submission, Path(tmp))
        pth, found_pte = _model_files(submission, root)
        root = root if root.is_dir() else root.parent
        if pte is not None and not Path(pte).is_file():
            raise MobilepruneError(f"{pte}: no such file")
        pte = Path(pte) if pte is not None else found_pte
        model = load_pickled_model(pth, trust_pickle=trust_pickle)  # checks it is a torchvision MobileNetV2
        mflops, params = count_mflops(model)
        test_file = root / "data" / TEST_BIN
        if not test_file.is_file():
            test_file = find_data_dir(data) / TEST_BIN
            notes.append(f"data/{TEST_BIN} not in the submission: used {test_file}")
        images, labels = read_cifar_bin(test_file)
        images, labels = images[:limit], labels[:limit]
        caveat = not_the_lab_test_set(images, labels, limit)
        pth_accuracy = {v: accuracy(model, images, labels, v, device=device, progress=progress, desc=f".pth {v}")
                        for v in variants}
        pte_accuracy = None
        if pte.is_file():
            runtime_model = PteModel(pte, isolate=True)
            pte_accuracy = {v: accuracy(runtime_model, images, labels, v, batch_size=100, progress=progress,
                                        desc=f".pte {v}") for v in variants}
            # The runner measures the .pte; its grid is the 'runner' variant where we measured it.
            score_accuracy = pte_accuracy.get("runner", next(iter(pte_accuracy.values())))
        else:
            shown = pte.relative_to(root).as_posix() if pte.is_relative_to(root) else pte
            notes.append(f"no {shown}: graded the .pth alone (the lab's revised rules allow it)")
            score_accuracy = pth_accuracy.get("torchvision", next(iter(pth_accuracy.values())))
        shutil.rmtree(tmp, ignore_errors=True)
    return GradeResult(str(submission), mflops, params, len(labels), pth_accuracy, pte_accuracy, score_accuracy,
                       lab_score(mflops, score_accuracy), notes, caveat)


def format_grade(result: GradeResult) -> str:
    lines = [f"submission   {result.submission}",
             f"model        torchvision MobileNetV2 (checked)",
             f"MFLOPs       {result.mflops:.6f}   ({result.mflops / DENSE_MFLOPS:.1%} of dense)",
             f"parameters   {result.params:,}",
             f"test images  {result.images:,}",
             "",
             f"{'accuracy':<12} " + "  ".join(f"{v:>11}" for v in result.pth_accuracy)]
    lines.append(f"{'.pth eager':<12} " + "  ".join(f"{a:>11.4f}" for a in result.pth_accuracy.values()))
    if result.pte_accuracy is not None:
        lines.append(f"{'.pte xnnpack':<12} " + "  ".join(f"{a:>11.4f}" for a in result.pte_accuracy.values()))
    lines += ["", f"lab score    {result.score:.2f} %   (MFLOPs {result.mflops:.2f}, accuracy "
                  f"{result.score_accuracy:.4f}; full marks at 45 MFLOPs and >= {ACCURACY_BAR})"]
    if result.not_lab_grade:
        lines.append(f"NOT THE LAB'S SCORE: {result.not_lab_grade}")
    lines += [f"note         {n}" for n in result.notes]
    return "\n".join(lines)
