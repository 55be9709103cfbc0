"""Opening a video file and checking, before any decoding, that it can be used.

Everything here reads container headers only: which stream is the video, whether FFmpeg has a decoder
for it, whether the file still holds all the data its index points at, and what duration the header
declares. Bad files become a :class:`MediaError` whose message says what is wrong with the file.

Input limits (:class:`MediaLimits`, ``configs/media.yaml``) are checked here too, from the headers, by
every reader of a job's inputs: the video reader, the audio decoder and the gateway's submit check.
A video is first opened with no decoder allowed, so its size, duration and frame count come from the
container headers and FFmpeg's parsers alone and a file over a limit is refused naming it. It is then
opened for decoding with the decoder told ``max_pixels``, because FFmpeg decodes frames while it opens a
file (to learn the stream's parameters): a 400 KiB file holding one 12000×12000 frame would otherwise
cost half a gigabyte, and a stream whose size only its frames tell (e.g. MPEG-4 Part 2) is bounded too.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.audio.stream import AudioStream
from av.container import InputContainer
from av.stream import Disposition
from av.video.stream import VideoStream

from lipsync.media.errors import MediaError, MediaLimitError
from lipsync.media.settings import MediaLimits

_MP4_SIGNATURE = b"ftyp"
"""Bytes 4–8 of every MP4/MOV file: the type of its first box."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video file declares, with the picture size as it is displayed (rotation applied)."""

    path: Path
    container: str
    """FFmpeg demuxer name, e.g. ``"mov,mp4,m4a,3gp,3g2,mj2"`` or ``"matroska,webm"``."""
    codec: str
    """FFmpeg decoder name, e.g. ``"hevc"``."""
    width: int
    height: int
    fps: float
    """Average source frame rate (frames are resampled to a fixed rate when read)."""
    duration: float
    """Seconds of video the header declares (the container's duration when the stream has none, else 0)."""
    frame_count: int
    """Source frames: the header's count where the container stores one (MP4/MOV), else duration × fps."""
    rotation: int
    """Degrees (0, 90, 180, 270) the stored picture is turned counter-clockwise for display."""
    has_audio: bool

    def frames_at(self, fps: int) -> int:
        """How many frames resampling to ``fps`` gives (exact for a stream that fills its duration)."""
        return round(self.duration * fps)


_STRIDE_ALIGN = 64
"""Pixels FFmpeg rounds a frame's width up to (its widest SIMD alignment, AVX-512) before it checks the
picture against ``max_pixels``: 2160×4096 is checked as 2176×4096."""

_HEADERS_ONLY = {"codec_whitelist": "none"}
"""``av.open`` options under which no decoder may open: streams keep what the headers declare."""


def decoder_options(limits: MediaLimits) -> dict[str, str]:
    """FFmpeg codec options that make decoders refuse pictures over ``limits.max_pixels``.

    FFmpeg checks the padded width (:data:`_STRIDE_ALIGN`), so the bound it is told leaves room for that
    padding on a side of at most ``max_side``; the exact limit is checked from the headers.
    """
    return {"max_pixels": str(limits.max_pixels + (_STRIDE_ALIGN - 1) * limits.max_side)}


def open_media(path: str | Path, limits: MediaLimits) -> InputContainer:
    """``av.open(path)`` with every stream's decoder bounded by ``limits`` (also while FFmpeg probes the
    file), and the same bound set on the streams' decoders for the caller's own decoding.

    Raises FFmpeg's errors as ``av.open`` does.
    """
    container = av.open(str(path), options=decoder_options(limits))
    for stream in container.streams:
        if stream.codec_context is not None:
            stream.codec_context.options = decoder_options(limits)
    return container


def check_video_limits(container: InputContainer, stream: VideoStream, limits: MediaLimits) -> None:
    """Raise :class:`MediaLimitError` if the headers say the video is larger than ``limits``.

    Picture size, duration and frame count as the container and stream headers declare them; nothing
    is decoded. What a header does not say is counted while decoding instead (:class:`VideoReader`).
    """
    check_picture_size(stream.width, stream.height, limits)
    duration = declared_duration(stream)
    if duration is None and container.duration:
        duration = container.duration / av.time_base
    check_video_length(duration or 0.0, limits)
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    check_frame_count(stream.frames or round((duration or 0.0) * fps), limits)


def check_picture_size(width: int, height: int, limits: MediaLimits) -> None:
    if max(width, height) > limits.max_side:
        raise MediaLimitError(
            f"the video is {width}×{height} pixels; a side may have at most {limits.max_side} (max_side)"
        )
    if width * height > limits.max_pixels:
        raise MediaLimitError(
            f"the video is {width}×{height} = {width * height:,} pixels a frame; the limit is "
            f"{limits.max_pixels:,} (max_pixels)"
        )


def check_video_length(seconds: float, limits: MediaLimits) -> None:
    if seconds > limits.max_video_s:
        raise MediaLimitError(f"the video lasts {seconds:,.1f} s; the limit is {limits.max_video_s:g} s (max_video_s)")


def check_frame_count(frames: int, limits: MediaLimits) -> None:
    if frames > limits.max_frames:
        raise MediaLimitError(f"the video has {frames:,} frames; the limit is {limits.max_frames:,} (max_frames)")


