"""The audio fields of a UNet config's ``data`` section, checked against what Whisper can do."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisper.audio import SAMPLE_RATE, TOKENS_PER_SECOND

from lipsync.config import ConfigError, load_config

_FIELDS = ("audio_sample_rate", "video_fps", "audio_feat_length")


@dataclass(frozen=True)
class AudioSettings:
    """Sample rate, video frame rate and per-frame audio context (``audio_feat_length``) of one config."""

    sample_rate: int
    video_fps: int
    audio_feat_length: tuple[int, int]
    """Video frames of audio context before and after each frame (official: 2 and 2)."""

    @property
    def positions_per_frame(self) -> int:
        """Encoder positions per video frame (2 at 25 fps); ``audio_feat_length`` counts in these steps."""
        return TOKENS_PER_SECOND // self.video_fps

    @classmethod
    def from_config(cls, config: str | Path | Mapping[str, Any]) -> AudioSettings:
        """Read the settings from a UNet config (a path, or a dict from :func:`lipsync.config.load_config`)."""
        if not isinstance(config, Mapping):
            config = load_config(config)
        data = config.get("data") or {}
        absent = [name for name in _FIELDS if name not in data]
        if absent:
            raise ConfigError(f"UNet config 'data' section lacks {', '.join(absent)}")
        sample_rate, fps, feat_length = (data[name] for name in _FIELDS)
        if sample_rate != SAMPLE_RATE:
            raise ConfigError(f"audio_sample_rate is {sample_rate}, but Whisper's mel filters are for {SAMPLE_RATE} Hz")
        if not isinstance(fps, int) or fps <= 0 or TOKENS_PER_SECOND % fps:
            raise ConfigError(
                f"video_fps is {fps!r}; it must divide Whisper's {TOKENS_PER_SECOND} positions per second"
            )
        if (
            not isinstance(feat_length, (list, tuple))
            or len(feat_length) != 2
            or not all(isinstance(n, int) and n >= 0 for n in feat_length)
        ):
            raise ConfigError(f"audio_feat_length is {feat_length!r}; expected two non-negative integers")
        return cls(sample_rate, fps, tuple(feat_length))
