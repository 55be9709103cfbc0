"""The Python backend's shared-memory regions of one server, so that a server that did not exit cleanly
(killed, or past its exit timeout) leaves none of them in ``/dev/shm``.

Triton creates one region per model instance, named ``triton_python_backend_shm_region_<uuid>``, and
passes the name to that instance's stub as its second argument; the stubs' command lines are where a
launcher can read which regions are its server's, without touching other servers' regions. The
launcher also writes them to its work folder (:func:`record_regions`), so the next launcher in that
folder removes them even when their server and its stubs are already gone (a killed launcher).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")
REGION_PREFIX = "triton_python_backend_shm_region_"


def _is_region(name: str) -> bool:
    return name.startswith(REGION_PREFIX) and "/" not in name


def stub_regions(stubs: Iterable[psutil.Process]) -> set[str]:
    """The region names on the command lines of ``stubs`` (backend stub processes)."""
    names: set[str] = set()
    for stub in stubs:
        try:
            names.update(arg for arg in stub.cmdline() if _is_region(arg))
        except psutil.Error:
            continue
    return names


def remove_regions(names: Iterable[str]) -> list[str]:
    """Unlink the regions among ``names`` still in ``/dev/shm``; the names removed."""
    removed = []
    for name in names:
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def record_regions(path: Path, names: Iterable[str]) -> None:
    """Write ``names`` to ``path``, one a line (write, then rename: a reader never sees half a list)."""
    temp = path.with_name(f".{path.name}.new")
    temp.write_text("".join(f"{name}\n" for name in sorted(names)))
    temp.replace(path)


def recorded_regions(path: Path) -> set[str]:
    """The region names :func:`record_regions` wrote to ``path`` (none if it is missing); other lines are ignored."""
    try:
        return {name for name in path.read_text().split() if _is_region(name)}
    except FileNotFoundError:
        return set()
