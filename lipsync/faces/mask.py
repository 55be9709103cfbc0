"""The fixed mouth mask in aligned-face space: 1 = keep the input pixel, 0 = the model generates it.

Official loads a 256×256 black-and-white image and resizes it to R×R with Lanczos-4 (soft edges at
512). We draw the same shape from the polygon in ``configs/faces.yaml`` at the image's size and then
resize it the same way; a user-supplied image (``mask_image_path``) takes the polygon's place.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lipsync.faces.settings import FaceSettings, MaskSettings

_SUBPIXEL_BITS = 8
"""Fixed-point fraction bits for ``cv2.fillPoly``, so vertices keep their sub-pixel positions."""


def render_mask_image(settings: MaskSettings) -> np.ndarray:
    """The polygon drawn as an 8-bit image of side ``render_size``: 0 inside (generate), 255 outside."""
    size = settings.render_size
    vertices = (np.asarray(settings.polygon, dtype=np.float64) * size - 0.5) * (1 << _SUBPIXEL_BITS)
    image = np.full((size, size), 255, np.uint8)
    cv2.fillPoly(image, [np.round(vertices).astype(np.int32)], (0,), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return image


def read_mask_image(path: str | Path) -> np.ndarray:
    """A mask image from disk as 8-bit greyscale (black = generate, white = keep)."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"cannot read mask image {path}")
    return image


def load_mask(resolution: int, settings: FaceSettings | None = None) -> np.ndarray:
    """The (R, R) float32 mask in [0, 1] for face resolution ``resolution``.

    From ``settings.mask_image_path`` when set, otherwise from the polygon; either image is resized
    to R×R with Lanczos-4 in 8 bits and divided by 255, as official does with its file.
    """
    settings = settings or FaceSettings.load()
    if settings.mask_image_path is not None:
        image = read_mask_image(settings.mask_image_path)
    else:
        image = render_mask_image(settings.mask)
    resized = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    return resized.astype(np.float32) / 255
