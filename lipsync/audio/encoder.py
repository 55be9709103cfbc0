"""The Whisper encoder as LatentSync uses it: loaded from an OpenAI checkpoint, run for per-layer features.

Official features are the encoder's hidden states after the positional embedding and after
each block (``n_audio_layer + 1`` "layers", without ``ln_post``), computed on 30 s windows of a log-mel
spectrogram taken over the whole clip. We get them by running the encoder's own submodules in order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from whisper.audio import (
    FRAMES_PER_SECOND,
    N_FRAMES,
    N_SAMPLES_PER_TOKEN,
    TOKENS_PER_SECOND,
    log_mel_spectrogram,
    pad_or_trim,
)
from whisper.model import AudioEncoder, ModelDimensions, Whisper, disable_sdpa

from lipsync.audio.decode import AudioError
from lipsync.weights import WeightsError

CHECKPOINT_KEYS = ("dims", "model_state_dict")
"""Top-level keys of an OpenAI-format Whisper checkpoint (``tiny.pt``)."""

WINDOW_POSITIONS = N_FRAMES * TOKENS_PER_SECOND // FRAMES_PER_SECOND
"""Encoder positions per 30 s mel window (1500), the only input length Whisper's encoder accepts."""


def load_whisper_encoder(path: str | Path, device: str | torch.device = "cpu") -> AudioEncoder:
    """Load the encoder of an OpenAI-format Whisper checkpoint at ``path``, never touching the network.

    The whole model is built and loaded strictly, as official does, so a checkpoint with wrong or
    missing keys fails here rather than producing features from random weights; only the encoder is
    kept (the decoder is never run). Weights are fp32 like official's; the compute precision is chosen
    per call (see :func:`encoder_features`), since Whisper's layers cast weights to their input's dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Whisper checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load's error type depends on the bytes (KeyError, EOFError, ...)
        raise WeightsError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict):
        raise WeightsError(
            f"{path} holds a {type(checkpoint).__name__}, not an OpenAI Whisper checkpoint "
            f"(a dict with {', '.join(CHECKPOINT_KEYS)})"
        )
    absent = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if absent:
        raise WeightsError(
            f"Whisper checkpoint {path} lacks {', '.join(map(repr, absent))} "
            f"(has {', '.join(map(repr, checkpoint)) or 'no keys'})"
        )
    try:
        dims = ModelDimensions(**checkpoint["dims"])
    except TypeError as exc:
        raise WeightsError(f"Whisper checkpoint {path}: 'dims' does not describe a Whisper model: {exc}") from exc
    if dims.n_audio_ctx != WINDOW_POSITIONS:
        raise WeightsError(
            f"Whisper checkpoint {path}: n_audio_ctx is {dims.n_audio_ctx}, but 30 s windows need {WINDOW_POSITIONS}"
        )
    model = Whisper(dims)
    try:
        model.load_state_dict(checkpoint["model_state_dict"])
    except (RuntimeError, TypeError) as exc:
        raise WeightsError(f"Whisper checkpoint {path}: 'model_state_dict' does not fit its dims: {exc}") from exc
    return model.encoder.to(device).eval().requires_grad_(False)


def _layer_outputs(encoder: AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """Hidden states ``(B, positions, n_audio_layer + 1, C)`` for a mel batch ``(B, n_mels, N_FRAMES)``.

    This is ``AudioEncoder.forward`` stopped before ``ln_post``, keeping every intermediate state.
    Attention runs in Whisper's explicit (non-SDPA) form, the arithmetic of the Whisper copy official
    inference vendors.
    """
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = (x + encoder.positional_embedding).to(x.dtype)
    states = [x]
    with disable_sdpa():
        for block in encoder.blocks:
            x = block(x)
            states.append(x)
    return torch.stack(states, dim=2)


@torch.no_grad()
def encoder_features(
    encoder: AudioEncoder, waveform: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-position features ``(T, n_audio_layer + 1, n_audio_state)`` of a mono 16 kHz waveform.

    As official: the log-mel spectrogram (and its clip-wide max - 8 floor) is computed on the CPU over
    the whole waveform, then cut into ``N_FRAMES`` (30 s) windows, each zero-padded in the normalised
    mel domain and encoded on its own in ``dtype``; each window contributes the positions its real
    frames cover (half its frame count), so ``T`` is about 50 per second of audio and windows join
    without gaps. The result has ``dtype`` and lies on the encoder's device.
    """
    waveform = torch.as_tensor(waveform, dtype=torch.float32, device="cpu")
    if waveform.ndim != 1:
        raise AudioError(f"expected a mono waveform (1-D), got shape {tuple(waveform.shape)}")
    if len(waveform) < N_SAMPLES_PER_TOKEN:
        raise AudioError(
            f"audio has {len(waveform)} samples; one encoder position needs at least {N_SAMPLES_PER_TOKEN}"
        )
    mel = log_mel_spectrogram(waveform, n_mels=encoder.conv1.in_channels)
    device = encoder.positional_embedding.device
    features = []
    for start in range(0, mel.shape[-1], N_FRAMES):
        window = mel[:, start : start + N_FRAMES]
        valid_positions = window.shape[-1] * TOKENS_PER_SECOND // FRAMES_PER_SECOND
        batch = pad_or_trim(window, N_FRAMES).to(device=device, dtype=dtype).unsqueeze(0)
        features.append(_layer_outputs(encoder, batch)[0, :valid_positions])
    return torch.cat(features)
