"""The files the stages write and read back: JSON, CSV tables and torch checkpoints, each written whole.

A stage writes its data files here; ``report`` draws every plot and table from them alone.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


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
