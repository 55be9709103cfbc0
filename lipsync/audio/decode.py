"""Decoding any audio (or a video's audio track) to the waveform Whisper expects.

Official inference shells out to the ffmpeg CLI for mono 16-bit PCM at 16 kHz and divides by 32768. We
do the same conversion in-process with PyAV's ``AudioResampler`` (libswresample, like the CLI): PCM WAV
decodes bit-identically to the CLI; compressed audio can differ by one 16-bit step where FFmpeg
versions round differently (the demo video's AAC track: 7 of 160,125 samples, CLI 5.1 vs PyAV's 8.0).
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import av
import numpy as np

from lipsync.errors import BadInput
from lipsync.media.probe import (
    check_audio_length,
    check_audio_limits,
    check_file,
    open_media,
)
from lipsync.media.settings import AUDIO_SAMPLE_RATE, MediaLimits, MediaSettings

_PCM_FORMAT = "s16"
"""Sample format official decoding goes through; quantising to it is part of matching its waveform."""
_FULL_SCALE = -float(np.iinfo(np.int16).min)
"""32768: dividing s16 samples by it gives official's float waveform."""


class AudioError(BadInput):
    """An audio input is missing, has no audio stream, cannot be decoded, or is too short."""


def load_audio(path: str | Path, sample_rate: int = AUDIO_SAMPLE_RATE, limits: MediaLimits | None = None) -> np.ndarray:
    """Decode the audio of ``path`` to a mono float32 waveform in [-1, 1) at ``sample_rate``.

    Works for audio files and for videos; like the ffmpeg CLI, the "best" audio stream is used when
    there are several. Audio longer than ``limits.max_audio_s`` (default: ``configs/media.yaml``)
    raises :class:`lipsync.media.errors.MediaLimitError`, from the header before decoding where it
    declares a duration, else as soon as decoding passes the limit.
    """
    path = Path(path)
    check_file(path, "audio", AudioError)
    limits = limits or MediaSettings.load().limits
    resampler = av.AudioResampler(format=_PCM_FORMAT, layout="mono", rate=sample_rate)
    try:
        with open_media(path, limits) as container:
            stream = container.streams.best("audio")
            if not isinstance(stream, av.AudioStream):  # None: there is none
                kinds = ", ".join(s.type for s in container.streams) or "no streams"
                raise AudioError(f"{path} has no audio stream ({kinds})")
            check_audio_limits(container, stream, limits)
            chunks, samples = [], 0
            for decoded in chain(container.decode(stream), [None]):
                for frame in resampler.resample(decoded):
                    chunks.append(frame.to_ndarray().reshape(-1))
                    samples += chunks[-1].size
                check_audio_length(samples / sample_rate, limits)
    except av.FFmpegError as exc:
        raise AudioError(f"cannot decode audio from {path}: {exc}") from exc
    pcm = np.concatenate(chunks) if chunks else np.empty(0, np.int16)
    if pcm.size == 0:
        raise AudioError(f"{path} contains no audio samples")
    return pcm.astype(np.float32) / _FULL_SCALE
