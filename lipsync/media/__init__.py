"""Video in, video out: streaming decode at a fixed frame rate, and H.264 + AAC MP4 writing."""

from lipsync.media.errors import MediaError
from lipsync.media.probe import VideoInfo
from lipsync.media.settings import MediaSettings
from lipsync.media.video import VideoReader
from lipsync.media.writer import VideoWriter

__all__ = ["MediaError", "MediaSettings", "VideoInfo", "VideoReader", "VideoWriter"]
