"""Distillation: a fast 32-px teacher, then several pruned students trained together on one wall-clock budget.

Why a 32-px teacher. A student is a channel-pruned MobileNetV2 fed the 224-px bilinear upsample
of a 32-px CIFAR-10 image; the upsample holds nothing the original does not, so the teacher reads
the original. A ResNet-style net at 32 px (``models.TeacherNet``, airbench's recipe) reaches about
96 % in about a minute of one GPU, where our dense MobileNetV2 (93.5 %) spends 319 MFLOPs an image
at 224 px on every distillation step.

Why several students at once. Each batch of training images is read, augmented and passed
through the teacher once; then every student takes its own step on the batch's 224-px upsample.
One lease trains a whole accuracy-against-MFLOPs curve.

Why a wall-clock budget. GPU minutes are lent, not owned, and the machine is not always the same:
the learning rate follows the fraction of the budget spent, not of an epoch count, and reaches its
floor when the budget ends, however many epochs that was. Everything before the students (the
teacher's training, or loading it) is paid out of the same budget.

A run folder::

    teacher/            teacher.pt (bf16 state_dict + shape), summary.json, history.csv, last.pt (resume)
    student-<target>/   mobilenet.pt + mobilenet.layout.json (best epoch on validation), summary.json, history.csv
    last.pt             every student's training state (one file, written whole: a resume finds them in step)
    summary.json        the stage: budget, seconds, throughput, each student's best

The test set is never looked at here: a student is chosen on the validation split, and
``finish_students`` (after ``mobileprune unpack``, on a machine that has the test batch) reports
its test accuracy.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import INPUT_SIZE, RESIZE_VARIANTS, Cifar10, augment, augment_views, cutout, preprocess
from .errors import MobilepruneError, check_known_settings, first_line
from .files import cast_floats, pack, read_csv, save_torch, write_csv, write_json
from .models import (TeacherNet, channel_layout, check_torch_file, load_state_with_layout, load_teacher,
                     save_state_with_layout, save_teacher)
from .train import (autocast, bf16_supported, check_bf16_setting, choose_bf16, current_chunk, describe_precision,
                    distillation_loss, time_left)

TEACHER_RESOLUTION = 32
STUDENT_FILE = "student.json"  # what `prepare_students` writes beside each student's weights


# ----------------------------------------------------------------------------- settings
@dataclass
class TeacherConfig:
    """airbench's hyperparameters in its decoupled form (lr and weight decay per 1,024 examples)."""

    widths: list[int] = field(default_factory=lambda: [128, 384, 384])  # 7.4 M params: 14.8 MB in bf16
    depth: int = 3
    epochs: float = 37.0
    # > 0: the schedule also ends after this many seconds (a CPU run measured in fixed time)
    budget_s: float = 0.0
    batch_size: int = 1024
    lr: float = 9.0
    momentum: float = 0.85
    weight_decay: float = 0.012
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster (airbench)
    label_smoothing: float = 0.2
    whiten_bias_epochs: float = 3.0  # the whitening layer's bias trains this long, then is frozen
    warmup: float = 0.1  # fraction of the schedule
    translate: int = 4  # random translation (reflect-padded crop), pixels
    cutout: int = 12  # a random square of this side zeroed per image; 0: off
    lookahead: bool = True  # airbench's weight averaging: every 5 steps the weights move to an EMA of themselves
    tta_level: int = 2  # validation with 0: one view, 1: + mirror, 2: + 1-px translations
    seed: int = 0
    bf16: bool | str = "auto"  # "auto": on CUDA, and on a CPU where a short probe measures it faster
    eval_batch_size: int = 1000

    @classmethod
    def from_dict(cls, values: dict) -> "TeacherConfig":
        check_known_settings(cls, values, "[teacher]")
        config = cls(**values)
        if config.depth not in (2, 3) or not config.widths:
            raise MobilepruneError(f"[teacher] depth must be 2 or 3 and widths a list (got {config.depth}, "
                                   f"{config.widths})")
        if config.tta_level not in (0, 1, 2):
            raise MobilepruneError(f"[teacher] tta_level must be 0, 1 or 2 (got {config.tta_level})")
        check_bf16_setting(config.bf16, "[teacher]")
        _check_positive(config, "[teacher]", "epochs", "batch_size", "lr", "eval_batch_size")
        return config


@dataclass
class StudentConfig:
    """How the students train: one schedule, shared, set by a wall-clock budget."""

    budget_s: float = 420.0  # the whole command: teacher (or its loading), students, final validation
    reserve_s: float = 20.0  # kept back from the students for the last validation and packing
    max_epochs: int = 0  # > 0: stop after this many epochs even if time is left (tests, CPU rehearsals)
    batch_size: int = 512
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    warmup: float = 0.03  # fraction of the budget
    lr_floor: float = 0.0  # fraction of the peak lr reached when the budget ends
    kd_alpha: float = 0.8  # weight of the distillation term
    kd_temperature: float = 4.0
    teacher_flip: bool = True  # the teacher's target is the mean of its logits on the image and its mirror
    # The teacher's logits for every view the students can draw ((2 translate + 1)^2 crops, each
    # mirrored or not), computed once beside the teacher and read back every epoch: the same
    # targets (stored in fp16) without a teacher forward per step. It costs (2 translate + 1)^2
    # x 2 teacher passes over the training split, what on-the-fly distillation spends in
    # (2 translate + 1)^2 student epochs (translate 2: 25), so it pays for long CPU runs and for
    # every further run from the same teacher (docs/method.md).
    teacher_cache: bool = False
    translate: int = 2
    flip: bool = True
    # A batch's 224-px view is one of these, drawn per batch (the grader resizes both ways).
    resize_variants: list[str] = field(default_factory=lambda: list(RESIZE_VARIANTS))
    resolution: int = INPUT_SIZE  # the students' validation (and training) input; only tests go smaller
    # Progressive resizing, as [train] resolutions: the schedule split evenly over these training
    # inputs, say [112, 112, 112, 224] (three quarters at about a quarter of the cost, a finish at
    # the lab's size to re-learn its scale and BatchNorm statistics). The epoch kept is chosen at
    # ``resolution``, the size the grader uses, among the epochs trained there; one trained smaller is
    # validated at its own size only (its curve). Empty: ``resolution``.
    resolutions: list[int] = field(default_factory=list)
    ema_decay: float = 0.0  # > 0: also keep an EMA of each student's weights; validation picks either
    # "auto": on CUDA; on a CPU chosen per student (and for the teacher's forward) by a short probe
    bf16: bool | str = "auto"
    channels_last: bool = True  # CUDA only
    # cuDNN autotuning (CUDA only): the students' shapes stay fixed all run, but the dense baseline's
    # first epoch at each new shape took 35-41 s against 4-7 s with it on (H100): off until measured.
    cudnn_benchmark: bool = False
    eval_batch_size: int = 500
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "StudentConfig":
        check_known_settings(cls, values, "[distill]")
        config = cls(**values)
        _check_positive(config, "[distill]", "batch_size", "lr", "eval_batch_size", "resolution")
        if not (config.max_epochs > 0 and config.budget_s == 0):  # 0 with max_epochs: a schedule in epochs alone
            _check_positive(config, "[distill]", "budget_s")
        if not 0 <= config.ema_decay < 1 or not 0 <= config.kd_alpha <= 1 or not 0 <= config.warmup < 1:
            raise MobilepruneError("[distill] ema_decay must be in [0, 1), kd_alpha in [0, 1] and warmup in [0, 1)")
        variants = [config.resize_variants] if isinstance(config.resize_variants, str) else config.resize_variants
        for variant in variants:
            if variant not in RESIZE_VARIANTS:
                raise MobilepruneError(f"unknown resize variant {variant!r}; choose from {', '.join(RESIZE_VARIANTS)}")
        config.resize_variants = list(variants)
        if not isinstance(config.resolutions, list) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in config.resolutions):
            raise MobilepruneError(f"[distill] resolutions must be a list of positive pixel sizes "
                                   f"(got {config.resolutions!r})")
        check_bf16_setting(config.bf16, "[distill]")
        return config

    def resolution_at(self, fraction: float) -> int:
        """The training input at this fraction of the schedule."""
        if not self.resolutions:
            return self.resolution
        return self.resolutions[min(len(self.resolutions) - 1, int(fraction * len(self.resolutions)))]


