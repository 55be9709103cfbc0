"""Streaming a video as upright RGB frames at a fixed frame rate (25 fps for LatentSync).

Official inference re-encodes the input with ``ffmpeg -r 25`` into a temp file and then loads every
frame into RAM. We decode the input directly and hand out one frame at a time through an FFmpeg filter
graph, so memory does not grow with the clip's length and no temp file is ever written:

    decoder (frame + slice threads) → fps → [transpose / flips] → format=rgb24 → caller

Frame-rate rule (FFmpeg's ``fps`` filter, ``round=near``): every source frame's timestamp is rounded to
the nearest output tick, and output frame ``n`` (time ``n / fps``) shows the last source frame whose
rounded timestamp is ≤ ``n``, i.e. the frame on screen just before the middle of the tick, ``(n + ½) / fps``.
Source frames that fall between ticks are dropped, frames that last several ticks are repeated. Output
starts at the first source frame and ends at the end of the last one (its timestamp plus duration),
so a clip of ``d`` seconds gives ``round(d · fps)`` frames. The ffmpeg CLI's ``-r 25`` that official
uses (output ``-vsync cfr``) follows the same timestamps but only drops or repeats once a frame is
more than 1.1 ticks off, so it can lag up to a frame behind and emit a frame or two more at the ends
(measured with ffmpeg 5.1 on a 1 s, 30 fps clip: 27 frames against our 25); on 25 fps sources, like
the demo clip, both give the source frames unchanged.

Colours are converted with the matrix and range the stream is tagged with (BT.601 when untagged,
FFmpeg's default); HDR sources are not tone-mapped. Rotation metadata (phone clips) is applied, as
the ffmpeg CLI does by default, so frames come out the way players show them. A stream that changes
its picture size midway is scaled back to the size of its first frame, so every frame has one size.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from av.filter import Graph
from av.video.frame import VideoFrame

from lipsync.media.errors import MediaError
from lipsync.media.probe import (
    VideoInfo,
    check_frame_count,
    check_video_length,
    declared_duration,
    open_video,
    video_info,
)
from lipsync.media.settings import MediaSettings

_UPRIGHT_FILTERS: dict[int, tuple[tuple[str, str | None], ...]] = {
    0: (),
    90: (("transpose", "cclock"),),
    180: (("hflip", None), ("vflip", None)),
    270: (("transpose", "clock"),),
}
"""Filters that turn a picture stored with a display rotation (degrees counter-clockwise) upright."""


class VideoReader:
    """Iterates the frames of one video file as ``(height, width, 3)`` uint8 RGB arrays at ``fps``.

    Opening validates the file (see :mod:`lipsync.media.probe`) and decodes the first frame, so a file
    that cannot be decoded fails here, before any work is spent on it; ``info`` then describes it.
    The frames can be iterated once. A stream that stops more than ``truncation_tolerance`` seconds
    before the duration its header declares raises :class:`MediaError` at the end of the iteration:
    a cut-short file is an error, never a silently shorter result. A video over the media limits
    (``settings.limits``) raises :class:`MediaLimitError`: on opening when its headers say so, else
    once decoding reaches the limit.
    """

    def __init__(self, path: str | Path, fps: int | None = None, settings: MediaSettings | None = None) -> None:
        settings = settings or MediaSettings.load()
        self.path = Path(path)
        self.fps = fps or settings.fps
        self._tolerance = settings.truncation_tolerance
        self._limits = settings.limits
        self._container, self._stream = open_video(self.path, self._limits)
        try:
            self._stream.thread_type = "AUTO"  # frame and slice threads; thread_count 0 = one per core
            self._decoded = self._decode()
            self._first: VideoFrame | None = next(self._decoded, None)
            if self._first is None:
                raise MediaError(f"{self.path} has a video stream but no frames in it")
            rotation = round(self._first.rotation / 90) % 4 * 90
            self._graph: Graph | None = self._build_graph(self._first, rotation)
            self.info: VideoInfo = video_info(self.path, self._container, self._stream, rotation)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is None:
            raise RuntimeError("a VideoReader's frames can be read once; open a new reader to read them again")
        first, self._first = self._first, None
        graph = self._graph
        assert graph is not None  # built on opening, dropped only by close()
        start = end = first.pts or 0
        for frame in chain([first], self._decoded):
            if frame.pts is None:  # raw elementary streams (.h264, .hevc) carry no timestamps: play back to back
                frame.pts = end
            end = frame.pts + (frame.duration or 0)
            graph.vpush(frame)
            yield from self._pull(graph)
        graph.vpush(None)
        yield from self._pull(graph)
        assert first.time_base is not None  # a decoded frame carries its stream's
        self._check_length(float((end - start) * first.time_base))

    def close(self) -> None:
        """Close the file and drop the decoder's state now.

        The decoding generator refers back to this reader, and PyAV's filter graph to itself: left to the
        garbage collector, each finished reader would keep its decoder threads and frame buffers (about a
        second of decoded video and more) until a full collection, which a process that allocates few
        Python objects may not run for many jobs."""
        decoded = getattr(self, "_decoded", None)
        if decoded is not None:
            decoded.close()
        self._first = None
        self._graph = None
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _decode(self) -> Iterator[VideoFrame]:
        """Source frames, counted against the limits (headers need not declare a length)."""
        decoded_until = 0.0
        first_time: float | None = None
        try:
            for count, frame in enumerate(self._container.decode(self._stream), start=1):
                decoded_until = frame.time or decoded_until
                first_time = decoded_until if first_time is None else first_time
                check_frame_count(count, self._limits)
                check_video_length(decoded_until - first_time, self._limits)
                yield frame
        except av.FFmpegError as exc:
            raise MediaError(
                f"{self.path}: the video data is corrupt or cut short after {decoded_until:.2f} s ({exc})"
            ) from None

    def _build_graph(self, first: VideoFrame, rotation: int) -> Graph:
        graph = Graph()
        source = graph.add_buffer(
            width=first.width, height=first.height, format=first.format, time_base=first.time_base
        )
        upright = [graph.add(name, args) for name, args in _UPRIGHT_FILTERS[rotation]]
        graph.link_nodes(
            source,
            graph.add("fps", f"fps={self.fps}:round=near"),
            *upright,
            graph.add("format", "pix_fmts=rgb24"),
            graph.add("buffersink"),
        ).configure()
        return graph

    @staticmethod
    def _pull(graph: Graph) -> Iterator[np.ndarray]:
        while True:
            try:
                frame = graph.vpull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            yield frame.to_ndarray()

    def _check_length(self, decoded: float) -> None:
        declared = declared_duration(self._stream)
        if declared is not None and decoded < declared - self._tolerance:
            raise MediaError(
                f"{self.path} is truncated: its video stops after {decoded:.2f} s but the file declares "
                f"{declared:.2f} s; the recording or upload stopped early"
            )
