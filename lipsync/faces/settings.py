"""Face settings (``configs/faces.yaml``): detector backends, alignment, mask geometry and paste-back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, NonNegativeInt, PositiveInt
from pydantic.dataclasses import dataclass

from lipsync.config import CONFIG_DIR, SCHEMA, home_path, load_settings

FACES_CONFIG = CONFIG_DIR / "faces.yaml"

Indices = Annotated[tuple[NonNegativeInt, ...], Field(min_length=1)]
"""Landmark indices averaged into one point."""
Point = tuple[float, float]


@dataclass(frozen=True, config=SCHEMA)
class PointSets:
    """Landmark indices averaged into the three alignment points (left brow, right brow, nose)."""

    left_brow: Indices
    right_brow: Indices
    nose: Indices

    @property
    def sets(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.left_brow, self.right_brow, self.nose


@dataclass(frozen=True, config=SCHEMA)
class MediaPipeSettings:
    model_selection: int
    min_detection_confidence: float
    crop_scale: float
    min_mesh_confidence: float
    points: PointSets
    mouth_points: tuple[NonNegativeInt, NonNegativeInt]
    """Inner upper and lower lip: their distance is the mouth opening."""
    face_height_points: tuple[NonNegativeInt, NonNegativeInt]
    """Forehead top and chin: the mouth opening is divided by their distance."""


@dataclass(frozen=True, config=SCHEMA)
class InsightFaceSettings:
    det_size: tuple[PositiveInt, PositiveInt]
    min_score: float
    min_width: int
    min_height: int
    min_aspect: float
    max_aspect: float
    providers: tuple[str, ...]
    points: PointSets


@dataclass(frozen=True, config=SCHEMA)
class AlignmentSettings:
    base_resolution: PositiveInt
    template: tuple[Point, Point, Point]
    """Left brow, right brow, nose (x, y)."""
    template_scale: float
    crop_size: tuple[PositiveInt, PositiveInt]
    ema_previous: float
    border_value: int


@dataclass(frozen=True, config=SCHEMA)
class MaskSettings:
    render_size: PositiveInt
    polygon: Annotated[tuple[Point, ...], Field(min_length=3)]


@dataclass(frozen=True, config=SCHEMA)
class PasteSettings:
    erode_kernel: int
    edge_divisor: PositiveInt


@dataclass(frozen=True, config=SCHEMA)
class SelectionSettings:
    """How ``box`` and ``active_speaker`` link faces into tracks and pick one (:mod:`lipsync.faces.selection`)."""

    min_iou: Annotated[float, Field(gt=0, le=1)]
    max_gap: NonNegativeInt
    thumbnail_size: PositiveInt
    cut_threshold: float
    smooth_frames: PositiveInt
    max_lag_frames: NonNegativeInt
    min_mouth_motion: float
    min_track_frames: PositiveInt


@dataclass(frozen=True, config=SCHEMA)
class FaceSettings:
    """Every field of ``configs/faces.yaml``; the file's comments say why each value was chosen."""

    mediapipe: MediaPipeSettings
    insightface: InsightFaceSettings
    alignment: AlignmentSettings
    mask: MaskSettings
    mask_image_path: Annotated[Path, AfterValidator(home_path)] | None
    """Relative paths are taken from :data:`lipsync.config.HOME`."""
    paste: PasteSettings
    selection: SelectionSettings

    @classmethod
    def load(cls, path: str | Path = FACES_CONFIG) -> FaceSettings:
        """The settings at ``path`` (read once); a missing, unknown or ill-shaped field raises :class:`ConfigError`."""
        return load_settings(cls, path, "faces config")
