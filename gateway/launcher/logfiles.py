"""Log files kept across restarts: each start moves the previous logs one number up."""

from __future__ import annotations

import os
from pathlib import Path


def rotate(path: Path, keep: int) -> None:
    """Move ``path`` to ``path.1``, ``path.1`` to ``path.2``, …, keeping at most ``keep`` earlier logs."""
    if keep < 1 or not path.exists():
        return
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))
