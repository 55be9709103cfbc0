"""LatentSync lip-sync inference as a plain package (no serving code)."""

from lipsync.models.loading import load_unet

__all__ = ["load_unet"]
