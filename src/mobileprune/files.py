"""The files the stages write and read back: JSON, CSV tables and torch checkpoints, each written whole.

A stage writes its data files here; ``report`` draws every plot and table from them alone.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import MobilepruneError, first_line


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON through a temporary file, so a run killed mid-write leaves the previous
    version (or none) whole: resuming reads these files back, and a half-written one would stop it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    tmp.replace(path)
    return path


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save`` through a temporary file, for the same reason as ``write_json``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def cast_floats(obj, dtype):
    """``obj`` (nested dicts, lists, tensors) with every floating tensor cast to ``dtype``, on the CPU; the
    rest as it is. Files kept in git store their floats in half precision: half the bytes of fp32."""
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """A table of ``rows`` (dicts; the columns are every key, in first-seen order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: str | Path) -> list[dict]:
    """A table written by ``write_csv`` back into rows of numbers (empty cells become None)."""
    def number(text: str):
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- packing for a trip
# What the device tool brings back from a GPU machine: at most 8 files of at most 16 MiB each.
PIECE_BYTES = 15 * 2**20
MAX_PIECES = 7  # and pack.json
PACK_MANIFEST = "pack.json"


def pack(folder: str | Path, paths: list[str], out_dir: str | Path, name: str = "results",
         piece_bytes: int = PIECE_BYTES, max_pieces: int = MAX_PIECES) -> list[Path]:
    """``paths`` (relative to ``folder``) as one gzipped tar cut into pieces ``name.tgz.00`` ... of at most
    ``piece_bytes``, and ``pack.json`` with each piece's sha256, so that ``unpack`` can tell a piece lost
    or cut short on the way from a whole one."""
    import hashlib
    import io
    import tarfile

    folder, out = Path(folder), Path(out_dir)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for rel in paths:
            tar.add(folder / rel, arcname=rel)
    blob = buffer.getvalue()
    count = max(1, -(-len(blob) // piece_bytes))
    if count > max_pieces:
        raise MobilepruneError(f"{folder}: {len(blob) / 2**20:.1f} MiB packed is more than {max_pieces} pieces of "
                               f"{piece_bytes / 2**20:.0f} MiB; pack fewer files")
    out.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i in range(count):
        piece = out / f"{name}.tgz.{i:02d}"
        piece.write_bytes(blob[i * piece_bytes:(i + 1) * piece_bytes])
        pieces.append({"file": piece.name, "sha256": hashlib.sha256(piece.read_bytes()).hexdigest()})
    write_json(out / PACK_MANIFEST, {"name": name, "bytes": len(blob), "pieces": pieces, "files": list(paths)})
    return [out / p["file"] for p in pieces] + [out / PACK_MANIFEST]


def unpack(pack_dir: str | Path, dest: str | Path) -> list[Path]:
    """The files of a ``pack`` under ``dest`` (which must not hold anything yet), after checking every piece.

    Extracted into a temporary folder beside ``dest`` and moved into place only when whole: a bad
    piece leaves nothing half-written.
    """
    import hashlib
    import io
    import shutil
    import tarfile
    import tempfile

    pack_dir, dest = Path(pack_dir), Path(dest)
    manifest = pack_dir / PACK_MANIFEST
    if not manifest.is_file():
        raise MobilepruneError(f"{pack_dir}: no {PACK_MANIFEST} (not a folder written by `mobileprune pack`)")
    try:
        spec = json.loads(manifest.read_text())
        pieces = [(pack_dir / p["file"], p["sha256"]) for p in spec["pieces"]]
    except (ValueError, KeyError, TypeError) as e:
        raise MobilepruneError(f"{manifest}: not a pack manifest ({e})") from None
    missing = [path.name for path, _ in pieces if not path.is_file()]
    if missing:
        raise MobilepruneError(f"{pack_dir}: pieces missing: {', '.join(missing)} (the pack is "
                               f"{', '.join(p.name for p, _ in pieces)})")
    blob = b""
    for path, digest in pieces:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise MobilepruneError(f"{path}: damaged (its sha256 is not the one {PACK_MANIFEST} records)")
        blob += data
    if dest.exists() and any(dest.iterdir()):
        raise MobilepruneError(f"{dest}: not empty; unpack into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links or '..' out of tmp
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MobilepruneError(f"{pack_dir}: the pack does not unpack into {dest} ({e})") from None
    return sorted(p for p in dest.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- a zip from someone else
# A hand-in is 20-60 MB: the test batch (30.7 MB), a .pth and a .pte (9 MB each at most for a dense
# model), a notebook. The limits leave room for that many times over and stop a zip bomb early.
ZIP_MAX_BYTES = 1 << 30  # all members, uncompressed
ZIP_MAX_MEMBERS = 2_000
ZIP_MAX_RATIO = 200  # uncompressed / compressed, for a member over 1 MiB (a notebook of text: ~5-10)
_RATIO_FROM_BYTES = 1 << 20


def safe_extract(archive: str | Path, dest: str | Path, max_bytes: int = ZIP_MAX_BYTES,
                 max_members: int = ZIP_MAX_MEMBERS, max_ratio: float = ZIP_MAX_RATIO) -> Path:
    """Extract a zip made by someone else into ``dest``, or refuse it in one line naming the limit broken.

    Checked before a byte is written: the member count, the total uncompressed size and each large
    member's compression ratio (a zip bomb), every name (absolute, '..', a drive: never outside
    ``dest``), and no links. Checked while writing: that no member inflates past the size its header
    claims (a forged header). On refusal ``dest`` is emptied again: nothing half-written is left.
    """
    import stat
    import zipfile

    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise MobilepruneError(f"{archive}: not a readable zip ({first_line(e)}); is it truncated?") from None
    with zf:
        members = zf.infolist()
        if len(members) > max_members:
            raise MobilepruneError(f"{archive}: {len(members):,} members, more than the {max_members:,} allowed")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise MobilepruneError(f"{archive}: {total / 2**20:,.0f} MiB uncompressed, more than the "
                                   f"{max_bytes / 2**20:,.0f} MiB allowed (a zip bomb?)")
        for m in members:
            parts = Path(m.filename.replace("\\", "/")).parts
            if m.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise MobilepruneError(f"{archive}: member {m.filename!r} would be written outside its folder")
            if stat.S_ISLNK(m.external_attr >> 16):
                raise MobilepruneError(f"{archive}: member {m.filename!r} is a link; a hand-in holds files only")
            if m.file_size > _RATIO_FROM_BYTES and m.file_size > max_ratio * max(1, m.compress_size):
                raise MobilepruneError(f"{archive}: member {m.filename!r} inflates {m.file_size / max(1, m.compress_size):,.0f}"
                                       f"-fold, more than the {max_ratio:g}-fold allowed (a zip bomb?)")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for m in members:
                target = dest.joinpath(*Path(m.filename.replace("\\", "/")).parts)
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(m) as source, open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > m.file_size:
                            raise MobilepruneError(f"{archive}: member {m.filename!r} inflates past the "
                                                   f"{m.file_size:,} bytes its header claims (a forged zip)")
                        out.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as e:
            _empty(dest)
            raise MobilepruneError(f"{archive}: cannot extract ({first_line(e)}); is it damaged?") from None
        except MobilepruneError:
            _empty(dest)
            raise
    return dest


def _empty(folder: Path) -> None:
    import shutil

    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
