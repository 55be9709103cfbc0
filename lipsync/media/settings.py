"""Media settings (``configs/media.yaml``): the resampling frame rate, the encoder parameters and the input limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lipsync.config import CONFIG_DIR, ConfigError, read_yaml

MEDIA_CONFIG = CONFIG_DIR / "media.yaml"


@dataclass(frozen=True)
class MediaLimits:
    """The largest input a job may bring (section ``limits`` of ``configs/media.yaml``).

    Checked from headers before decoding and counted again while decoding, see :mod:`lipsync.media.probe`.
    """

    max_side: int
    """Pixels of the longer side of a frame."""
    max_pixels: int
    """Pixels of one frame (width × height); also handed to the decoder, which refuses larger pictures."""
    max_video_s: float
    max_frames: int
    """Source frames of the video stream (before resampling to the output rate)."""
    max_audio_s: float


@dataclass(frozen=True)
class MediaSettings:
    """Every field of ``configs/media.yaml``; the file's comments say why each value was chosen."""

    fps: int
    truncation_tolerance: float
    video_codec: str
    crf: int
    preset: str
    pix_fmt: str
    encoder_threads: int
    audio_codec: str
    audio_bitrate: int
    movflags: str
    limits: MediaLimits

    @classmethod
    def load(cls, path: str | Path = MEDIA_CONFIG) -> MediaSettings:
        """Read the settings at ``path``; a missing, unknown or ill-typed field raises :class:`ConfigError`."""
        raw = read_yaml(path, "media config")
        try:
            settings = cls(**(raw | {"limits": MediaLimits(**raw.get("limits", {}))}))
        except TypeError as exc:
            raise ConfigError(f"media config {path} is malformed: {exc}") from None
        if not isinstance(settings.fps, int) or settings.fps <= 0:
            raise ConfigError(f"media config {path}: fps must be a positive integer, got {settings.fps!r}")
        return settings
