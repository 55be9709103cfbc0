"""Fixtures of the end-to-end tests that several modules share."""

from __future__ import annotations

import pytest
from support.clips import CLIP_SECONDS, demo_frames, speech, write_video, write_wav


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[bytes, bytes]:
    """A 2 s half-size demo clip (50 frames, 4 windows) and 2 s of its speech, as file bytes."""
    folder = tmp_path_factory.mktemp("clip")
    video = write_video(folder / "clip.mp4", demo_frames(50))
    audio = write_wav(folder / "speech.wav", speech(CLIP_SECONDS))
    return video.read_bytes(), audio.read_bytes()
