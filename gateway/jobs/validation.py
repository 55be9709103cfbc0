"""Checking uploads by their content (FFmpeg through PyAV), never by name or declared type.

A video must open as a video FFmpeg decodes, with all the data its index points at and a first frame
(:class:`lipsync.media.VideoReader`); an audio must have an audio stream with a decodable first
frame (an audio file or a video with sound). Both must be within the media limits of
``configs/media.yaml``, read from their headers before anything is decoded (the same check the model
makes when it opens them). Messages name the field, never a server path.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import av

from lipsync.errors import BadInput
from lipsync.media import MediaError, MediaSettings, VideoInfo, VideoReader
from lipsync.media.probe import check_audio_limits, check_file, open_media

_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w-]+=[\w.-]+)*;base64,", re.ASCII)
_WHITESPACE = re.compile(r"\s+")


class InvalidInput(BadInput):
    """An input the client must fix; the message is safe to return."""


def decode_base64(value: str, field: str) -> bytes:
    """Strict base64 (line breaks and a ``data:…;base64,`` prefix allowed); empty or malformed → InvalidInput."""
    match = _DATA_URL.match(value)
    text = _WHITESPACE.sub("", value[match.end() :] if match else value)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{field} is empty")
    return data


def check_video(path: Path, field: str, settings: MediaSettings | None = None) -> VideoInfo:
    """The video's facts, if it is one the model can read."""
    try:
        with VideoReader(path, settings=settings) as reader:
            return reader.info
    except MediaError as exc:
        raise InvalidInput(f"{field}: {_without_path(str(exc), path)}") from None


def check_audio(path: Path, field: str, settings: MediaSettings | None = None) -> float:
    """The seconds of audio the headers declare (0 when they do not), once a first audio frame decoded."""
    limits = (settings or MediaSettings.load()).limits
    try:
        check_file(path, "audio", MediaError)
        with open_media(path, limits) as container:
            stream = container.streams.best("audio")
            if not isinstance(stream, av.AudioStream):  # None: there is none
                raise InvalidInput(f"{field} has no audio stream")
            seconds = check_audio_limits(container, stream, limits)
            for _ in container.decode(stream):
                return seconds
    except MediaError as exc:
        raise InvalidInput(f"{field}: {_without_path(str(exc), path)}") from None
    except av.FFmpegError:
        raise InvalidInput(f"{field} is not an audio or video file FFmpeg can decode") from None
    raise InvalidInput(f"{field} has an audio stream but no audio in it")


def _without_path(message: str, path: Path) -> str:
    return message.replace(str(path), "the file").replace(str(path.parent), "")