def check_audio_limits(container: InputContainer, stream: AudioStream, limits: MediaLimits) -> float:
    """Raise :class:`MediaLimitError` if the headers say the audio lasts longer than ``limits`` allow; else
    the seconds they say (0 when they do not)."""
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = container.duration / av.time_base if container.duration else 0.0
    check_audio_length(seconds, limits)
    return seconds


def check_audio_length(seconds: float, limits: MediaLimits) -> None:
    if seconds > limits.max_audio_s:
        raise MediaLimitError(f"the audio lasts {seconds:,.1f} s; the limit is {limits.max_audio_s:g} s (max_audio_s)")


def check_file(path: Path, what: str, error: type[Exception]) -> None:
    """Raise ``error`` for a missing or 0-byte ``what`` (``"video"``, ``"audio"``) file, in the same words for both."""
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise error(f"{path} is empty")


def open_video(path: str | Path, limits: MediaLimits) -> tuple[InputContainer, VideoStream]:
    """Open ``path`` and return it with its video stream, or raise :class:`MediaError` saying why not.

    The caller owns (and must close) the container. The video stream is the highest-resolution one
    FFmpeg can decode, which is how the ffmpeg CLI picks; cover images of audio files do not count.
    A video over ``limits`` raises :class:`MediaLimitError` before any of its frames is decoded.
    """
    path = Path(path)
    check_file(path, "video", MediaError)
    _check_declared_limits(path, limits)
    try:
        container = open_media(path, limits)
    except av.InvalidDataError:
        if _looks_like_mp4(path):
            raise MediaError(
                f"{path} is an MP4/MOV file without its index (moov atom): the file is truncated or was "
                "never finished (e.g. the recording or upload stopped early)"
            ) from None
        raise MediaError(f"{path} is not a video file FFmpeg can read (unknown format, or corrupt)") from None
    except av.FFmpegError as exc:
        raise MediaError(f"cannot open {path}: {exc}") from None
    try:
        stream = _video_stream(container, path)
        check_video_limits(container, stream, limits)
        _check_complete(stream, path)
    except BaseException:
        container.close()
        raise
    return container, stream


def _check_declared_limits(path: Path, limits: MediaLimits) -> None:
    """:func:`check_video_limits` on what the headers declare, with no decoder opened.

    Where FFmpeg must decode a frame to learn a stream's parameters (VP9 in WebM, MJPEG in AVI), a
    picture over ``max_pixels`` makes the decoder fail and the stream forget its declared size, so
    after :func:`open_media` the limit could no longer be named. A file this open cannot read is left
    to :func:`open_media` to describe.
    """
    try:
        container = av.open(str(path), options=_HEADERS_ONLY)
    except av.FFmpegError:
        return
    with container:
        try:
            stream = _video_stream(container, path)
        except MediaError:
            return
        if stream.width and stream.height:
            check_video_limits(container, stream, limits)


def declared_duration(stream: VideoStream) -> float | None:
    """Seconds the header says the video stream lasts, or None where it does not say.

    MP4/MOV store a per-stream duration; Matroska/WebM written by FFmpeg or mkvmerge carry a
    ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``) per track instead. Live-written WebM has neither.
    """
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")
    if tag is None:
        return None
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def video_info(path: Path, container: InputContainer, stream: VideoStream, rotation: int) -> VideoInfo:
    """Collect :class:`VideoInfo` for an opened stream whose display rotation is known."""
    fps = stream.average_rate or stream.guessed_rate or Fraction(0)
    duration = declared_duration(stream)
    if duration is None:
        duration = container.duration / av.time_base if container.duration else 0.0
    width, height = (stream.height, stream.width) if rotation % 180 else (stream.width, stream.height)
    return VideoInfo(
        path=path,
        container=container.format.name,
        codec=stream.codec_context.name,
        width=width,
        height=height,
        fps=float(fps),
        duration=duration,
        frame_count=stream.frames or round(duration * float(fps)),
        rotation=rotation,
        has_audio=bool(container.streams.audio),
    )


def _looks_like_mp4(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(8)[4:8] == _MP4_SIGNATURE


def _video_stream(container: InputContainer, path: Path) -> VideoStream:
    covers = {s.index for s in container.streams.video if s.disposition & Disposition.attached_pic}
    videos = [s for s in container.streams.video if s.index not in covers]
    if not videos:
        contents = ", ".join(sorted({s.type for s in container.streams if s.index not in covers})) or "no streams"
        if covers:
            contents += " and a cover image"
        raise MediaError(f"{path} has no video stream (it holds {contents}); a video file is needed here")
    decodable = [s for s in videos if s.codec_context is not None]
    if not decodable:
        raise MediaError(
            f"{path}: its video codec is not supported (this FFmpeg build has no decoder for it); "
            "convert the video to H.264, HEVC or VP9 first, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`"
        )
    return max(decodable, key=lambda s: s.width * s.height)


def _check_complete(stream: VideoStream, path: Path) -> None:
    """Raise if the container's sample index points past the end of the file (MP4/MOV cut short)."""
    size = path.stat().st_size
    end = max((entry.pos + max(entry.size, 0) for entry in stream.index_entries), default=0)
    if end > size:
        raise MediaError(
            f"{path} is truncated: its index points to {end:,} bytes of data but the file has {size:,} "
            f"({100 * size / end:.0f}%); the recording or upload stopped early"
        )
