"""RGB → YUV 4:2:0 (BT.709, limited range) in torch, on whatever device the frames are.

The encoder takes planar YUV 4:2:0. Through swscale, a 1080×1920 frame took ~48 ms on one core of
the GPU hosts (21 fps, more than encoding it), so on a GPU the conversion runs here instead,
batched, where it is almost free. On the CPU the pipeline keeps swscale, which beats tensor
arithmetic there; this function still runs on the CPU in tests, to keep both paths' maths equal.

The maths is swscale's for ``rgb24 → yuv420p`` with the BT.709 matrix and limited range: luma
``16 + 219·(Kr·R + Kg·G + Kb·B)/255``, chroma ``128 + 224·(B − Y)/(2·(1 − Kb))/255`` (and R for Cr),
rounded to the nearest integer. Chroma is taken from the mean of each 2×2 block (centre-sited);
swscale interpolates chroma at a slightly different position, so the two differ by a level or two
on sharp colour edges and agree elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from av.video.frame import VideoFrame

from lipsync.gpu_guard import GPU_GUARD
from lipsync.media.writer import VideoWriter
from lipsync.timing import StageTimer

_KR, _KB = 0.2126, 0.0722
"""BT.709 luma coefficients of red and blue (green is the rest)."""
_KG = 1 - _KR - _KB
_LUMA_SPAN, _CHROMA_SPAN = 219 / 255, 224 / 255
"""Limited ("MPEG") range: luma 16–235, chroma 16–240."""


def rgb_to_yuv420p(frames: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 RGB with even ``H``, ``W`` → ``(N, H·3/2, W)`` uint8 in yuv420p layout.

    Each output frame holds the Y plane, then the U and V planes (each ``H/2 × W/2``) back to back:
    the layout ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes.
    """
    count, height, width, channels = frames.shape
    if channels != 3 or frames.dtype != torch.uint8 or height % 2 or width % 2:
        raise ValueError(
            f"expected (N, H, W, 3) uint8 frames with even H and W, got {tuple(frames.shape)} {frames.dtype}"
        )
    rgb = frames.permute(0, 3, 1, 2).float()
    red, green, blue = rgb.unbind(1)
    luma = _KR * red + _KG * green + _KB * blue
    y = 16 + _LUMA_SPAN * luma
    # Chroma is linear in RGB, so averaging 2×2 blocks first equals averaging the full-size planes.
    small = F.avg_pool2d(rgb, 2)
    small_luma = _KR * small[:, 0] + _KG * small[:, 1] + _KB * small[:, 2]
    u = 128 + _CHROMA_SPAN * (small[:, 2] - small_luma) / (2 * (1 - _KB))
    v = 128 + _CHROMA_SPAN * (small[:, 0] - small_luma) / (2 * (1 - _KR))
    planes = torch.cat([y.flatten(1), u.flatten(1), v.flatten(1)], dim=1)
    return planes.round_().clamp_(0, 255).to(torch.uint8).view(count, height * 3 // 2, width)


def yuv420p_pictures(
    writer: VideoWriter, frames: Iterator[np.ndarray], device: torch.device, chunk: int, timer: StageTimer | None = None
) -> Iterator[VideoFrame]:
    """RGB frames as ``writer``'s pictures, in order, converted to YUV 4:2:0 on ``device`` ``chunk`` frames at a time.

    What the pipeline does on a GPU; on the CPU, swscale (``VideoWriter.picture``) is faster than tensor
    arithmetic, so the pipeline uses that there.
    """
    timer = timer or StageTimer()
    width, height = writer.output_size
    while group := list(islice(frames, chunk)):
        with GPU_GUARD.shared(), timer.stage("encode", sync=False):
            rgb = torch.from_numpy(np.stack([frame[:height, :width] for frame in group])).to(device)
            planes = rgb_to_yuv420p(rgb).cpu().numpy()
        for picture_planes in planes:
            yield writer.picture_from_yuv420p(picture_planes)
