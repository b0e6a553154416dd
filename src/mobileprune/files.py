"""File writing shared by the stages."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON through a temporary file, so a run killed mid-write leaves the previous
    version (or none) whole: resuming reads these files back, and a half-written one would stop it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    tmp.replace(path)
    return path
