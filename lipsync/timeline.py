"""Which source video frame each output frame shows.

The audio sets the output's length (one frame per audio window, ``lipsync.audio.window_count``). When
it is longer than the video, the loop mode says what happens: ``pingpong`` (forward, backward,
forward, …; the official default) and ``loop`` (forward again) extend the video, ``cut`` ends the
output with the video (the audio is cut to it). A video longer than the audio is always cut.
"""

from __future__ import annotations

from enum import Enum

from lipsync.errors import BadInput


class LoopMode(str, Enum):
    PINGPONG = "pingpong"
    LOOP = "loop"
    CUT = "cut"

    @classmethod
    def parse(cls, value: str | LoopMode) -> LoopMode:
        try:
            return cls(value)
        except ValueError:
            raise BadInput(f"loop_mode must be one of {[mode.value for mode in cls]}, got {value!r}") from None


def output_length(audio_frames: int, video_frames: int, mode: LoopMode | str = LoopMode.PINGPONG) -> int:
    """Frames of the output for ``audio_frames`` of speech and a video of ``video_frames``."""
    return min(audio_frames, video_frames) if LoopMode.parse(mode) is LoopMode.CUT else audio_frames


def source_frames(output_frames: int, video_frames: int, mode: LoopMode | str = LoopMode.PINGPONG) -> list[int]:
    """Source frame index for each of ``output_frames`` output frames.

    Ping-pong plays the whole clip forward, then the whole clip reversed, and so on, so the
    turning frames show twice in a row (0 1 2 2 1 0 0 1 2 …), as the official pipeline does. Cut
    expects ``output_frames`` from :func:`output_length`, which a header's frame count may overstate
    by a frame or two: the last frame is held for those.
    """
    if video_frames < 1:
        raise BadInput("the video has no frames")
    if output_frames < 0:
        raise ValueError("output_frames must not be negative")
    mode = LoopMode.parse(mode)
    if mode is LoopMode.LOOP:
        return [index % video_frames for index in range(output_frames)]
    if mode is LoopMode.CUT:
        return [min(index, video_frames - 1) for index in range(output_frames)]
    period = 2 * video_frames
    return [min(index % period, period - 1 - index % period) for index in range(output_frames)]
