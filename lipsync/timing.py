"""Wall-time accounting per pipeline stage."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from lipsync.gpu_guard import GPU_GUARD


class StageTimer:
    """Accumulates seconds per stage name; GPU work is synchronised so it lands in its own stage.

    Stages may run on several threads at once (paste/encode beside the GPU work), so their sum can
    exceed the job's wall time. CPU-only stages pass ``sync=False``: a device sync there would make
    them wait for another thread's GPU work. A device sync holds the GPU guard: it would invalidate
    another thread's CUDA-graph capture.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        device = torch.device(device) if device is not None else None
        self._cuda = device if device is not None and device.type == "cuda" else None
        """The device whose work is synchronised around stages; ``None``: nothing to synchronise."""
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str, sync: bool = True) -> Iterator[None]:
        cuda = self._cuda if sync else None
        if cuda is not None:
            _synchronize(cuda)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda is not None:
                _synchronize(cuda)
            with self._lock:
                self.seconds[name] += time.perf_counter() - start

    def add(self, other: StageTimer) -> None:
        """Add ``other``'s seconds (a part of this job timed on another device) to these."""
        self.add_seconds(other.seconds)

    def add_seconds(self, seconds: Mapping[str, float]) -> None:
        """Add seconds per stage (a part of this job timed elsewhere: another device or process) to these."""
        with self._lock:
            for name, value in seconds.items():
                self.seconds[name] += value

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}


def _synchronize(device: torch.device) -> None:
    with GPU_GUARD.shared():
        torch.cuda.synchronize(device)
