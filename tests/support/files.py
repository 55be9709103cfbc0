"""The fixture files under ``tests/fixtures`` (part of the repository; see its NOTICE)."""

from __future__ import annotations

from pathlib import Path

from lipsync.config import CONFIG_DIR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEMO_VIDEO = FIXTURES / "demo1_video.mp4"
"""The demo clip (1080×1920 HEVC, 25 fps, 10 s, one face); see fixtures/NOTICE."""
DEMO_AUDIO = FIXTURES / "demo1_audio.wav"
"""The demo speech (16 kHz mono, 9.6 s)."""
OFFICIAL_UNET_KEYS = FIXTURES / "latentsync_unet_keys_v15.tsv"
"""Every tensor name and shape of the official LatentSync 1.5 UNet checkpoint."""
REFERENCE_DIR = FIXTURES / "reference"
TINY_UNET_CONFIG = CONFIG_DIR / "unet" / "tiny.yaml"
