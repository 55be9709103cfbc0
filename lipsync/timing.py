"""Wall-time accounting per pipeline stage."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates seconds per stage name; GPU work is synchronised so it lands in its own stage."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = torch.device(device).type == "cuda" if device is not None else False

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}
