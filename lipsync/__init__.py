"""LatentSync lip-sync inference as a plain package (no serving code).

``load_unet`` is imported on first use, so that light users of the package (media I/O, weight
downloads, configs) do not pay for importing torch and diffusers.
"""

from typing import Any

__all__ = ["load_unet"]


def __getattr__(name: str) -> Any:
    if name == "load_unet":
        from lipsync.models.loading import load_unet

        return load_unet
    raise AttributeError(f"module 'lipsync' has no attribute {name!r}")