def _check_positive(config, table: str, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise MobilepruneError(f"{table} {name} must be a positive number (got {value!r})")


# ----------------------------------------------------------------------------- schedule
class Budget:
    """How far a schedule has come, from 0 to 1: by steps, by seconds, or by whichever ends first.

    ``spent`` seconds are carried across a resume, so a run killed and restarted picks up its
    learning-rate curve where it stopped. ``clock`` is injectable: tests run on a fake one.
    """

    def __init__(self, steps: int | None = None, seconds: float | None = None, spent: float = 0.0,
                 clock=time.monotonic):
        if not steps and not seconds:
            raise ValueError("a budget needs steps or seconds")
        self.steps, self.seconds, self.clock = steps, seconds, clock
        self._started = clock() - spent

    def spent(self) -> float:
        return self.clock() - self._started

    def progress(self, step: int) -> float:
        fractions = [step / self.steps] if self.steps else []
        if self.seconds:
            fractions.append(self.spent() / self.seconds)
        return min(1.0, max(fractions))

    def done(self, step: int, step_seconds: float = 0.0) -> bool:
        """Whether the schedule is over: all of it spent, or (by seconds) less than one more step of it left.

        Without the second rule an epoch could begin with a fraction of a step to run and then pay a
        whole validation (a minute and more on a CPU) for it.
        """
        return self.progress(step) >= 1 or bool(self.seconds and self.seconds - self.spent() < step_seconds)

    def epochs_left(self, step: int, steps_per_epoch: int, epoch_seconds: float) -> float:
        """Epochs until the schedule ends, by its steps or by its seconds at ``epoch_seconds`` an epoch: the first."""
        left = [(self.steps - step) / steps_per_epoch] if self.steps else []
        if self.seconds:
            left.append(max(0.0, self.seconds - self.spent()) / max(1e-9, epoch_seconds))
        return min(left)


def lr_factor(progress: float, warmup: float, start: float = 0.0, floor: float = 0.0) -> float:
    """Linear warm-up from ``start`` to 1 over the first ``warmup`` of the schedule, then linear down to ``floor``.

    airbench's triangle: a linear decay to the floor anneals as well as a cosine in short runs and
    keeps every point of the curve a plain function of the fraction of the budget spent.
    """
    if progress < warmup:
        return start + (1 - start) * progress / warmup
    return floor + (1 - floor) * (1 - progress) / max(1e-12, 1 - warmup)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, tta_level: int = 0) -> torch.Tensor:
    """Logits of normalised 32-px images, averaged over views: 0 one, 1 with the mirror, 2 with 1-px shifts too."""
    def mirrored(images):
        if tta_level == 0:
            return teacher(images).float()
        both = teacher(torch.cat([images, images.flip(-1)])).float()
        return (both[:len(images)] + both[len(images):]) / 2

    logits = mirrored(x)
    if tta_level == 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [mirrored(padded[:, :, :-2, :-2]), mirrored(padded[:, :, 2:, 2:])]
        logits = (logits + (shifted[0] + shifted[1]) / 2) / 2
    return logits


@torch.no_grad()
def teacher_accuracy(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, tta_level: int = 0,
                     batch_size: int = 1000, bf16: bool = False) -> float:
    """Accuracy of the teacher on uint8 images (on the teacher's device)."""
    device = next(teacher.parameters()).device
    teacher.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = preprocess(images[start:start + batch_size].to(device), TEACHER_RESOLUTION)
        with autocast(bf16, device):
            logits = teacher_logits(teacher, x, tta_level)
        correct += (logits.argmax(1) == labels[start:start + batch_size].to(device)).sum().item()
    return correct / max(1, len(labels))


@torch.no_grad()
def teacher_accuracies(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
                       bf16: bool = False) -> dict[int, float]:
    """Accuracy at every TTA level (0, 1, 2) from one pass over the six views ``teacher_logits`` averages.

    Each level alone would run 1 + 2 + 6 views; this runs the six once.
    """
    device = next(teacher.parameters()).device
    teacher.eval()
    correct = {0: 0, 1: 0, 2: 0}
    for start in range(0, len(labels), batch_size):
        x = preprocess(images[start:start + batch_size].to(device), TEACHER_RESOLUTION)
        target = labels[start:start + batch_size].to(device)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        with autocast(bf16, device):
            views = [teacher(torch.cat([v, v.flip(-1)])).float() for v in (x, padded[:, :, :-2, :-2],
                                                                             padded[:, :, 2:, 2:])]
        n = len(x)
        mirrored = [(v[:n] + v[n:]) / 2 for v in views]
        by_level = {0: views[0][:n], 1: mirrored[0], 2: (mirrored[0] + (mirrored[1] + mirrored[2]) / 2) / 2}
        for level, logits in by_level.items():
            correct[level] += (logits.argmax(1) == target).sum().item()
    return {level: c / max(1, len(labels)) for level, c in correct.items()}


