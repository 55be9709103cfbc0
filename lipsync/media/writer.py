"""Writing the result: H.264 video and AAC audio in an MP4, frame by frame, atomically.

Official inference writes the frames with libx264 crf 13, the audio to a WAV, and then re-encodes the
video once more with crf 18 while muxing AAC. We encode once, with the settings of that final step
(``configs/media.yaml``), and interleave the audio with the video as the frames arrive, so the muxer
never has to buffer one stream while waiting for the other and memory stays flat.

Decisions:

- Audio is cut to the video: after ``n`` frames the file holds ``n / fps`` seconds of audio at most,
  never padded (official cuts the samples to ``frames / 25 · 16000`` the same way). A caller writing
  as many frames as the audio lasts therefore gets a file whose duration equals the audio's, ±1 frame.
- The audio is encoded at its own rate and channel count (16 kHz mono for LatentSync's waveform), as
  official's final ffmpeg call does; AAC-LC at 16 kHz mono plays everywhere, and upsampling it would
  only spend bits on silence above 8 kHz.
- Odd frame sizes: 4:2:0 chroma needs even dimensions, so the last column and/or row is cropped
  (rather than padded), keeping every output pixel a real input pixel. Official fails on such inputs
  already at its ``ffmpeg -r 25 -crf 18`` step (libx264: "width not divisible by 2").
- Colours: RGB is converted with the BT.709 matrix, limited range, and the stream is tagged so.
  Players assume BT.709 for untagged HD video, so untagged BT.601 output (official's) shifts colours.
- The file is written under a temporary name in the destination folder and renamed into place only
  when complete; an error or an exception in the ``with`` block deletes it, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import weakref
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from av.audio.frame import AudioFrame
from av.video.frame import VideoFrame
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from lipsync.media.errors import MediaError
from lipsync.media.settings import AUDIO_SAMPLE_RATE, MediaSettings

_CONTAINER_FORMAT = "mp4"
_AVCOL_SPC_BT709 = 1
"""FFmpeg's ``AVColorSpace`` value for the BT.709 matrix (PyAV names the swscale matrices, not these)."""


