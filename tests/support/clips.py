"""Test clips built from the demo fixtures with plain PyAV (not the code under test's writer)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import av
import cv2
import numpy as np

from lipsync.audio import load_audio
from lipsync.media import VideoReader
from support.files import DEMO_AUDIO, DEMO_VIDEO

FPS = 25
SAMPLE_RATE = 16000
SIZE = (540, 960)
"""(width, height) of the test clips: the 1080×1920 demo clip at half size (the face stays ~100 px wide)."""


def demo_frames(count: int, size: tuple[int, int] = SIZE) -> list[np.ndarray]:
    """The first ``count`` frames of the demo clip as RGB, resized to ``size`` (width, height)."""
    with VideoReader(DEMO_VIDEO) as reader:
        return [cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in islice(iter(reader), count)]


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = FPS) -> Path:
    """Encode RGB frames as a high-quality H.264 MP4 (no audio) with plain PyAV."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Mono float waveform in [-1, 1) → 16-bit PCM WAV; an empty waveform gives a WAV with no samples."""
    samples = np.clip(np.round(np.asarray(waveform) * 32768), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate, layout="mono")
        container.start_encoding()  # writes the header even when no sample follows
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, 0
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def speech(seconds: float) -> np.ndarray:
    """The demo speech, tiled if needed, cut to ``seconds``."""
    waveform = load_audio(DEMO_AUDIO)
    samples = round(seconds * SAMPLE_RATE)
    return np.tile(waveform, -(-samples // waveform.size))[:samples]


def decode(path: Path) -> list[np.ndarray]:
    """All frames of a video, decoded as the pipeline decodes its input."""
    with VideoReader(path) as reader:
        return list(reader)


def flat(level: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.full((size[1], size[0], 3), level, np.uint8)


CLIP_SECONDS = 2.0
"""Length of the end-to-end tests' shared clip (the ``clip`` fixture)."""


COMPOSITE_SECONDS = 2.0
"""Length of the two-person composites (:func:`two_person_composite`)."""
COMPOSITE_HALF = (270, 480)
"""(width, height) of each half of a composite: the demo clip at a quarter of its size."""


def two_person_composite(path: Path, speaking: str, seconds: float = COMPOSITE_SECONDS) -> Path:
    """A side-by-side clip (ffmpeg ``hstack``) of two parts of the demo clip, one of them mirrored.

    The ``speaking`` half (``"left"`` or ``"right"``) plays its part with its own sound as the
    composite's audio; the other half is the still first frame of its part. The left part starts at
    0 s, the right (mirrored) one at 5 s.
    """
    if speaking not in ("left", "right"):
        raise ValueError(f"speaking must be left or right, got {speaking!r}")
    width, height = COMPOSITE_HALF
    starts = {"left": 0.0, "right": 5.0}
    scale = f"scale={width}:{height}:flags=area,setsar=1,fps={FPS}"
    halves = {
        "left": f"[0:v]{scale}",
        "right": f"[1:v]{scale},hflip",
    }
    still = "left" if speaking == "right" else "right"
    halves[still] += ",trim=end_frame=1,tpad=stop_mode=clone:stop=-1"
    graph = (
        f"{halves['left']},trim=duration={seconds},setpts=PTS-STARTPTS[l];"
        f"{halves['right']},trim=duration={seconds},setpts=PTS-STARTPTS[r];"
        "[l][r]hstack=inputs=2[v]"
    )
    audio_input = "0" if speaking == "left" else "1"
    command = [
        "ffmpeg", "-v", "error", "-y",
        "-ss", str(starts["left"]), "-t", str(seconds + 1), "-i", str(DEMO_VIDEO),
        "-ss", str(starts["right"]), "-t", str(seconds + 1), "-i", str(DEMO_VIDEO),
        "-filter_complex", graph, "-map", "[v]", "-map", f"{audio_input}:a",
        "-t", str(seconds), "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-ar", str(SAMPLE_RATE), "-ac", "1", str(path),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return path
