"""The GPU frame path's maths equals the CPU path's, checked on the CPU.

On a GPU the pipeline converts pasted frames to YUV 4:2:0 with tensor arithmetic
(``lipsync.media.colour``: ``rgb_to_yuv420p``, ``yuv420p_pictures``); on the CPU swscale does it
(``VideoWriter.picture``). The face warp cuts only the crop's footprint out of the frame before
warping; it must equal warping the whole frame.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lipsync.faces import FaceAligner
from lipsync.media import VideoReader, VideoWriter
from lipsync.media.colour import rgb_to_yuv420p, yuv420p_pictures


def _smooth_frame(height: int, width: int, seed: int) -> np.ndarray:
    """A frame of gentle colour gradients, where chroma siting does not matter."""
    rows, columns = np.mgrid[:height, :width].astype(np.float64)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    channels = [127.5 + 120 * np.sin(columns / width * 3 + rows / height * 2 + p) for p in phase]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _swscale(writer: VideoWriter, frame: np.ndarray) -> np.ndarray:
    return writer.picture(frame).to_ndarray()


def test_tensor_colour_conversion_equals_swscale_bt709_limited(tmp_path: Path) -> None:
    height, width = 96, 128
    with VideoWriter(tmp_path / "unused.mp4", width, height) as writer:
        smooth = _smooth_frame(height, width, 0)
        ours, reference = rgb_to_yuv420p(torch.from_numpy(smooth)[None])[0].numpy(), _swscale(writer, smooth)
        assert ours.shape == reference.shape == (height * 3 // 2, width)
        # Luma is the same formula: at most one level of rounding apart.
        assert np.abs(ours[:height].astype(int) - reference[:height]).max() <= 1
        # Chroma: the same matrix, sampled at a slightly different site; on smooth content within 2 levels.
        assert np.abs(ours[height:].astype(int) - reference[height:]).max() <= 2

        # 8×8 blocks of random colours: luma within one level everywhere; chroma (4×4 per block) within
        # one level inside each block, where the two chroma sites see the same colour.
        blocks = np.kron(np.random.default_rng(1).integers(0, 256, (height // 8, width // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        ours, reference = rgb_to_yuv420p(torch.from_numpy(blocks)[None])[0].numpy(), _swscale(writer, blocks)
        difference = np.abs(ours.astype(int) - reference)
        assert difference[:height].max() <= 1
        for plane in difference[height:].reshape(2, height // 2, width // 2):
            assert plane.reshape(height // 8, 4, width // 8, 4)[:, 1:3, :, 1:3].max() <= 1
        writer.write(blocks)


def test_pictures_from_tensor_planes_encode_as_well_as_swscales(tmp_path: Path) -> None:
    """``yuv420p_pictures`` — what the pipeline runs on a GPU — here on the CPU, through the encoder and back."""
    frames = [_smooth_frame(64, 80, seed) for seed in range(5)]
    padded = [np.pad(frame, ((0, 1), (0, 1), (0, 0)), mode="edge") for frame in frames]  # odd: cropped to 80×64
    with VideoWriter(tmp_path / "tensor.mp4", 81, 65) as writer:
        pictures = list(yuv420p_pictures(writer, iter(padded), torch.device("cpu"), chunk=2))
        assert len(pictures) == 5
        for picture in pictures:
            writer.write_picture(picture)
    with VideoWriter(tmp_path / "swscale.mp4", 81, 65) as writer:
        for frame in padded:
            writer.write(frame)
    errors = {}
    for name in ("tensor", "swscale"):
        with VideoReader(tmp_path / f"{name}.mp4") as reader:
            decoded = list(reader)
        assert len(decoded) == 5 and decoded[0].shape == frames[0].shape
        errors[name] = np.mean([np.abs(back.astype(int) - frame).mean() for frame, back in zip(frames, decoded)])
    assert errors["tensor"] <= errors["swscale"] + 0.25


def test_yuv_planes_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "out.mp4", 32, 32) as writer:
        with pytest.raises(ValueError, match="yuv420p"):
            writer.picture_from_yuv420p(np.zeros((32, 32), np.uint8))
        writer.write(np.zeros((32, 32, 3), np.uint8))


def test_colour_conversion_needs_even_uint8_frames() -> None:
    with pytest.raises(ValueError, match="even"):
        rgb_to_yuv420p(torch.zeros(1, 3, 4, 3, dtype=torch.uint8))


def _whole_frame_warp(aligner: FaceAligner, frame: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The warp over the whole frame, as official does it."""
    crop = cv2.warpAffine(
        frame.astype(np.float32), affine, aligner.crop_size, flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(aligner.settings.border_value,) * 3,
    ).astype(np.uint8)
    return cv2.resize(crop, (aligner.resolution, aligner.resolution), interpolation=cv2.INTER_LANCZOS4)


@pytest.mark.parametrize("resolution", [256, 512])
def test_footprint_warp_equals_warping_the_whole_frame(resolution: int) -> None:
    """Random similarity transforms: inside, across the edges of and entirely outside the frame."""
    aligner = FaceAligner(resolution)
    rng = np.random.default_rng(resolution)
    frame = rng.integers(0, 256, (360, 200, 3), dtype=np.uint8)
    for _ in range(60):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.5, 6)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        affine = np.concatenate([rotation, rng.uniform(-1500, 300, (2, 1))], axis=1)
        assert np.array_equal(aligner.warp(frame, affine), _whole_frame_warp(aligner, frame, affine))
