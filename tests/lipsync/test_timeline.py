"""Output-frame → source-frame mapping for looping and cutting."""

import pytest

from lipsync.timeline import LoopMode, output_length, source_frames


def test_audio_shorter_than_video_cuts_the_video() -> None:
    assert source_frames(3, 10) == [0, 1, 2]


def test_pingpong_reverses_the_whole_clip_like_official() -> None:
    assert source_frames(10, 3, "pingpong") == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]


def test_loop_restarts_the_clip() -> None:
    assert source_frames(7, 3, LoopMode.LOOP) == [0, 1, 2, 0, 1, 2, 0]


def test_cut_ends_the_output_with_the_video() -> None:
    assert output_length(10, 3, "cut") == 3
    assert source_frames(output_length(10, 3, LoopMode.CUT), 3, "cut") == [0, 1, 2]
    assert output_length(2, 3, "cut") == 2  # a video longer than the audio is cut as in every mode
    assert output_length(10, 3, "pingpong") == output_length(10, 3, "loop") == 10


def test_cut_holds_the_last_frame_where_a_header_overstated_the_length() -> None:
    assert source_frames(5, 3, "cut") == [0, 1, 2, 2, 2]


def test_single_frame_video_repeats() -> None:
    assert source_frames(4, 1) == [0, 0, 0, 0]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="loop_mode must be one of"):
        source_frames(3, 3, "bounce")
    with pytest.raises(ValueError, match="no frames"):
        source_frames(3, 0)
