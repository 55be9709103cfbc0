"""Per-video-frame audio windows: the ``(10 * (n_audio_layer + 1), C)`` tokens each frame cross-attends to."""

from __future__ import annotations

import torch

from lipsync.audio.decode import AudioError
from lipsync.audio.settings import AudioSettings


def window_count(num_positions: int, positions_per_frame: int) -> int:
    """How many video frames official inference makes for ``num_positions`` (``T``) encoder positions.

    Official emits the window of frame ``i = 0, 1, ...`` and stops right after the first frame whose
    centre ``floor(i * 50 / fps)`` exceeds ``T``, so ``N = 1 + min{i : floor(i * 50 / fps) > T}``. With
    ``p = 50 / fps`` positions per frame (an integer, see :class:`AudioSettings`) that is
    ``floor(T / p) + 2``; at 25 fps ``floor(T / 2) + 2``, about 80 ms more video than audio.
    """
    return num_positions // positions_per_frame + 2


def frame_windows(
    features: torch.Tensor, settings: AudioSettings, num_frames: int | None = None, first_frame: int = 0
) -> torch.Tensor:
    """Cut per-position features ``(T, L, C)`` into per-frame windows ``(N, K * L, C)``.

    Frame ``i`` is centred on position ``c = i * p`` (``p`` positions per frame) and takes positions
    ``c - a*p .. c + (b+1)*p - 1`` for ``audio_feat_length = (a, b)``, i.e. ``K = (a + b + 1) * p``
    positions (10 for official's ``[2, 2]`` at 25 fps: -80 ms .. +120 ms around the frame start),
    clamped to ``[0, T - 1]`` and flattened time-major (all layers of a position, then the next).
    ``N`` defaults to :func:`window_count`; pass ``num_frames`` to cut a different number of frames,
    and ``first_frame`` to cut frames ``first_frame .. first_frame + N - 1`` only (a batch of a long
    clip, without materialising every frame's window).
    """
    total = features.shape[0]
    if total == 0:
        raise AudioError("no audio features to cut into frame windows")
    step = settings.positions_per_frame
    before, after = settings.audio_feat_length
    count = window_count(total, step) - first_frame if num_frames is None else num_frames
    centres = torch.arange(first_frame, first_frame + count, device=features.device) * step
    offsets = torch.arange(-before * step, (after + 1) * step, device=features.device)
    index = (centres[:, None] + offsets[None, :]).clamp(0, total - 1)
    return features[index].flatten(1, 2)
