"""CIFAR-10: reading both official formats, the validation split, and the lab's preprocessing.

Images stay uint8 (N, 3, 32, 32) until the last moment. Resizing to 224 is a pair of small
matrix products, ``R @ img @ R.T`` with ``R`` of shape (224, 32), so the same code runs on a
batch on the CPU or on a GPU holding the whole data set, and the two resize variants differ only
in how ``R`` is built:

* ``torchvision`` -- bilinear with half-pixel centres (``F.interpolate(align_corners=False)``,
  PIL's ``Resize``), what the lab's notebook and our training use;
* ``runner``      -- the C++ runner's grid: source = dest * 32/224, no half-pixel offset.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import MobilepruneError, first_line

RECORD_BYTES = 3073  # 1 label byte + 3 * 32 * 32 pixel bytes
NUM_CLASSES = 10
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_VARIANTS = ("torchvision", "runner")
INPUT_SIZE = 224
DATA_ENV = "MOBILEPRUNE_DATA"
DEFAULT_SEARCH = (Path("data/cifar-10-batches-bin"), Path("../shared/data/cifar-10-batches-bin"))
TRAIN_BIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BIN = "test_batch.bin"
TRAIN_PICKLE = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_PICKLE = "test_batch"


# ----------------------------------------------------------------------------- reading
def read_cifar_bin(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary batch file -> (images uint8 (N,3,32,32), labels int64 (N,))."""
    path = Path(path)
    if not path.is_file():
        raise MobilepruneError(f"{path}: no such file")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise MobilepruneError(
            f"{path}: size {raw.size} bytes is not a positive multiple of {RECORD_BYTES} "
            "(1 label + 3072 pixel bytes per image); the file is truncated or not CIFAR-10 binary")
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    _check_labels(path, labels)
    images = records[:, 1:].reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def read_cifar_pickle(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One python-format batch (``data_batch_1`` ...) -> (images, labels) as read_cifar_bin."""
    path = Path(path)
    if not path.is_file():
        raise MobilepruneError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            # The official python batches are plain dicts of numpy arrays; refuse anything else.
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except MobilepruneError:
        raise
    except Exception as e:  # truncated pickle, wrong keys, ...
        raise MobilepruneError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {first_line(e)})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise MobilepruneError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} "
                               f"and {labels.shape[0]}")
    _check_labels(path, labels)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("numpy") or (module, name) == ("builtins", "bytes"):
            return super().find_class(module, name)
        raise MobilepruneError(f"refusing to unpickle {module}.{name}: not part of a CIFAR-10 batch")


def _check_labels(path: Path, labels: np.ndarray) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise MobilepruneError(f"{path}: label {int(labels[bad[0]])} of record {int(bad[0])} is outside 0-9 "
                               f"({bad.size} bad labels in all)")


def read_cifar_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A single batch file in either format, chosen by its name (``.bin`` is binary)."""
    path = Path(path)
    return read_cifar_bin(path) if path.suffix == ".bin" else read_cifar_pickle(path)


# ----------------------------------------------------------------------------- locating
def find_data_dir(path: str | Path | None = None, download: bool = False) -> Path:
    """The CIFAR-10 folder: ``path``, else $MOBILEPRUNE_DATA, else the default search list.

    A folder holds either the binary files (``data_batch_1.bin`` ...) or the python batches
    (``data_batch_1`` ...). With ``download``, and nothing found, the official archive is fetched
    by torchvision into ``./data``.
    """
    explicit = path if path is not None else os.environ.get(DATA_ENV) or None
    if explicit is not None:
        folder = Path(explicit)
        if not folder.is_dir():
            source = "--data" if path is not None else f"${DATA_ENV}"
            raise MobilepruneError(f"{folder}: data folder (from {source}) does not exist")
        for candidate in (folder, folder / "cifar-10-batches-bin", folder / "cifar-10-batches-py"):
            if _data_format(candidate):
                return candidate
        raise MobilepruneError(f"{folder}: holds neither {TEST_BIN} or {TRAIN_BIN[0]} (binary CIFAR-10) nor "
                               f"{TEST_PICKLE} or {TRAIN_PICKLE[0]} (python CIFAR-10)")
    for candidate in (*DEFAULT_SEARCH, Path("data/cifar-10-batches-py")):
        if _data_format(candidate):
            return candidate
    if download:
        return _download(Path("data"))
    searched = ", ".join(str(p) for p in DEFAULT_SEARCH)
    raise MobilepruneError(f"CIFAR-10 not found (searched {searched}); pass --data DIR, set ${DATA_ENV}, "
                           "or use --download on a machine with internet")


def _data_format(folder: Path) -> str | None:
    """'bin' or 'pickle' by the files there: the test batch, or the first training batch (a GPU
    machine is sent the training batches alone)."""
    for fmt, names in (("bin", (TEST_BIN, TRAIN_BIN[0])), ("pickle", (TEST_PICKLE, TRAIN_PICKLE[0]))):
        if any((folder / name).is_file() for name in names):
            return fmt
    return None


def _download(root: Path) -> Path:
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # no network, ...
        raise MobilepruneError(f"could not download CIFAR-10 into {root}: {first_line(e)}") from None
    return root / "cifar-10-batches-py"


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` is ``train`` (all 50,000) or ``test`` (10,000), from a folder of either format."""
    fmt = _data_format(folder)
    if fmt is None:
        raise MobilepruneError(f"{folder}: holds neither {TEST_BIN} nor {TEST_PICKLE}")
    if split == "test":
        names = (TEST_BIN,) if fmt == "bin" else (TEST_PICKLE,)
    elif split == "train":
        names = TRAIN_BIN if fmt == "bin" else TRAIN_PICKLE
    else:
        raise ValueError(f"unknown split {split!r}")
    parts = [read_cifar_file(folder / name) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass
class Cifar10:
    """The three splits as uint8 images and int64 labels, on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def load_cifar10(folder: Path, val_size: int = 5000, seed: int = 0, train_limit: int | None = None,
                 test_limit: int | None = None, test: bool = True) -> Cifar10:
    """Train/validation/test; the validation split is held out of the training set by ``seed``.

    ``train_limit``/``test_limit`` keep the first N images (after the split), for quick runs.
    ``test=False`` leaves the test split empty (a stage that never looks at it, on a machine that
    was sent the training batches alone).
    """
    images, labels = load_split(folder, "train")
    if not 0 <= val_size < len(labels):
        raise MobilepruneError(f"validation size {val_size} must be in [0, {len(labels)})")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    if test:
        test_images, test_labels = load_split(folder, "test")
    else:
        test_images, test_labels = images[:0], labels[:0]
    return Cifar10(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx],
                   test_images[:test_limit], test_labels[:test_limit])


def check_image_count(value, name: str) -> None:
    """A count of images in a stage's settings: a whole number, 0 meaning off (TOML has no unsigned type)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MobilepruneError(f"{name} must be 0 (off) or more, a whole number (got {value!r})")


def train_window(data: Cifar10, start: int, count: int) -> Cifar10:
    """``data`` with its training split cut to ``count`` images from ``start``, wrapping at the end.

    A schedule gives each of its stages its own window, so that three fine-tunes on a CPU budget
    see 30,000 different images rather than the same 10,000 three times.
    """
    size = len(data.train_labels)
    if not 0 < count <= size:
        raise MobilepruneError(f"a training window of {count} images does not fit a training split of {size}")
    index = (torch.arange(count) + start) % size
    return replace(data, train_images=data.train_images[index], train_labels=data.train_labels[index])


# ----------------------------------------------------------------------------- preprocessing
def resize_matrix(variant: str, size: int = INPUT_SIZE, src: int = 32) -> torch.Tensor:
    """(size, src) matrix R with ``R @ row`` the 1-D bilinear resize of ``row`` under ``variant``."""
    if variant not in RESIZE_VARIANTS:
        raise MobilepruneError(f"unknown resize variant {variant!r}; choose from {', '.join(RESIZE_VARIANTS)}")
    dest = torch.arange(size, dtype=torch.float64)
    if variant == "torchvision":
        pos = ((dest + 0.5) * src / size - 0.5).clamp(min=0)
    else:
        pos = dest * src / size
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    frac = pos - lo
    matrix = torch.zeros(size, src, dtype=torch.float64)
    matrix[torch.arange(size), lo] += 1 - frac
    matrix[torch.arange(size), hi] += frac
    return matrix.float()


_MATRICES: dict[tuple[str, int, str], torch.Tensor] = {}


def preprocess(images: torch.Tensor, size: int = INPUT_SIZE, variant: str = "torchvision") -> torch.Tensor:
    """uint8 (B,3,32,32) -> float (B,3,size,size): bilinear resize, /255, ImageNet mean/std.

    Runs on whatever device ``images`` lives on. Each row of a resize matrix sums to 1, so the
    resize commutes with the affine normalisation: normalising the 32-px pixels first, not the
    49 times as many 224-px ones, made it 2.5 times faster (1.19 -> 0.48 ms an image at one thread,
    2-core Zen 4; the largest difference from normalising after the resize is 7e-7). Grading runs
    it once an image per resize, as long as the .pte itself takes.
    """
    key = (variant, size, str(images.device))
    if key not in _MATRICES:
        _MATRICES[key] = resize_matrix(variant, size).to(images.device)
    matrix = _MATRICES[key]
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    x = (images.float() - mean) / std
    if size == x.shape[-1]:
        return x
    n, c, h, w = x.shape
    # Rows, then columns, each as one batched matmul over the B*3 planes.
    planes = torch.matmul(matrix, torch.matmul(x.reshape(n * c, h, w), matrix.T))
    return planes.view(n, c, size, size)


def augment(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4,
            flip: bool = True) -> torch.Tensor:
    """Random crop with ``pad`` reflect-padding and (with ``flip``) random horizontal flip, batched, at 32x32.

    Works on uint8 batches on any device (no per-image Python loop): per-image offsets are
    applied with one gather.
    """
    return augment_views(images, generator, pad, flip)[0]


def augment_views(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4,
                  flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``augment``, and which view each image became: its crop offsets ``dy``, ``dx`` in [0, 2 * pad]
    and whether it was mirrored. Image ``i`` is ``crop(padded, dy[i], dx[i])``, then mirrored if
    ``flipped[i]``; so there are (2 * pad + 1)^2 x 2 views in all, and a teacher's logits for each
    can be computed once (``distill.build_teacher_cache``)."""
    n, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(dev)
    flips = torch.rand(n, generator=generator, device="cpu").to(dev) < 0.5
    flip = flips & flip
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    out = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows, cols[:, None, None, :]]
    return out.to(images.dtype), dy, dx, flip


def cutout(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image with one random ``size`` x ``size`` square set to 0 (DeVries & Taylor 2017), batched."""
    n, _, h, w = images.shape
    dev = images.device
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device="cpu").to(dev)
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device="cpu").to(dev)
    rows = torch.arange(h, device=dev)[None, :] - top[:, None]
    cols = torch.arange(w, device=dev)[None, :] - left[:, None]
    square = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return images.masked_fill(square[:, None], 0)


class BatchStream:
    """Batches of one split, resident on ``device``; the airbench way: no DataLoader workers.

    ``train=True`` shuffles each epoch and augments. Each batch comes out preprocessed at
    ``size`` (the resolution may change between epochs: progressive resizing), resized by one of
    ``variants`` (drawn per batch when there are several).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str,
                 train: bool = False, seed: int = 0, variants: str | list[str] = "torchvision"):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.variants = [variants] if isinstance(variants, str) else list(variants)
        for variant in self.variants:
            resize_matrix(variant, 2)  # an unknown name fails here, not mid-epoch
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train and n >= self.batch_size else -(-n // self.batch_size)

    def batches(self, size: int = INPUT_SIZE):
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self.generator).to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[idx]
            variant = self.variants[0]
            if self.train:
                images = augment(images, self.generator)
                if len(self.variants) > 1:
                    variant = self.variants[int(torch.randint(len(self.variants), (1,), generator=self.generator))]
            yield preprocess(images, size, variant), self.labels[idx]
