"""Output-frame → source-frame mapping for looping and cutting."""

import pytest

from lipsync.timeline import LoopMode, source_frames


def test_audio_shorter_than_video_cuts_the_video() -> None:
    assert source_frames(3, 10) == [0, 1, 2]


def test_pingpong_reverses_the_whole_clip_like_official() -> None:
    assert source_frames(10, 3, "pingpong") == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]


def test_loop_restarts_the_clip() -> None:
    assert source_frames(7, 3, LoopMode.LOOP) == [0, 1, 2, 0, 1, 2, 0]


def test_single_frame_video_repeats() -> None:
    assert source_frames(4, 1) == [0, 0, 0, 0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="loop_mode must be one of"):
        source_frames(3, 3, "bounce")
    with pytest.raises(ValueError, match="no frames"):
        source_frames(3, 0)
