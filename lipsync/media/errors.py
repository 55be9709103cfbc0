"""The one exception the media layer raises for bad input files."""

from lipsync.errors import BadInput


class MediaError(BadInput):
    """A video cannot be used: missing, not a media file, truncated, no video, or no decoder for it.

    Raised with a message meant for the person who supplied the file, so callers can show it as is.
    """


class MediaLimitError(MediaError):
    """An input is larger than a limit of ``configs/media.yaml`` (``limits``); the message names the limit."""
