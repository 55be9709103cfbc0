"""Shared paths and tiny-weight fixtures. Tiny checkpoints are written by the real writers and
loaded through the real loaders, exactly like downloaded weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync.config import CONFIG_DIR
from lipsync.tiny import write_tiny_weights
from lipsync.weights import WeightPaths

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REFERENCE_DIR = Path(__file__).resolve().parent / "fixtures" / "reference"
TINY_UNET_CONFIG = CONFIG_DIR / "unet" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> WeightPaths:
    """The full tiny weight set (UNet .pt, Whisper .pt, VAE folder), seed 0, official formats."""
    return write_tiny_weights(tmp_path_factory.mktemp("tiny-weights"), seed=0)