# ----------------------------------------------------------------------------- the teacher
def train_teacher(data: Cifar10, config: TeacherConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                  progress: bool = True, clock=time.monotonic, log_epochs: bool = True) -> tuple[TeacherNet, dict]:
    """Train the 32-px teacher on ``data.train``; returns it and its summary (validation with and without TTA).

    Writes ``teacher.pt`` (bf16) and ``summary.json`` when done; ``last.pt`` after every epoch, from
    which an interrupted run resumes. A finished teacher is loaded, not trained again. One line per
    epoch unless ``log_epochs`` is off (progress bars only with ``progress``).
    """
    out = Path(out_dir)
    if (out / "teacher.pt").is_file() and (out / "summary.json").is_file():
        return load_teacher(out / "teacher.pt").to(device), json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    torch.manual_seed(config.seed)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    if len(labels) < config.batch_size:
        raise MobilepruneError(f"the teacher's batch of {config.batch_size} is larger than the training split "
                               f"({len(labels)} images)")
    model = TeacherNet(config.widths, config.depth).to(device)
    model.init_whitening(preprocess(images[:5000], TEACHER_RESOLUTION))
    # channels_last on a CPU too: 111 against 91 images/s in bf16 for airbench96's shape (2-core Zen 4).
    model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(labels) // config.batch_size
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    total_epochs = math.ceil(config.epochs)
    # airbench's decoupled form: lr and weight decay per 1,024 examples, independent of momentum,
    # for a loss summed (not averaged) over the batch.
    kilostep = 1024 * (1 + 1 / (1 - config.momentum))
    lr, decay = config.lr / kilostep, config.weight_decay * config.batch_size / kilostep
    biases = [p for name, p in model.named_parameters() if "norms" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "norms" not in name and p.requires_grad]
    optimizer = torch.optim.SGD([{"params": biases, "lr": lr * config.bias_scaler,
                                  "weight_decay": decay / (lr * config.bias_scaler)},
                                 {"params": others, "lr": lr, "weight_decay": decay / lr}],
                                momentum=config.momentum, nesterov=True)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    generator = torch.Generator().manual_seed(config.seed)
    step, history, spent = 0, [], 0.0
    lookahead = [p.detach().clone() for p in model.state_dict().values()] if config.lookahead else None
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True) if (out / "last.pt").is_file() else None
    # Chosen once per run, kept in last.pt: every chunk of the schedule trains as the first did.
    precision = (state or {}).get("precision") or choose_bf16(config.bf16, model, TEACHER_RESOLUTION,
                                                             config.batch_size, device, channels_last=True)
    bf16 = precision["bf16"]
    if state is None and log_epochs:
        tqdm.write(f"teacher {config.widths} x{config.depth}, {total_epochs} epochs: {describe_precision(precision)}")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["data_rng"])
        step, history, spent = state["step"], state["history"], state["spent"]
        if lookahead is not None:
            lookahead = [t.to(device) for t in state["lookahead"]]
        if log_epochs:
            tqdm.write(f"teacher: resuming {out / 'last.pt'} after epoch {len(history)} (step {step}, "
                       f"{spent:.0f} s spent)")
    budget = Budget(total_steps, config.budget_s or None, spent=spent, clock=clock)

    while budget.progress(step) < 1:
        epoch = step // steps_per_epoch
        if epoch >= config.whiten_bias_epochs:
            model.whiten.bias.requires_grad_(False)
        model.train()
        started, loss_sum, seen = clock(), torch.zeros((), device=device), 0
        order = torch.randperm(len(labels), generator=generator).to(device)
        bar = tqdm(range(steps_per_epoch), disable=not progress, leave=False, unit="batch",
                   desc=f"teacher epoch {epoch + 1}")
        for i in bar:
            fraction = budget.progress(step)
            if fraction >= 1:
                break
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor(fraction, config.warmup, start=0.2)
            batch = augment(images[order[i * config.batch_size:(i + 1) * config.batch_size]], generator,
                            pad=config.translate)
            if config.cutout:
                batch = cutout(batch, config.cutout, generator)
            x = preprocess(batch, TEACHER_RESOLUTION).contiguous(memory_format=torch.channels_last)
            target = labels[order[i * config.batch_size:(i + 1) * config.batch_size]]
            with autocast(bf16, device):
                loss = F.cross_entropy(model(x).float(), target, label_smoothing=config.label_smoothing,
                                       reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach()
            seen += len(target)
            if lookahead is not None and step % 5 == 0:
                _lookahead_step(model, lookahead, 0.95 ** 5 * budget.progress(step) ** 3)
        val = teacher_accuracy(model, data.val_images, data.val_labels, 0, config.eval_batch_size, bf16)
        history.append({"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / max(1, seen),
                        "val_accuracy": val, "seconds": clock() - started, "spent": budget.spent()})
        epoch_seconds = history[-1]["seconds"]
        if log_epochs:
            left = f", {time_left(total_epochs - epoch - 1, epoch_seconds)}" if epoch + 1 < total_epochs else ""
            tqdm.write(f"teacher epoch {epoch + 1}/{total_epochs}: loss {history[-1]['train_loss']:.4f}  "
                       f"val {val:.4f}  ({epoch_seconds:.1f}s, {budget.spent():.0f}s in all{left})")
        save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "history": history, "spent": budget.spent(), "data_rng": generator.get_state(),
                    "lookahead": [t.cpu() for t in lookahead] if lookahead is not None else None,
                    "precision": precision}, out / "last.pt")
        write_csv(history, out / "history.csv")
        if budget.progress(step) < 1:
            current_chunk().end_if_no_room("teacher", epoch + 1, total_epochs, epoch_seconds)
    if lookahead is not None:
        _lookahead_step(model, lookahead, 1.0)  # the averaged weights are the result
    model.eval()
    summary = {"widths": config.widths, "depth": config.depth, "epochs": round(step / steps_per_epoch, 2),
               "steps": step, "seconds": budget.spent(), "train_images": len(labels),
               "images_per_s": step * config.batch_size / max(1e-9, budget.spent()),
               "params": sum(p.numel() for p in model.parameters()), "val_images": len(data.val_labels),
               **_accuracy_keys("val", teacher_accuracies(model, data.val_images, data.val_labels,
                                                          config.eval_batch_size, bf16), config.tta_level),
               "tta_level": config.tta_level, "device": str(device), "precision": precision,
               "config": asdict(config)}
    save_teacher(model, out / "teacher.pt")
    write_csv(history, out / "history.csv")
    write_json(out / "summary.json", summary)
    return model, summary


