"""The one training loop: baseline from scratch, fine-grained fine-tuning and channel-pruning recovery.

SGD with Nesterov momentum, linear warm-up then cosine decay (per step), label smoothing, optional
knowledge distillation from a teacher (KL on temperature-softened logits), bf16 autocast where it
pays (``choose_bf16``: always on CUDA, measured on a CPU), channels_last on CUDA, progressive
resizing. Every epoch writes ``last.pt`` (enough to resume bit-for-bit: weights, optimiser,
schedule, RNG states, the precision chosen) and keeps the epoch with the best *validation* accuracy
as ``best.pt`` + ``best.layout.json``. The test set is never looked at here.

Long schedules are cut into chunks (``chunk``): a chunk ends at an epoch boundary when the next
epoch would not fit in the time it was given, and the same command resumes the same schedule, so
the curve does not depend on where it was cut. Every training loop of mobileprune (this one, the
teacher's and the students') asks the same chunk.
"""
from __future__ import annotations

import copy
import csv
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import INPUT_SIZE, BatchStream, Cifar10, preprocess
from .errors import MobilepruneError, ScheduleStopped, check_known_settings
from .files import save_torch
from .models import channel_layout, load_state_with_layout, save_state_with_layout


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    # Progressive resizing: the epochs are split evenly over these training resolutions; the
    # validation always runs at eval_resolution (the lab's 224).
    resolutions: list[int] = field(default_factory=lambda: [INPUT_SIZE])
    eval_resolution: int = INPUT_SIZE
    # Resize variants drawn per training batch: the grader measures the .pth with torchvision's
    # resize and the .pte through the runner's, so a model trained on both is at home under either.
    resize_variants: list[str] = field(default_factory=lambda: ["torchvision"])
    kd_alpha: float = 0.0  # weight of the distillation term; 0 trains on labels alone
    kd_temperature: float = 4.0
    seed: int = 0
    # bf16 autocast: "auto" (on CUDA; on a CPU only where a short probe measures it faster), or true/false.
    bf16: bool | str = "auto"
    channels_last: bool = True  # CUDA only
    eval_batch_size: int = 500
    # cuDNN autotuning (CUDA only) cost ~35 s on the first epoch at each new resolution of the
    # 224-px baseline (H100); a channel-pruning step trains new channel counts for an epoch or
    # two, too short to pay that back, so the lab2-* recipes turn it off for their steps.
    cudnn_benchmark: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        check_known_settings(cls, values, "training")
        config = cls(**values)
        check_bf16_setting(config.bf16, "training")
        return config

    def resolution_at(self, epoch: int) -> int:
        return self.resolutions[min(len(self.resolutions) - 1, epoch * len(self.resolutions) // self.epochs)]


@dataclass
class TrainResult:
    model: nn.Module  # with the best epoch's weights
    best_val_accuracy: float
    best_epoch: int
    history: list[dict]
    precision: dict = field(default_factory=dict)  # choose_bf16's record: what the run trained in, and why


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- precision
def check_bf16_setting(value, what: str) -> None:
    if value not in (True, False, "auto"):
        raise MobilepruneError(f"{what} bf16 must be true, false or \"auto\" (got {value!r})")


def autocast(bf16: bool, device: torch.device):
    """bf16 autocast on CUDA or a CPU (convolutions and matmuls in bf16, reductions in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16) and device.type in ("cuda", "cpu"))


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 has fast kernels here: a CUDA GPU that says so, or a CPU with AVX512-BF16/AMX
    (oneDNN's check). Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def keep_freed_memory() -> bool:
    """Ask glibc to keep the memory of freed tensors for the next step instead of returning it to the kernel.

    By default glibc gives every block over its mmap threshold back with munmap on free (and trims the
    heap), so each training step faults fresh zeroed pages in again: a CPU distill run of the hand-in
    spent about 30 % of its time in the kernel (docs/method.md, "Freed memory kept for the next step").
    A training loop frees and re-allocates the same sizes every step, so keeping them costs no more
    memory than one step's peak. Every block comes from the heap, which is never trimmed (mapping only
    blocks over 32 MiB apart left 224-px steps at half the speed). Process-wide, glibc only; False where
    it does not apply (another libc).
    """
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = [(M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20), (M_MMAP_MAX, 0)]
    return all(mallopt(option, value) == 1 for option, value in settings)


def describe_cpu() -> str:
    """This machine's CPU in one line, for the records of runs measured on it: 'AMD EPYC (2 cores, bf16)'."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = ", bf16" if bf16_supported(torch.device("cpu")) else ""
    return f"{name} ({os.cpu_count()} cores{bf16})"


def training_rate(model: nn.Module, size: int, batch_size: int, device: torch.device, bf16: bool,
                  channels_last: bool = False, steps: int = 3, train: bool = True) -> float:
    """Images/s of ``steps`` SGD steps (or forward passes, ``train=False``) of a copy of ``model`` on random
    ``size``-px input; one step first, not counted (allocation, kernel choice). Torch's random
    generator is left as it was, so a probe does not change what the run draws afterwards."""
    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(model).to(device).train(train)
        x = torch.randn(batch_size, 3, size, size, device=device)
        if channels_last:
            probe, x = probe.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (batch_size,), device=device)
        optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=1e-6) if train else None
        started = 0.0
        for step in range(steps + 1):
            if step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            with autocast(bf16, device), torch.set_grad_enabled(train):
                logits = probe(x)
            if train:
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size * steps / max(1e-9, time.perf_counter() - started)