class VideoWriter:
    """Encodes RGB frames (``(height, width, 3)`` uint8) one at a time into an MP4 at ``path``.

    ``audio`` is a mono float32 waveform in [-1, 1) at ``sample_rate`` (what :func:`lipsync.audio.load_audio`
    returns); it is muxed alongside the frames and cut to their duration. Use as a context manager: leaving
    the block normally finishes the file, leaving it with an exception discards it.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: int | None = None,
        audio: np.ndarray | None = None,
        sample_rate: int = AUDIO_SAMPLE_RATE,
        settings: MediaSettings | None = None,
    ) -> None:
        settings = settings or MediaSettings.load()
        if width < 2 or height < 2:
            raise ValueError(f"frame size must be at least 2×2, got {width}×{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.fps = fps or settings.fps
        self.frames_written = 0
        self._audio = None if audio is None else _mono(audio)
        self._sample_rate = sample_rate
        self._audio_written = 0
        if not self.path.parent.is_dir():
            raise MediaError(f"output folder does not exist: {self.path.parent}")
        # A unique name created with the umask's permissions (mkstemp would make the result 0600).
        temp = str(self.path.parent / f".{self.path.name}.{uuid.uuid4().hex}.part")
        os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        self._temp = Path(temp)
        # Deletes the temporary file unless close() finished it, also when the writer is dropped unclosed.
        self._unfinished = weakref.finalize(self, self._temp.unlink, missing_ok=True)
        try:
            self._container = av.open(temp, "w", format=_CONTAINER_FORMAT, options={"movflags": settings.movflags})
            self._video = self._add_video_stream(settings)
            self._pix_fmt = self._video.pix_fmt
            self._audio_stream = None if self._audio is None else self._add_audio_stream(settings)
        except BaseException:
            self._discard()
            raise

    @property
    def output_size(self) -> tuple[int, int]:
        """``(width, height)`` of the encoded picture: the frame size cropped to even numbers."""
        return self.width - self.width % 2, self.height - self.height % 2

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame and the audio that plays during it."""
        self.write_picture(self.picture(frame))

    def picture(self, frame: np.ndarray) -> VideoFrame:
        """``frame`` converted to the stream's pixel format, ready for :meth:`write_picture`.

        The colour conversion is the costly half of writing a frame and touches no writer state, so
        several threads may call this at once while one thread writes the pictures in order.
        """
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"expected a ({self.height}, {self.width}, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}"
            )
        width, height = self.output_size
        picture = VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
        return picture.reformat(format=self._pix_fmt, dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)

    def picture_from_yuv420p(self, planes: np.ndarray) -> VideoFrame:
        """A picture from planar BT.709 limited-range YUV 4:2:0 of the output size
        (``(height·3/2, width)`` uint8, e.g. from :func:`lipsync.media.colour.rgb_to_yuv420p`)."""
        width, height = self.output_size
        if planes.shape != (height * 3 // 2, width) or planes.dtype != np.uint8:
            raise ValueError(
                f"expected ({height * 3 // 2}, {width}) uint8 yuv420p planes, got {planes.shape} {planes.dtype}"
            )
        return VideoFrame.from_ndarray(planes, format="yuv420p")

    def write_picture(self, picture: VideoFrame) -> None:
        """Encode the next frame (from :meth:`picture` or :meth:`picture_from_yuv420p`) and the audio that plays during it."""
        picture.pts = self.frames_written
        self._container.mux(self._video.encode(picture))
        self.frames_written += 1
        self._write_audio_until(self.frames_written)

    def close(self) -> None:
        """Flush the encoders, finish the MP4 (moving its index to the front) and move it to ``path``."""
        if not self._unfinished.alive:
            return
        try:
            if self.frames_written == 0:
                raise MediaError(f"no frames were written to {self.path}")
            self._container.mux(self._video.encode(None))
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
            os.replace(self._temp, self.path)
            self._unfinished.detach()
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def _add_video_stream(self, settings: MediaSettings) -> av.VideoStream:
        stream = self._container.add_stream(
            settings.video_codec, rate=self.fps, options={"crf": str(settings.crf), "preset": settings.preset}
        )
        assert isinstance(stream, av.VideoStream)  # a video codec makes a video stream
        stream.width, stream.height = self.output_size
        stream.pix_fmt = settings.pix_fmt
        context = stream.codec_context
        context.thread_count = settings.encoder_threads
        context.colorspace = _AVCOL_SPC_BT709
        context.color_range = ColorRange.MPEG
        context.color_primaries = ColorPrimaries.BT709
        context.color_trc = ColorTrc.BT709
        return stream

    def _add_audio_stream(self, settings: MediaSettings) -> av.AudioStream:
        stream = self._container.add_stream(settings.audio_codec, rate=self._sample_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)  # an audio codec makes an audio stream
        stream.bit_rate = settings.audio_bitrate
        return stream

    def _write_audio_until(self, frames: int) -> None:
        if self._audio_stream is None or self._audio is None:
            return
        end = min(frames * self._sample_rate // self.fps, self._audio.size)
        if end <= self._audio_written:
            return
        chunk = AudioFrame.from_ndarray(self._audio[None, self._audio_written : end], format="fltp", layout="mono")
        chunk.sample_rate = self._sample_rate
        chunk.pts = self._audio_written
        self._container.mux(self._audio_stream.encode(chunk))
        self._audio_written = end

    def _discard(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            with contextlib.suppress(av.FFmpegError):  # the file is thrown away: a failed trailer does not matter
                container.close()
        self._unfinished()


def _mono(audio: np.ndarray) -> np.ndarray:
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be a non-empty mono waveform of shape (samples,), got {audio.shape}")
    return audio
