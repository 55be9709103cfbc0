"""Which source video frame each output frame shows.

The output has one frame per audio window (``lipsync.audio.window_count``). When the audio is
longer than the video the video is looped — ``pingpong`` (forward, backward, forward, …; the
official default) or ``loop`` (forward again) — and when it is shorter the video is cut.
"""

from __future__ import annotations

from enum import Enum


class LoopMode(str, Enum):
    PINGPONG = "pingpong"
    LOOP = "loop"

    @classmethod
    def parse(cls, value: "str | LoopMode") -> "LoopMode":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"loop_mode must be one of {[mode.value for mode in cls]}, got {value!r}") from None


def source_frames(output_frames: int, video_frames: int, mode: LoopMode | str = LoopMode.PINGPONG) -> list[int]:
    """Source frame index for each of ``output_frames`` output frames.

    Ping-pong plays the whole clip forward, then the whole clip reversed, and so on, so the
    turning frames show twice in a row (0 1 2 2 1 0 0 1 2 …), as the official pipeline does.
    """
    if video_frames < 1:
        raise ValueError("the video has no frames")
    if output_frames < 0:
        raise ValueError("output_frames must not be negative")
    mode = LoopMode.parse(mode)
    if mode is LoopMode.LOOP:
        return [index % video_frames for index in range(output_frames)]
    period = 2 * video_frames
    return [min(index % period, period - 1 - index % period) for index in range(output_frames)]