def choose_bf16(setting, model: nn.Module, size: int, batch_size: int, device: torch.device,
                channels_last: bool = False, train: bool = True) -> dict:
    """Whether to train ``model`` in bf16 autocast, and why: ``{"bf16", "setting", "fp32_images_per_s",
    "bf16_images_per_s"}``, recorded in each run's checkpoint and summary.

    ``setting`` true or false is obeyed. ``"auto"`` is on for CUDA; on a CPU it is on only where the
    CPU has bf16 kernels and a short probe (a few steps of a copy, both ways) measures bf16 at least
    5 % faster: on a 2-core Zen 4 it nearly doubles a MobileNetV2 at 224 px and slows one at stem
    stride 7 (docs/method.md), so the answer is per model and per machine.
    """
    check_bf16_setting(setting, "the")
    record = {"setting": setting, "fp32_images_per_s": None, "bf16_images_per_s": None}
    if setting != "auto":
        return {**record, "bf16": bool(setting)}
    if device.type == "cuda" or not bf16_supported(device):
        return {**record, "bf16": device.type == "cuda"}
    batch = max(1, min(batch_size, 64 if size > 64 else 256))
    rates = {bf16: training_rate(model, size, batch, device, bf16, channels_last, train=train) for bf16 in (False, True)}
    return {**record, "bf16": rates[True] >= 1.05 * rates[False], "fp32_images_per_s": round(rates[False], 1),
            "bf16_images_per_s": round(rates[True], 1)}


def describe_precision(record: dict) -> str:
    """One line for a run's log: 'bf16 (measured: fp32 58, bf16 111 images/s)' or 'fp32 (set)'."""
    kind = "bf16" if record["bf16"] else "fp32"
    if record.get("fp32_images_per_s") is None:
        return f"{kind} ({'set' if record['setting'] != 'auto' else 'auto'})"
    return f"{kind} (measured: fp32 {record['fp32_images_per_s']:g}, bf16 {record['bf16_images_per_s']:g} images/s)"


