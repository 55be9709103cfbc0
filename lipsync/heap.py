"""Give the C heap's free pages back to the system after a job.

A job's frames are arrays of a few MB each. Once glibc has seen such a block freed it serves the next ones
from its heaps instead of fresh mappings, and pages freed in the middle of a heap stay resident: a process
that ran one demo-clip job keeps gigabytes it no longer uses, and Python's garbage collector cannot help
(the memory is free already, in the allocator). ``malloc_trim`` returns every whole free page of every
arena. Where the C library has no ``malloc_trim`` (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:  # the symbols already loaded into this process, the C library's among them
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the C heap's free pages to the system."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
