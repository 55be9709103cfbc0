"""One object that loads Whisper once and turns many audio inputs into UNet audio conditioning."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from whisper.model import AudioEncoder

from lipsync.audio.decode import load_audio
from lipsync.audio.encoder import encoder_features, load_whisper_encoder
from lipsync.audio.settings import AudioSettings
from lipsync.audio.windows import frame_windows


class AudioFeatureExtractor:
    """A loaded Whisper encoder plus the audio settings of a UNet config."""

    def __init__(self, encoder: AudioEncoder, settings: AudioSettings, dtype: torch.dtype = torch.float32) -> None:
        self.encoder = encoder
        self.settings = settings
        self.dtype = dtype

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: str | Path | Mapping[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> AudioFeatureExtractor:
        """Load the Whisper checkpoint at ``path``; ``config`` is the UNet config (path or loaded dict).

        ``dtype`` defaults to what official inference computes in: fp16 on CUDA, fp32 elsewhere.
        """
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        return cls(load_whisper_encoder(path, device), AudioSettings.from_config(config), dtype)

    def __call__(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features ``(T, n_audio_layer + 1, C)`` of a mono waveform at the config's sample rate."""
        return encoder_features(self.encoder, waveform, self.dtype)

    def load(self, path: str | Path) -> torch.Tensor:
        """Features of the audio in a file (audio or video), decoded at the config's sample rate."""
        return self(load_audio(path, self.settings.sample_rate))

    def frame_windows(
        self, features: torch.Tensor, num_frames: int | None = None, first_frame: int = 0
    ) -> torch.Tensor:
        """Per-frame windows ``(N, K * (n_audio_layer + 1), C)``; see :func:`lipsync.audio.frame_windows`."""
        return frame_windows(features, self.settings, num_frames, first_frame)