# ----------------------------------------------------------------------------- chunks of a long schedule
class Chunk:
    """The share of a long schedule that this process may run: ``stop_after_s`` seconds from its start.

    ``end_if_no_room`` is asked at every epoch boundary, after the state has been saved: when one
    more epoch (as long as the last one) would run past the limit, it raises ``ScheduleStopped``,
    which the CLI reports with exit code 75; the same command resumes the schedule where it stopped.
    ``clock`` is injectable: tests run on a fake one.
    """

    def __init__(self, stop_after_s: float | None = None, clock=time.monotonic):
        self.stop_after_s, self.clock = stop_after_s, clock
        self.started = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def end_if_no_room(self, desc: str, done: int, total: int | None, epoch_seconds: float) -> None:
        """``total`` None: a schedule set in seconds, whose epoch count is not known ahead."""
        if self.stop_after_s is None or (total is not None and done >= total):
            return
        if self.elapsed() + epoch_seconds > self.stop_after_s:
            where = f"epoch {done} of {total}; {time_left(total - done, epoch_seconds)}" if total else f"epoch {done}"
            raise ScheduleStopped(f"{desc} after {where} ({self.elapsed() / 60:.0f} min in this chunk of "
                                  f"{self.stop_after_s / 60:.0f}). Run the same command to continue")


_CHUNK = Chunk()


def current_chunk() -> Chunk:
    return _CHUNK


@contextmanager
def chunk(stop_after_s: float | None, clock=time.monotonic):
    """Every training loop inside this block stops at an epoch boundary before ``stop_after_s`` seconds."""
    global _CHUNK
    previous, _CHUNK = _CHUNK, Chunk(stop_after_s, clock)
    try:
        yield _CHUNK
    finally:
        _CHUNK = previous


