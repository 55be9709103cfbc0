"""Face settings (``configs/faces.yaml``): detector backends, alignment, mask geometry and paste-back."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lipsync.config import CONFIG_DIR, ConfigError, read_yaml

FACES_CONFIG = CONFIG_DIR / "faces.yaml"
REPO_ROOT = CONFIG_DIR.parent
"""Relative ``mask_image_path`` values are taken from here."""


@dataclass(frozen=True)
class PointSets:
    """Landmark indices averaged into the three alignment points (left brow, right brow, nose)."""

    left_brow: tuple[int, ...]
    right_brow: tuple[int, ...]
    nose: tuple[int, ...]

    @property
    def sets(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.left_brow, self.right_brow, self.nose


@dataclass(frozen=True)
class MediaPipeSettings:
    model_selection: int
    min_detection_confidence: float
    crop_scale: float
    min_mesh_confidence: float
    points: PointSets


@dataclass(frozen=True)
class InsightFaceSettings:
    det_size: tuple[int, int]
    min_score: float
    min_width: int
    min_height: int
    min_aspect: float
    max_aspect: float
    providers: tuple[str, ...]
    points: PointSets


@dataclass(frozen=True)
class AlignmentSettings:
    base_resolution: int
    template: tuple[tuple[float, float], ...]
    template_scale: float
    crop_size: tuple[int, int]
    ema_previous: float
    border_value: int


@dataclass(frozen=True)
class MaskSettings:
    render_size: int
    polygon: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class PasteSettings:
    erode_kernel: int
    edge_divisor: int


@dataclass(frozen=True)
class FaceSettings:
    """Every field of ``configs/faces.yaml``; the file's comments say why each value was chosen."""

    mediapipe: MediaPipeSettings
    insightface: InsightFaceSettings
    alignment: AlignmentSettings
    mask: MaskSettings
    mask_image_path: Path | None
    paste: PasteSettings

    @classmethod
    def load(cls, path: str | Path = FACES_CONFIG) -> FaceSettings:
        """Read the settings at ``path``; a missing, unknown or ill-shaped field raises :class:`ConfigError`."""
        raw = read_yaml(path, "faces config")
        try:
            return cls._from_raw(raw)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"faces config {path} is malformed: {exc}") from None

    @classmethod
    def _from_raw(cls, raw: dict[str, Any]) -> FaceSettings:
        _exact_keys(raw, cls, "top level")
        mp = dict(raw["mediapipe"])
        mp["points"] = _points(mp["points"])
        insight = dict(raw["insightface"])
        insight["points"] = _points(insight["points"])
        insight["det_size"] = _pair(insight["det_size"], int)
        insight["providers"] = tuple(str(p) for p in insight["providers"])
        align = dict(raw["alignment"])
        align["template"] = tuple(_pair(p, float) for p in align["template"])
        align["crop_size"] = _pair(align["crop_size"], int)
        if len(align["template"]) != 3:
            raise ValueError("alignment.template must have three points")
        mask = dict(raw["mask"])
        mask["polygon"] = tuple(_pair(p, float) for p in mask["polygon"])
        if len(mask["polygon"]) < 3:
            raise ValueError("mask.polygon needs at least three vertices")
        image_path = raw["mask_image_path"]
        if image_path is not None:
            image_path = Path(image_path)
            image_path = image_path if image_path.is_absolute() else REPO_ROOT / image_path
        sections = {
            "mediapipe": (MediaPipeSettings, mp),
            "insightface": (InsightFaceSettings, insight),
            "alignment": (AlignmentSettings, align),
            "mask": (MaskSettings, mask),
            "paste": (PasteSettings, raw["paste"]),
        }
        built = {}
        for name, (section_cls, values) in sections.items():
            _exact_keys(values, section_cls, name)
            built[name] = section_cls(**values)
        return cls(mask_image_path=image_path, **built)


def _exact_keys(values: Any, section_cls: type, name: str) -> None:
    if not isinstance(values, dict):
        raise TypeError(f"{name} must be a mapping")
    expected = {f.name for f in fields(section_cls)}
    if set(values) != expected:
        missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
        raise KeyError(f"{name}: missing {missing}, unknown {unknown}")


def _pair(values: Any, kind: type) -> tuple:
    if len(values) != 2:
        raise ValueError(f"expected two numbers, got {values!r}")
    return tuple(kind(v) for v in values)


def _points(raw: dict[str, Any]) -> PointSets:
    _exact_keys(raw, PointSets, "points")
    sets = {name: tuple(int(i) for i in indices) for name, indices in raw.items()}
    if not all(sets.values()):
        raise ValueError("every landmark index set needs at least one index")
    return PointSets(**sets)
