"""The audio half of the pipeline: decoding, Whisper encoder features and per-frame audio windows."""

from lipsync.audio.decode import AudioError, load_audio
from lipsync.audio.encoder import encoder_features, load_whisper_encoder
from lipsync.audio.extractor import AudioFeatureExtractor
from lipsync.audio.settings import AudioSettings
from lipsync.audio.windows import frame_windows, window_count

__all__ = [
    "AudioError",
    "AudioFeatureExtractor",
    "AudioSettings",
    "encoder_features",
    "frame_windows",
    "load_audio",
    "load_whisper_encoder",
    "window_count",
]