def time_left(epochs_left: float, seconds_per_epoch: float) -> str:
    """'about 1 h 05 min left' at the measured rate, for the per-epoch lines of long runs."""
    minutes = round(max(0.0, epochs_left) * seconds_per_epoch / 60)
    if minutes >= 60:
        return f"about {minutes // 60} h {minutes % 60:02d} min left"
    return f"about {minutes} min left"


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD term: KL(teacher || student) at ``temperature``, scaled by T^2 to keep its gradient size."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean",
                    log_target=True) * t * t


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on batch-norm scales and biases: decaying them only hurts small nets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, size: int = INPUT_SIZE, batch_size: int = 50,
                          device: torch.device | str = "cpu") -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` (uint8); weights untouched.

    Pruning changes what each layer outputs, but eval mode still normalises with the dense model's
    statistics: MobileNetV2 pruned fine-grained to 20 % of its size scores at chance (0.09 on 500
    validation images at 224 px) and 0.84 with statistics from 256 training images, before any
    training. The estimate is an exact average over the images (momentum None), not a running one;
    each layer's momentum is put back afterwards, and the model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(images) == 0:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.to(device).train()
    try:
        for start in range(0, len(images), batch_size):
            model(preprocess(images[start:start + batch_size].to(device), size))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


@torch.no_grad()
def evaluate_stream(model: nn.Module, stream: BatchStream, config: TrainConfig, device: torch.device,
                    bf16: bool = False) -> float:
    model.eval()
    correct = 0
    for images, labels in stream.batches(config.eval_resolution):
        with autocast(bf16, device):
            logits = model(_to_memory_format(images, config, device))
        correct += (logits.argmax(1) == labels).sum().item()
    return correct / max(1, len(stream.labels))


def _to_memory_format(x: torch.Tensor, config: TrainConfig, device: torch.device) -> torch.Tensor:
    if config.channels_last and device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def train(model: nn.Module, data: Cifar10, config: TrainConfig, out_dir: str | Path, teacher: nn.Module | None = None,
          resume: bool = False, after_step: Iterable[Callable[[nn.Module], None]] = (),
          device: torch.device | str | None = None, progress: bool = True, desc: str = "train",
          log_epochs: bool = True) -> TrainResult:
    """Train ``model`` on ``data.train``, pick the best epoch on ``data.val``; checkpoints in ``out_dir``.

    ``after_step`` callbacks run after every optimiser step (the fine-grained pruner re-applies its
    masks there). With ``resume`` and a ``last.pt`` in ``out_dir``, training continues after its epoch.
    One line per epoch is printed unless ``log_epochs`` is off (also without progress bars: logs of
    unattended runs need them).
    """
    device = torch.device(device) if device is not None else default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.kd_alpha > 0 and teacher is None:
        raise MobilepruneError("kd_alpha > 0 needs a teacher model")
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    model = model.to(device)
    if config.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    train_stream = BatchStream(data.train_images, data.train_labels, config.batch_size, device, train=True,
                               seed=config.seed, variants=config.resize_variants)
    if len(train_stream) == 0:
        raise MobilepruneError("training split is empty")
    val_stream = BatchStream(data.val_images, data.val_labels, config.eval_batch_size, device)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, len(train_stream))
    history: list[dict] = []
    best_val, best_epoch, start_epoch = -1.0, -1, 0

    last_path = out_dir / "last.pt"
    state = torch.load(last_path, map_location="cpu", weights_only=True) if resume and last_path.is_file() else None
    # The precision is chosen once per run and kept in last.pt: a resumed chunk trains as the first did.
    precision = state.get("precision") if state is not None else None
    if precision is None:
        precision = choose_bf16(config.bf16, model, config.resolution_at(start_epoch), config.batch_size, device,
                                config.channels_last and device.type == "cuda")
    bf16 = precision["bf16"]
    if state is None and (progress or log_epochs) and precision.get("fp32_images_per_s") is not None:
        tqdm.write(f"{desc}: {describe_precision(precision)}")
    if state is not None:
        if state["layout"] != channel_layout(model)["layers"]:
            raise MobilepruneError(f"{last_path}: checkpoint is of a model with other channel counts")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        train_stream.generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, best_val, best_epoch = state["history"], state["best_val"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
        if progress or log_epochs:
            tqdm.write(f"{desc}: resuming {last_path} after epoch {start_epoch} of {config.epochs} "
                       f"(best so far: epoch {best_epoch}, val {best_val:.4f})")

    for epoch in range(start_epoch, config.epochs):
        model.train()
        size = config.resolution_at(epoch)
        started, seen = time.time(), 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        bar = tqdm(train_stream.batches(size), total=len(train_stream), disable=not progress, leave=False,
                   desc=f"{desc} {epoch + 1}/{config.epochs} @{size}px", unit="batch")
        for images, labels in bar:
            images = _to_memory_format(images, config, device)
            with autocast(bf16, device):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
                if teacher is not None and config.kd_alpha > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    kd = distillation_loss(logits.float(), teacher_logits.float(), config.kd_temperature)
                    loss = (1 - config.kd_alpha) * loss + config.kd_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for callback in after_step:
                callback(model)
            seen += len(labels)
            loss_sum += loss.detach().float() * len(labels)
            if progress and bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
        # Validation in fp32 on a CPU: the grader runs the .pth in fp32, and checkpoints are chosen on it.
        val_accuracy = evaluate_stream(model, val_stream, config, device, bf16 and device.type == "cuda")
        record = {"epoch": epoch + 1, "resolution": size, "train_loss": loss_sum.item() / seen,
                  "val_accuracy": val_accuracy, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": time.time() - started, "bf16": bf16}
        history.append(record)
        if progress or log_epochs:
            tqdm.write(f"{desc} epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f}  "
                       f"val {val_accuracy:.4f}  ({record['seconds']:.0f}s @{size}px"
                       + (f", {time_left(config.epochs - epoch - 1, record['seconds'])})"
                          if epoch + 1 < config.epochs else ")"))
        if val_accuracy > best_val:
            best_val, best_epoch = val_accuracy, epoch + 1
            save_state_with_layout(model, out_dir, "best")
        save_torch({"epoch": epoch, "model": model.state_dict(), "layout": channel_layout(model)["layers"],
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "data_rng": train_stream.generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "history": history, "best_val": best_val, "best_epoch": best_epoch, "precision": precision},
                   last_path)
        _write_history(history, out_dir / "history.csv")
        current_chunk().end_if_no_room(desc, epoch + 1, config.epochs, record["seconds"])

    if best_epoch < 0:
        raise MobilepruneError(f"{out_dir}: no epoch was trained (epochs={config.epochs})")
    best = load_state_with_layout(out_dir / "best.pt").to(device)
    return TrainResult(best, best_val, best_epoch, history, precision)


def _write_history(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
