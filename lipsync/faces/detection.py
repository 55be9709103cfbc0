"""What a face detector gives the aligner: three alignment points, a box and a score, for one face.

Official alignment needs only three points per frame: the centres of both eyebrows and
of the nose, each the mean of a fixed set of landmarks. Backends differ in their landmark schemes, so
each maps its own landmarks to these three points and the rest of the pipeline never sees the scheme.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lipsync.faces.settings import PointSets


@dataclass(frozen=True)
class FaceLandmarks:
    """One detected face, in full-frame pixel coordinates (pixel centres at integers)."""

    points: np.ndarray
    """(3, 2) float64 (x, y): image-left brow centre, image-right brow centre, nose centre."""
    box: tuple[float, float, float, float]
    """Detector box (x1, y1, x2, y2)."""
    score: float
    """Detector confidence in [0, 1]."""
    mouth: float | None = None
    """Mouth opening (inner-lip gap over the face height); ``None`` where the backend gives none."""

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceDetector(Protocol):
    """Finds faces in an RGB frame (``frame``: (H, W, 3) uint8 RGB)."""

    def detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        """The largest face; ``None`` when no face passes the backend's checks."""
        ...

    def detect_all(self, frame: np.ndarray) -> list[FaceLandmarks]:
        """Every face that passes the backend's checks, with landmarks."""
        ...


def alignment_points(landmarks: np.ndarray, point_sets: PointSets) -> np.ndarray:
    """The (3, 2) means of ``landmarks[indices]`` for the brow and nose index sets, as float64."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    return np.stack([landmarks[list(indices)].mean(axis=0) for indices in point_sets.sets])


def check_frame(frame: np.ndarray) -> None:
    """Reject anything but an (H, W, 3) uint8 image, which both backends' models assume."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")


class DetectorPool:
    """Face detectors for concurrent jobs: backends keep per-graph state and are not thread-safe.

    A job borrows one detector for its analysis pass; a detector is built only when every existing
    one is busy, so the pool grows to the number of jobs analysed at the same time.
    """

    def __init__(self, factory: Callable[[], FaceDetector], ready: list[FaceDetector] | None = None) -> None:
        self.factory = factory
        self._idle: list[FaceDetector] = list(ready or [])
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[FaceDetector]:
        with self._lock:
            detector = self._idle.pop() if self._idle else None
        detector = detector or self.factory()
        try:
            yield detector
        finally:
            with self._lock:
                self._idle.append(detector)

    def close(self) -> None:
        """Close the idle detectors that have a ``close`` method."""
        with self._lock:
            idle, self._idle = self._idle, []
        for detector in idle:
            close = getattr(detector, "close", None)
            if close is not None:
                close()
