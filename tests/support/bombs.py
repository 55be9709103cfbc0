"""Media files that are tiny on disk but huge once decoded, made with plain PyAV at test time."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

_CODECS = {".avi": ("mjpeg", "yuvj420p", {})}
"""Suffix → encoder, pixel format and options where it is not H.264 (MJPEG: a decoder FFmpeg must run to
learn the stream's pixel format, so an over-large picture fails while the file is opened)."""


def huge_frame_video(path: Path, width: int, height: int, frames: int = 1) -> Path:
    """``frames`` flat grey ``width``×``height`` frames, H.264 in a MOV/MP4/MKV or MJPEG in an AVI (by
    suffix): a few dozen KiB on disk (MJPEG: a few hundred) for what decodes to ``width × height × 1.5``
    bytes a frame (×3 as RGB)."""
    codec, pix_fmt, options = _CODECS.get(path.suffix, ("libx264", "yuv420p", {"preset": "ultrafast"}))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        frame = av.VideoFrame(width, height, pix_fmt)
        for plane in frame.planes:
            plane.update(bytes([128]) * plane.buffer_size)
        for index in range(frames):
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def sparse_video(path: Path, seconds: float, size: int = 64) -> Path:
    """Two small frames ``seconds`` apart: an MP4 that declares ``seconds`` of video (25 fps output
    would repeat the first frame all that time)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        picture = np.zeros((size, size, 3), np.uint8)
        for pts in (0, round(seconds * 25)):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def raw_h264(path: Path, frames: int, size: int = 32) -> Path:
    """An H.264 elementary stream: no container, so no header says how long it is."""
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), index * 8 % 256, np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def silent_flac(path: Path, seconds: float, sample_rate: int = 8000) -> Path:
    """``seconds`` of digital silence as FLAC: about 200 bytes a second."""
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=sample_rate, layout="mono")
        block = av.AudioFrame.from_ndarray(np.zeros((1, sample_rate * 10), np.int16), format="s16", layout="mono")
        block.sample_rate = sample_rate
        for index in range(round(seconds / 10)):
            block.pts = index * sample_rate * 10
            container.mux(stream.encode(block))
        container.mux(stream.encode(None))
    return path
