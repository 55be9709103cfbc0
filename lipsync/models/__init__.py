"""LatentSync's UNet and its checkpoint loader."""

from lipsync.models.loading import build_unet, load_unet
from lipsync.models.unet import UNet3DConditionModel

__all__ = ["UNet3DConditionModel", "build_unet", "load_unet"]