def _accuracy_keys(split: str, by_level: dict[int, float], tta_level: int) -> dict[str, float]:
    """A summary's accuracy keys: one view, with the mirror, and at the run's TTA level."""
    return {f"{split}_accuracy": by_level[0], f"{split}_accuracy_flip": by_level[1],
            f"{split}_accuracy_tta": by_level[tta_level]}


def release_teacher(run: str | Path, release: str | Path, val: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor], command: str, machine: str,
                    progress: bool = True) -> tuple[dict, bool]:
    """A finished teacher released to ``release``: teacher.pt, history.csv and summary.json.

    The summary is the run's, its accuracies measured again on the stored bf16 weights (what students
    learn from), with the test accuracy, the CPU hours, the command and the machine. The test set is
    looked at once: a release of the same teacher.pt is returned as it is (the second value False).
    The folder is written beside ``release`` and moved into place whole.
    """
    import hashlib
    import shutil
    import tempfile

    run, release = Path(run), Path(release)
    if not ((run / "teacher.pt").is_file() and (run / "summary.json").is_file()):
        raise MobilepruneError(f"{run}: the teacher is not finished (no teacher.pt and summary.json); run the "
                               "same `mobileprune teacher` command until it ends")
    digest = hashlib.sha256((run / "teacher.pt").read_bytes()).hexdigest()
    try:
        released = json.loads((release / "summary.json").read_text())
    except (OSError, ValueError):
        released = None
    if released and released.get("sha256") == digest and released.get("test_accuracy") is not None:
        return released, False
    trained = json.loads((run / "summary.json").read_text())
    teacher = load_teacher(run / "teacher.pt")
    # Measured as it was trained: bf16 autocast where the run used it and this CPU has the kernels.
    bf16 = bool((trained.get("precision") or {}).get("bf16")) and bf16_supported(torch.device("cpu"))
    batch = trained.get("config", {}).get("eval_batch_size", 1000)
    level = trained.get("tta_level", 2)
    measured = {}
    for split, (images, labels) in (("val", val), ("test", test)):
        if progress:
            tqdm.write(f"teacher release: {split} accuracy of the stored teacher, {len(labels):,} images x 6 views")
        measured |= _accuracy_keys(split, teacher_accuracies(teacher, images, labels, batch, bf16), level)
    epochs = read_csv(run / "history.csv") if (run / "history.csv").is_file() else []
    summary = {**trained, **measured, "val_images": len(val[1]), "test_images": len(test[1]),
               "val_accuracy_trained": trained.get("val_accuracy"), "stored": "bf16",
               "measured_in": "bf16" if bf16 else "fp32", "sha256": digest, "cpu_hours": trained["seconds"] / 3600,
               "epoch_seconds": [round(r["seconds"], 1) for r in epochs],
               "command": command, "machine": machine, "released_from": str(run)}
    release.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=release.parent, prefix=f".{release.name}."))
    try:
        shutil.copyfile(run / "teacher.pt", tmp / "teacher.pt")
        if epochs:
            shutil.copyfile(run / "history.csv", tmp / "history.csv")
        write_json(tmp / "summary.json", summary)
        old = release.with_name(f".{release.name}.old")
        if release.exists():
            shutil.rmtree(old, ignore_errors=True)
            release.rename(old)
        tmp.rename(release)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary, True


@torch.no_grad()
def _lookahead_step(model: nn.Module, averaged: list[torch.Tensor], decay: float) -> None:
    """Move the EMA ``averaged`` towards the weights by ``1 - decay``, then put the weights there (airbench)."""
    for average, tensor in zip(averaged, model.state_dict().values()):
        if tensor.is_floating_point():
            average.lerp_(tensor, 1 - decay)
            tensor.copy_(average)


# ----------------------------------------------------------------------------- the teacher cache
def cache_path(teacher_dir: str | Path, translate: int, teacher_flip: bool) -> Path:
    """Where a teacher's cache of logits lives: beside it, named by the views it holds."""
    return Path(teacher_dir) / f"logits-translate{translate}{'-flipmean' if teacher_flip else ''}.pt"


def _digest(tensors) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_teacher_cache(teacher: nn.Module, images: torch.Tensor, path: str | Path, translate: int,
                        teacher_flip: bool = True, bf16="auto", batch_size: int = 500,
                        device: str | torch.device = "cpu", log: bool = True) -> torch.Tensor:
    """The teacher's logits for every view ``augment_views`` can make of ``images`` (uint8, N x 3 x 32 x 32).

    Returns fp16 ``[N, P, P, F, 10]`` with P = 2 * translate + 1 crop offsets each way and F = 1 (the
    mean over the view and its mirror, the target ``teacher_flip`` asks for: a view's mirror is the
    same crop, so both share it) or 2 (plain, then mirrored). Written to ``path`` with the digests
    of the teacher's weights and of the images: a cache of another teacher or other images is
    refused, not used. Built one crop offset at a time, kept in ``path``.partial after each, so it
    resumes and a chunk (``--stop-after``) may end between two offsets.
    """
    path, device = Path(path), torch.device(device)
    teacher = teacher.to(device).eval()
    meta = {"teacher": _digest(teacher.state_dict().values()), "images": _digest([images]), "translate": translate,
            "teacher_flip": teacher_flip}
    partial = path.with_name(path.name + ".partial")
    for candidate in (path, partial):
        if candidate.is_file():
            state = torch.load(candidate, map_location="cpu", weights_only=True)
            if state["meta"] != meta:
                raise MobilepruneError(f"{candidate}: a cache of another teacher, other training images or other "
                                       f"views ({state['meta']} against {meta}); delete it or use another teacher folder")
            if candidate == path:
                return state["logits"]
            break
    else:
        state = None
    side, flips = 2 * translate + 1, 1 if teacher_flip else 2
    positions = [(dy, dx) for dy in range(side) for dx in range(side)]
    if state is None:
        precision = choose_bf16(bf16, teacher, TEACHER_RESOLUTION, batch_size, device, channels_last=True, train=False)
        state = {"meta": meta, "precision": precision, "done": 0, "seconds": 0.0,
                 "logits": torch.zeros(len(images), side, side, flips, 10, dtype=torch.float16)}
        if log:
            tqdm.write(f"teacher cache: {len(positions)} crop offsets x {len(images)} images, "
                       f"{describe_precision(precision)}")
    logits, use_bf16 = state["logits"], state["precision"]["bf16"]
    for k in range(state["done"], len(positions)):
        dy, dx = positions[k]
        started = time.monotonic()
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            padded = F.pad(batch.float(), (translate,) * 4, mode="reflect")
            crop = padded[:, :, dy:dy + batch.shape[-2], dx:dx + batch.shape[-1]].to(batch.dtype)  # as augment_views
            x = preprocess(crop, TEACHER_RESOLUTION).contiguous(memory_format=torch.channels_last)
            with autocast(use_bf16, device), torch.no_grad():
                if teacher_flip:
                    out = teacher_logits(teacher, x, 1)[:, None]
                else:
                    out = torch.stack([teacher_logits(teacher, x, 0), teacher_logits(teacher, x.flip(-1), 0)], 1)
            logits[start:start + len(batch), dy, dx] = out.to("cpu", torch.float16)
        seconds = time.monotonic() - started
        state.update(done=k + 1, seconds=state["seconds"] + seconds)
        save_torch(state, partial)
        if log:
            left = f", {time_left(len(positions) - k - 1, seconds)}" if k + 1 < len(positions) else ""
            tqdm.write(f"teacher cache: crop offset {k + 1}/{len(positions)} ({seconds:.0f}s{left})")
        current_chunk().end_if_no_room("teacher cache", k + 1, len(positions), seconds)
    save_torch(state, path)
    partial.unlink(missing_ok=True)
    return logits


