"""Source frames delivered in any playback order (for looped output) with bounded memory.

Forward runs stream straight from a decoder. Backward runs (the reversed passes of ping-pong) are
read in blocks: each block is decoded forward into memory and handed out reversed, so at most
``block`` frames are held, at the cost of decoding the clip's start again for each block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np

from lipsync.media import VideoReader


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Maximal runs as (first, last, step) with step +1 or −1."""
    start = 0
    while start < len(indices):
        end = start
        step = 1
        if end + 1 < len(indices) and indices[end + 1] - indices[end] in (1, -1):
            step = indices[end + 1] - indices[end]
            while end + 1 < len(indices) and indices[end + 1] - indices[end] == step:
                end += 1
        yield indices[start], indices[end], step
        start = end + 1


def _forward(path: Path, first: int, last: int) -> Iterator[np.ndarray]:
    with VideoReader(path) as reader:
        yield from islice(iter(reader), first, last + 1)


def frames_in_order(path: str | Path, indices: Sequence[int], block: int = 32) -> Iterator[np.ndarray]:
    """Yield frame ``indices[k]`` of the video (at the reader's fixed fps) for k = 0, 1, …"""
    path = Path(path)
    for first, last, step in _runs(indices):
        if step == 1:
            yield from _forward(path, first, last)
            continue
        high = first
        while high >= last:
            low = max(last, high - block + 1)
            yield from reversed(list(_forward(path, low, high)))
            high = low - 1
