"""Media settings (``configs/media.yaml``): the resampling frame rate, the encoder parameters and the input limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import PositiveFloat, PositiveInt
from pydantic.dataclasses import dataclass

from lipsync.config import CONFIG_DIR, SCHEMA, load_settings

MEDIA_CONFIG = CONFIG_DIR / "media.yaml"

AUDIO_SAMPLE_RATE = 16000
"""Hz of decoded audio and of the audio the writer receives: Whisper's mel filters are built for 16 kHz."""


@dataclass(frozen=True, config=SCHEMA)
class MediaLimits:
    """The largest input a job may bring (section ``limits`` of ``configs/media.yaml``).

    Checked from headers before decoding and counted again while decoding, see :mod:`lipsync.media.probe`.
    """

    max_side: PositiveInt
    """Pixels of the longer side of a frame."""
    max_pixels: PositiveInt
    """Pixels of one frame (width × height); also handed to the decoder, which refuses larger pictures."""
    max_video_s: PositiveFloat
    max_frames: PositiveInt
    """Source frames of the video stream (before resampling to the output rate)."""
    max_audio_s: PositiveFloat


@dataclass(frozen=True, config=SCHEMA)
class MediaSettings:
    """Every field of ``configs/media.yaml``; the file's comments say why each value was chosen."""

    fps: PositiveInt
    truncation_tolerance: float
    video_codec: str
    crf: int
    preset: str
    pix_fmt: str
    encoder_threads: int
    audio_codec: str
    audio_bitrate: PositiveInt
    movflags: str
    limits: MediaLimits

    @classmethod
    def load(cls, path: str | Path = MEDIA_CONFIG) -> MediaSettings:
        """The settings at ``path`` (read once); a missing, unknown or ill-typed field raises :class:`ConfigError`."""
        return load_settings(cls, path, "media config")