# ----------------------------------------------------------------------------- the students
@dataclass
class _Student:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: nn.Module | None
    record: dict  # student.json: target, MFLOPs, validation after pruning, pruning settings
    history: list = field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = 0
    best_weights: str = "model"  # or "ema"
    loss_sum: torch.Tensor | None = None  # this epoch's, summed on the device: no host sync per step


def read_students(folder: str | Path) -> dict[str, tuple[nn.Module, dict]]:
    """The students ``prepare_students`` wrote under ``folder``: {name: (model, its student.json)}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MobilepruneError(f"{folder}: no such folder of students (prepare them: mobileprune students)")
    found = {}
    for record in sorted(folder.glob(f"*/{STUDENT_FILE}")):
        try:
            meta = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MobilepruneError(f"{record}: not a student record ({e})") from None
        found[record.parent.name] = (load_state_with_layout(record.parent / "mobilenet.pt"), meta)
    if not found:
        raise MobilepruneError(f"{folder}: holds no students (*/{STUDENT_FILE}); prepare them: mobileprune students")
    return found


def _optimizer(model: nn.Module, config: StudentConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm scales and biases: decaying them only hurts small nets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return optimizer


@torch.no_grad()
def _ema_step(ema: nn.Module, model: nn.Module, decay: float) -> None:
    floats = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values()) if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - decay)


@torch.no_grad()
def student_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: StudentConfig,
                     device: torch.device, resolution: int | None = None) -> float:
    """Validation accuracy at the students' resolution (or ``resolution``), torchvision's resize (as every
    epoch is chosen); bf16 on CUDA only: a CPU chooses in fp32, as the grader runs the .pth."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), config.eval_batch_size):
        x = preprocess(images[start:start + config.eval_batch_size], resolution or config.resolution)
        if config.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(config.bf16 is not False and device.type == "cuda", device):
            correct += (model(x).argmax(1) == labels[start:start + config.eval_batch_size]).sum().item()
    return correct / max(1, len(labels))


def train_students(students: dict[str, tuple[nn.Module, dict]], teacher: nn.Module, data: Cifar10,
                   config: StudentConfig, out_dir: str | Path, seconds: float | None,
                   device: str | torch.device = "cpu",
                   progress: bool = True, clock=time.monotonic, log_epochs: bool = True,
                   cache: torch.Tensor | None = None) -> dict:
    """Train every student on the same batches for ``seconds`` (or ``config.max_epochs``); returns the stage's numbers.

    Per batch: the 32-px images are augmented once (flip, translation) on the device, the teacher
    gives its (mirror-averaged) logits once (or they are read from ``cache``, ``build_teacher_cache``'s
    logits of these training images: the same batches, the same targets up to fp16), and each student steps on the 224-px upsample (one
    resize variant per batch) with ``(1 - kd_alpha)`` label loss + ``kd_alpha`` KL to the teacher.
    After every epoch each student (and its EMA) is validated, the best kept as
    ``student-*/mobilenet.pt``, and the whole state written to ``last.pt``: a killed run resumes
    there, its time spent included.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if not students:
        raise MobilepruneError("no students to train")
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    val_images, val_labels = data.val_images.to(device), data.val_labels.to(device)
    if len(labels) < config.batch_size:
        raise MobilepruneError(f"the students' batch of {config.batch_size} is larger than the training split "
                               f"({len(labels)} images)")
    trainees = []
    for name, (model, record) in students.items():
        model = copy.deepcopy(model).to(device)
        if config.channels_last and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        ema = copy.deepcopy(model).eval() if config.ema_decay else None
        trainees.append(_Student(name, model, _optimizer(model, config), ema, record))
    steps_per_epoch = len(labels) // config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    step, epoch, spent, throughput = 0, 0, 0.0, []
    last = out / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else None
    if state is not None and sorted(state["students"]) != sorted(s.name for s in trainees):
        raise MobilepruneError(f"{last}: a run of students {sorted(state['students'])}, not "
                               f"{sorted(s.name for s in trainees)}; use another --out or delete it")
    # bf16 or not is measured for the teacher's forward and for each student at each training input
    # size it meets (a probe of a few steps, at that size's first step), and kept in last.pt: a
    # MobileNetV2 gains from bf16 at 224 px and not at 112 (docs/method.md), so one answer for a
    # progressive schedule would be wrong at one of its sizes.
    first_size = config.resolution_at(0)
    precision = (state or {}).get("precision") or {
        "teacher": choose_bf16(config.bf16, teacher, TEACHER_RESOLUTION, config.batch_size, device, train=False)}

    def student_bf16(s: _Student, size: int) -> bool:
        key = _precision_key(s.name, size, first_size)
        if key not in precision:
            precision[key] = choose_bf16(config.bf16, s.model, size, config.batch_size, device,
                                         config.channels_last and device.type == "cuda")
            if log_epochs and size != first_size:  # the first size's: in the run's first line
                tqdm.write(f"students: {key} {describe_precision(precision[key])}")
        return precision[key]["bf16"]

    if state is None:
        for s in trainees:
            student_bf16(s, first_size)
        if log_epochs:
            tqdm.write("students: " + ", ".join(f"{name} {describe_precision(record)}"
                                                for name, record in precision.items()))
    teacher_bf16 = precision["teacher"]["bf16"]
    if state is not None:
        for s in trainees:
            saved = state["students"][s.name]
            if saved["layout"] != channel_layout(s.model)["layers"]:
                raise MobilepruneError(f"{last}: student {s.name} was trained with other channel counts")
            s.model.load_state_dict(saved["model"])
            s.optimizer.load_state_dict(saved["optimizer"])
            if s.ema is not None and saved.get("ema") is not None:
                s.ema.load_state_dict(saved["ema"])
            s.history, s.best_val, s.best_epoch, s.best_weights = (saved["history"], saved["best_val"],
                                                                   saved["best_epoch"], saved["best_weights"])
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from it
        step, epoch, spent, throughput = state["step"], state["epoch"], state["spent"], state["throughput"]
        if log_epochs:
            tqdm.write(f"students: resuming {last} after epoch {epoch} ({spent:.0f} s spent)")
    if state is None:
        for s in trainees:
            if s.record.get("pruned") is False:  # a trained model distilled further (students --with-start)
                _keep_start(s, val_images, val_labels, config, device, out)
    budget = Budget(steps_per_epoch * config.max_epochs or None, seconds, spent=spent, clock=clock)
    variants = config.resize_variants

    # Decided once an epoch, so that its line, its chunk check and the loop agree.
    finished = budget.done(step, _step_seconds(throughput, config.batch_size))
    while not finished:
        for s in trainees:
            s.model.train()
            s.loss_sum = torch.zeros((), device=device)
        started, seen = clock(), 0
        train_resolution = config.resolution_at(budget.progress(step))
        order = torch.randperm(len(labels), generator=generator).to(device)
        bar = tqdm(range(steps_per_epoch), disable=not progress, leave=False, unit="batch",
                   desc=f"students epoch {epoch + 1}")
        for i in bar:
            fraction = budget.progress(step)
            if fraction >= 1:
                break
            factor = lr_factor(fraction, config.warmup, floor=config.lr_floor)
            index = order[i * config.batch_size:(i + 1) * config.batch_size]
            small, dy, dx, flipped = augment_views(images[index], generator, pad=config.translate, flip=config.flip)
            if cache is not None:
                view = torch.zeros_like(flipped, dtype=torch.long) if config.teacher_flip else flipped.long()
                soft = cache[index.cpu(), dy.cpu(), dx.cpu(), view.cpu()].to(device, torch.float32)
            else:
                with autocast(teacher_bf16, device):
                    soft = teacher_logits(teacher, preprocess(small, TEACHER_RESOLUTION),
                                          1 if config.teacher_flip else 0)
            variant = variants[int(torch.randint(len(variants), (1,), generator=generator))] if len(variants) > 1 \
                else variants[0]
            train_resolution = config.resolution_at(fraction)
            x = preprocess(small, train_resolution, variant)
            if config.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            target = labels[index]
            for s in trainees:
                for group in s.optimizer.param_groups:
                    group["lr"] = config.lr * factor
                with autocast(student_bf16(s, train_resolution), device):
                    logits = s.model(x).float()
                    loss = F.cross_entropy(logits, target, label_smoothing=config.label_smoothing)
                    if config.kd_alpha:
                        loss = (1 - config.kd_alpha) * loss + config.kd_alpha * distillation_loss(
                            logits, soft, config.kd_temperature)
                s.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                s.optimizer.step()
                if s.ema is not None:  # the EMA's horizon grows from a few steps to 1/(1 - decay)
                    _ema_step(s.ema, s.model, min(config.ema_decay, (1 + step) / (10 + step)))
                s.loss_sum += loss.detach() * len(target)
            step += 1
            seen += len(target)
        epoch += 1
        train_seconds = clock() - started
        throughput.append({"epoch": epoch, "images": seen, "students": len(trainees), "seconds": train_seconds})
        for s in trainees:
            _validate_and_keep(s, epoch, seen, train_seconds, val_images, val_labels, config, device, out, budget,
                               train_resolution)
        epoch_seconds = clock() - started  # validation included: what one more epoch will cost
        total_epochs = config.max_epochs or None
        finished = budget.done(step, _step_seconds(throughput, config.batch_size))
        if log_epochs:
            left = "" if finished else \
                f", {time_left(budget.epochs_left(step, steps_per_epoch, epoch_seconds), epoch_seconds)}"
            tqdm.write(f"students epoch {epoch}{f'/{total_epochs}' if total_epochs else ''} ({train_seconds:.1f}s, "
                       f"{budget.spent():.0f}s in all{left}): "
                       + "  ".join(f"{s.name} {_accuracies(s.history[-1])}" for s in trainees))
        save_torch({"students": {s.name: {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                                          "ema": s.ema.state_dict() if s.ema is not None else None,
                                          "layout": channel_layout(s.model)["layers"], "history": s.history,
                                          "best_val": s.best_val, "best_epoch": s.best_epoch,
                                          "best_weights": s.best_weights} for s in trainees},
                    "data_rng": generator.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                    "epoch": epoch, "spent": budget.spent(), "throughput": throughput, "precision": precision}, last)
        for s in trainees:  # every epoch, not only at the end: a run in chunks can be drawn between them
            write_csv(s.history, out / s.name / "history.csv")
        if not finished:
            current_chunk().end_if_no_room("students", epoch, total_epochs, epoch_seconds)

    images_trained = sum(t["images"] for t in throughput)
    train_seconds = sum(t["seconds"] for t in throughput)
    stage = {"seconds": budget.spent(), "budget_s": seconds, "epochs": epoch, "steps": step,
             "epochs_per_student": round(step / steps_per_epoch, 2), "train_images": len(labels),
             "images_per_s": images_trained / max(1e-9, train_seconds),
             "student_images_per_s": images_trained * len(trainees) / max(1e-9, train_seconds),
             "device": str(device), "precision": precision, "config": asdict(config), "students": {}}
    for s in trainees:
        best = s.history[s.best_epoch - 1] if s.best_epoch else {}
        summary = {**{k: s.record[k] for k in ("target_mflops", "mflops", "params", "prune", "stem_stride",
                                                     "strides")
                      if k in s.record},
                   "val_after_pruning": s.record.get("val_accuracy"), "val_accuracy": s.best_val,
                   "best_epoch": s.best_epoch, "kept": s.best_weights, "epochs": epoch,
                   "val_last": s.history[-1]["val_accuracy"] if s.history else None,
                   "val_images": len(val_labels), "test_accuracy": None, "test_images": 0, "distill": True,
                   "teacher": "teacher/teacher.pt", "kd_alpha": config.kd_alpha, "resolution": config.resolution,
                   "best_spent_s": best.get("spent"),
                   "bf16": {str(size): precision[key]["bf16"] for size in sorted({*config.resolutions, first_size})
                            if (key := _precision_key(s.name, size, first_size)) in precision}}
        write_csv(s.history, out / s.name / "history.csv")  # again: a run restored already finished has run no epoch
        write_json(out / s.name / "summary.json", summary)
        stage["students"][s.name] = {k: summary[k] for k in ("target_mflops", "mflops", "val_after_pruning",
                                                            "val_accuracy", "best_epoch", "kept")}
    return stage


def _precision_key(student: str, size: int, first_size: int) -> str:
    """Where a student's bf16 probe at ``size`` is kept in a run's ``precision``: under its name for the
    first training size (as every run before per-size probes kept it), else "NAME at SIZE px"."""
    return student if size == first_size else f"{student} at {size} px"


def _step_seconds(throughput: list[dict], batch_size: int) -> float:
    """Seconds one training step took in the last epoch (0 before the first)."""
    if not throughput:
        return 0.0
    return throughput[-1]["seconds"] / max(1.0, throughput[-1]["images"] / batch_size)


def _keep_start(s: _Student, val_images, val_labels, config: StudentConfig, device, out: Path) -> None:
    """A student that starts trained is its own first candidate (epoch 0): the file kept is never worse
    than the model the run began from, even when no epoch beats it.

    Its validation is measured here again (a minute on a CPU) rather than read from the students'
    record, so that the start and every epoch are compared by one procedure: the same images, the
    same resize, the same precision.
    """
    s.best_val, s.best_epoch, s.best_weights = (student_accuracy(s.model, val_images, val_labels, config, device),
                                                0, "start")
    save_state_with_layout(s.model, out / s.name, "mobilenet")


def _validate_and_keep(s: _Student, epoch: int, seen: int, seconds: float, val_images, val_labels,
                       config: StudentConfig, device, out: Path, budget: Budget, train_resolution: int) -> None:
    # An epoch trained below the grader's size is validated at its own size only: at 224 its BatchNorm
    # statistics (from 112-px maps) say little until the finish at 224 re-learns them, and such an
    # epoch is never the one kept; two 224-px passes would cost a 112-px epoch a quarter of its time.
    low = train_resolution != config.resolution
    row = {"epoch": epoch, "images": seen, "train_loss": s.loss_sum.item() / max(1, seen),
           "val_accuracy": None if low else student_accuracy(s.model, val_images, val_labels, config, device),
           "val_ema": student_accuracy(s.ema, val_images, val_labels, config, device)
           if s.ema is not None and not low else None,
           "train_resolution": train_resolution,
           "val_at_train_resolution": student_accuracy(s.model, val_images, val_labels, config, device,
                                                       train_resolution) if low else None,
           "lr": s.optimizer.param_groups[0]["lr"], "seconds": seconds, "spent": budget.spent()}
    s.history.append(row)
    for kind, value, model in (("model", row["val_accuracy"], s.model), ("ema", row["val_ema"], s.ema)):
        if value is not None and value > s.best_val:
            s.best_val, s.best_epoch, s.best_weights = value, epoch, kind
            save_state_with_layout(model, out / s.name, "mobilenet")


def _accuracies(row: dict) -> str:
    """An epoch's validation for the progress line: at the grader's size, or at the training size if lower."""
    if row["val_accuracy"] is None:
        return f"{row['val_at_train_resolution']:.4f} at {row['train_resolution']} px"
    return f"{row['val_accuracy']:.4f}" + (f" (EMA {row['val_ema']:.4f})" if row.get("val_ema") is not None else "")


# ----------------------------------------------------------------------------- the whole stage
def run_distill(students: dict[str, tuple[nn.Module, dict]], data: Cifar10, teacher_config: TeacherConfig,
                config: StudentConfig, out_dir: str | Path, teacher: str | Path | None = None,
                budget_s: float | None = None, device: str | torch.device = "cpu", progress: bool = True,
                clock=time.monotonic, cache_dir: str | Path | None = None) -> dict:
    """The teacher (trained, or loaded from ``teacher``), then the students, all inside ``budget_s`` seconds.

    Resumable: a finished teacher is loaded, students continue from ``last.pt``. Writes the stage's
    ``summary.json`` last; when it is there, the run is done and is not run again.
    """
    out = Path(out_dir)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    budget_s = budget_s or config.budget_s
    started = clock()
    if teacher is not None:
        teacher_model = load_teacher(teacher)
        digest, saved = _digest(teacher_model.state_dict().values()), out / "teacher" / "summary.json"
        teacher_summary = json.loads(saved.read_text()) if saved.is_file() else {}
        if teacher_summary.get("digest") != digest:  # validated once per run, not again at every chunk
            teacher_summary = {"loaded": str(teacher), "digest": digest, "val_accuracy": teacher_accuracy(
                teacher_model.to(device), data.val_images, data.val_labels, 0, teacher_config.eval_batch_size)}
            save_teacher(teacher_model, out / "teacher" / "teacher.pt")
            write_json(saved, teacher_summary)
        teacher_seconds = clock() - started
    else:
        teacher_model, teacher_summary = train_teacher(data, teacher_config, out / "teacher", device, progress, clock)
        # A resumed run counts the teacher's recorded seconds, not the few it took to load it now.
        teacher_seconds = teacher_summary.get("seconds", clock() - started)
    cache = None
    if config.teacher_cache:
        # Paid out of the same budget as the teacher; a run resumed after it reads it back in seconds.
        built = clock()
        cache = build_teacher_cache(teacher_model, data.train_images, cache_path(cache_dir or out / "teacher",
                                    config.translate, config.teacher_flip), config.translate, config.teacher_flip,
                                    config.bf16, config.eval_batch_size, device)
        teacher_seconds += clock() - built
    # budget_s 0: a schedule set in epochs alone (max_epochs), as the CPU recipes set theirs.
    seconds = budget_s - teacher_seconds - config.reserve_s if budget_s else None
    if seconds is not None and seconds <= 0 and not config.max_epochs:
        raise MobilepruneError(f"no time left for the students: the teacher took {teacher_seconds:.0f} s of the "
                               f"{budget_s:.0f}-s budget (reserve {config.reserve_s:.0f} s); raise --budget-s")
    stage = train_students(students, teacher_model, data, config, out,
                           None if seconds is None else max(seconds, 1e-3), device, progress, clock, cache=cache)
    stage.update(budget_s=budget_s, teacher_seconds=teacher_seconds, student_seconds=stage["seconds"],
                 seconds=teacher_seconds + stage["seconds"],
                 teacher={k: teacher_summary.get(k) for k in ("val_accuracy", "val_accuracy_tta", "tta_level",
                                                             "epochs", "seconds", "params", "loaded")})
    write_json(out / "summary.json", stage)
    return stage



# ----------------------------------------------------------------------------- milestones in git
MILESTONE_FORMAT = "mobileprune distill milestone 1"


def save_milestone(run: str | Path, path: str | Path) -> int | None:
    """A distill run's resumable state (``last.pt`` and each student's kept weights) as one file to commit;
    returns the epoch kept, or None when the milestone at ``path`` has already come as far.

    ``runs/`` is not in git, and a session may begin in a fresh checkout: a run longer than one
    session lives on through this file. It must stay small, since every tracked byte travels with a
    device call (tests/test_release.py holds the tree to its budget), so it keeps each student's
    weights and EMA but not its optimiser's momenta, and a kept file equal to the EMA or the weights
    (the best epoch so far is the last, as it mostly is while a run climbs) is stored as a reference to
    it. Every floating tensor is stored in bf16: half of fp32, and its range (unlike fp16's) holds any
    BatchNorm variance. A run restored from it (``restore_milestone``) goes on from weights rounded to
    bf16 and momenta that start again from zero, which SGD rebuilds within some ten steps: close to an
    unbroken run, not bit-equal.
    """
    run, path = Path(run), Path(path)
    if not (run / "last.pt").is_file():
        raise MobilepruneError(f"{run}: no last.pt to keep (the run has not finished an epoch)")
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    if path.is_file() and _read_milestone(path)["epoch"] >= state["epoch"]:
        return None
    kept = {}
    for name, student in state["students"].items():
        weights = run / name / "mobilenet.pt"
        if weights.is_file():
            kept[name] = {"layout": json.loads(weights.with_suffix(".layout.json").read_text()),
                          **_by_reference(torch.load(weights, map_location="cpu", weights_only=True), student)}
        student["optimizer"] = {**student["optimizer"], "state": {}}  # the momenta: see above
    save_torch(cast_floats({"format": MILESTONE_FORMAT, "epoch": state["epoch"], "last": state, "kept": kept},
                            torch.bfloat16), path)
    return state["epoch"]


def _by_reference(weights: dict, student: dict) -> dict:
    """A kept state dict as the milestone stores it: the name of the student's state it equals, else itself."""
    for name in ("ema", "model"):
        same = student.get(name)
        if same is not None and same.keys() == weights.keys() and all(torch.equal(same[k], v) for k, v in weights.items()):
            return {"same_as": name}
    return {"weights": weights}


def _read_milestone(path: str | Path) -> dict:
    path = Path(path)
    check_torch_file(path)
    try:
        milestone = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  a zip torch cannot read: say which file, and what torch said
        raise MobilepruneError(f"{path}: cannot load ({first_line(e)})") from None
    if not isinstance(milestone, dict) or milestone.get("format") != MILESTONE_FORMAT:
        raise MobilepruneError(f"{path}: not a distill milestone (written by `mobileprune distill --milestone`)")
    return milestone


def restore_milestone(path: str | Path, run: str | Path) -> int | None:
    """Put the milestone at ``path`` back into ``run`` (``last.pt`` and kept weights, in fp32), unless
    ``run`` has already come as far; returns the epoch restored, or None."""
    run = Path(run)
    milestone = _read_milestone(path)
    if (run / "last.pt").is_file():
        here = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"]
        if here >= milestone["epoch"]:
            return None
    milestone = cast_floats(milestone, torch.float32)
    for name, kept in milestone["kept"].items():
        weights = milestone["last"]["students"][name][kept["same_as"]] if "same_as" in kept else kept["weights"]
        save_torch(weights, run / name / "mobilenet.pt")
        write_json(run / name / "mobilenet.layout.json", kept["layout"])
    save_torch(milestone["last"], run / "last.pt")  # last: a run cut here finds no last.pt without its weights
    return milestone["epoch"]


# ----------------------------------------------------------------------------- the trip back
def packed_files(run: str | Path) -> list[str]:
    """What must come back from a GPU machine: the teacher (bf16), every student's best weights,
    summary and history, the students' training state (to resume them in a later lease) and logs;
    not the teacher's optimiser state."""
    run = Path(run)
    wanted = ["summary.json", "last.pt", "*.log", "teacher/teacher.pt", "teacher/summary.json", "teacher/history.csv",
              "student-*/mobilenet.pt", "student-*/mobilenet.layout.json", "student-*/summary.json",
              "student-*/history.csv"]
    return sorted({p.relative_to(run).as_posix() for pattern in wanted for p in run.glob(pattern) if p.is_file()})


def pack_run(run: str | Path, out_dir: str | Path) -> list[Path]:
    """Pack a distill run folder for the trip back (``files.pack``)."""
    run = Path(run)
    if not (run / "teacher").is_dir() and not list(run.glob("student-*")):
        raise MobilepruneError(f"{run}: not a distill run folder (no teacher/ or student-*/)")
    return pack(run, packed_files(run), out_dir, name="distill")


def finish_students(run: str | Path, test: tuple[torch.Tensor, torch.Tensor] | None, export: bool = True,
                    device: str = "cpu", progress: bool = True) -> list[dict]:
    """Make each student of an unpacked run a whole Part 2 result: .pth (and .pte), channels.csv, test accuracy.

    Run here, after ``unpack``, with the pinned versions (the GPU machine has other ones and no
    ExecuTorch). The test accuracy on ``test`` (images, labels) is reported only; students were
    chosen on validation.
    """
    from .channel import channel_table
    from .evaluate import accuracy
    from .export import export_pte
    from .models import build_mobilenet_v2, save_pickled_model

    run = Path(run)
    folders = sorted(p.parent for p in run.glob("student-*/summary.json"))
    if not folders:
        raise MobilepruneError(f"{run}: holds no trained students (student-*/summary.json)")
    summaries = []
    for folder in folders:
        model = load_state_with_layout(folder / "mobilenet.pt").eval()
        save_pickled_model(model, folder / "mobilenet.pth")
        if export:
            export_pte(model, folder / "mobilenet.pte")
        write_csv(channel_table(build_mobilenet_v2(), model), folder / "channels.csv")
        summary = json.loads((folder / "summary.json").read_text())
        if test is not None:
            summary["test_accuracy"] = accuracy(model, *test, device=device, progress=progress,
                                                desc=f"{folder.name} test")
            summary["test_images"] = len(test[1])
        write_json(folder / "summary.json", summary)
        summaries.append({"student": folder.name, **summary})
    return summaries


def choose_by_validation(summaries: list[dict], strides: dict[str, int] | None = None) -> dict | None:
    """The student with the highest lab score computed with its *validation* accuracy, among those whose
    changed strides are ``strides`` (none: the strict hand-in, channel pruning alone, docs/method.md)."""
    from .channel import student_strides
    from .evaluate import lab_score

    candidates = [s for s in summaries if student_strides(s) == (strides or {})]
    return max(candidates, key=lambda s: lab_score(s["mflops"], s["val_accuracy"])) if candidates else None
