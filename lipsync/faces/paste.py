"""Paste a generated face back into its frame with a feathered edge.

Official (``restore_img`` in the LatentSync repo), per frame:

1. resize the R×R face, still in model range [−1, 1], to the crop size (bicubic with antialiasing, as
   torchvision does it — we call the same torch kernel);
2. warp it back into the frame with the inverse of the alignment affine (bilinear), then map to
   [0, 255] with clamping;
3. warp a ones-image of crop size the same way (zeros outside), erode it by 2×2, take
   w_edge = ⌊√(sum of that mask)⌋ // 20, erode again by a (2·w_edge)² square and blur with a
   (2·w_edge + 1)² Gaussian, σ = 0.3·(w_edge − 1) + 0.8 → the soft mask;
4. ``soft · (eroded2×2 · face) + (1 − soft) · frame``, cast to uint8 by truncation.

We do the same on CPU with OpenCV, restricted to the crop's footprint in the frame plus a margin of
zeros: both erosions leave the frame's own border uneroded and the blur reflects at it, exactly as on
the whole frame, and every pixel outside the footprint is copied from the input unchanged.
Two deliberate differences, both confined to the outermost pixel of the pasted face:

- official's soft mask reaches one pixel past the eroded mask on the right and bottom (the even-sized
  erosion kernels shrink the mask unevenly, the blur spreads it evenly), where it pastes nothing but
  still scales the frame by (1 − soft), which truncation turns into a line one grey level darker around
  the face; we zero the soft mask wherever the eroded mask is zero, so every pixel outside the
  pasted face keeps its exact input value;
- official fills the face warp's outside with 127 in [−1, 1] space (white after clamping), which the
  masks all but zero out; we replicate the crop's edge pixels instead.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lipsync.faces.detection import check_frame
from lipsync.faces.settings import FaceSettings, PasteSettings

_MARGIN = 3
"""Zero pixels kept around the footprint, so that erosion and blur see what the whole frame would show."""


class FacePaster:
    """Pastes model-space faces back into frames for one crop size (see :class:`~lipsync.faces.FaceAligner`)."""

    def __init__(self, crop_size: tuple[int, int], settings: PasteSettings | None = None) -> None:
        """``crop_size``: (width, height) of the alignment crop, e.g. ``FaceAligner.crop_size``."""
        self.settings = settings or FaceSettings.load().paste
        self.crop_size = crop_size

    def paste(self, frame: np.ndarray, face: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """A copy of ``frame`` ((H, W, 3) uint8 RGB) with ``face`` pasted where ``affine`` took it from.

        ``face``: (R, R, 3) float in [−1, 1] (the decoded model output); ``affine``: the (2, 3)
        frame→crop transform the face was aligned with.
        """
        check_frame(frame)
        if face.ndim != 3 or face.shape[2] != 3 or face.shape[0] != face.shape[1]:
            raise ValueError(f"expected an (R, R, 3) face, got {face.shape}")
        window = self._footprint(affine, frame.shape)
        if window is None:
            return frame.copy()
        x0, y0, x1, y1 = window
        # Frame→crop affine for window coordinates: shift the origin to (x0, y0).
        to_crop = affine.astype(np.float64).copy()
        to_crop[:, 2] += to_crop[:, :2] @ (x0, y0)
        size = (x1 - x0, y1 - y0)
        inverse = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

        face_crop = self._resize(face)
        warped = cv2.warpAffine(face_crop, to_crop, size, flags=inverse, borderMode=cv2.BORDER_REPLICATE)
        warped = np.clip(warped / 2 + 0.5, 0, 1) * 255

        ones = np.ones(self.crop_size[::-1], np.float32)
        mask = cv2.warpAffine(ones, to_crop, size, flags=inverse, borderMode=cv2.BORDER_CONSTANT, borderValue=(0,))
        kernel = self.settings.erode_kernel
        mask = cv2.erode(mask, np.ones((kernel, kernel), np.uint8))
        w_edge = int(mask.sum(dtype=np.float64) ** 0.5) // self.settings.edge_divisor
        center = cv2.erode(mask, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
        blur = 2 * w_edge + 1
        soft = cv2.GaussianBlur(center, (blur, blur), 0.3 * ((blur - 1) * 0.5 - 1) + 0.8)
        soft[mask == 0] = 0

        region = frame[y0:y1, x0:x1].astype(np.float32)
        soft, mask = soft[..., None], mask[..., None]
        blended = soft * (mask * warped) + (1 - soft) * region
        out = frame.copy()
        out[y0:y1, x0:x1] = blended.astype(np.uint8)
        return out

    def _resize(self, face: np.ndarray) -> np.ndarray:
        """R×R → crop size, bicubic with antialiasing (torchvision's ``resize`` on tensors), float32 HWC."""
        width, height = self.crop_size
        tensor = torch.from_numpy(np.ascontiguousarray(face, dtype=np.float32)).permute(2, 0, 1)[None]
        resized = F.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return resized[0].permute(1, 2, 0).contiguous().numpy()

    def _footprint(self, affine: np.ndarray, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1): the crop's bounding box in the frame plus the margin, clipped; None if off-frame.

        Bilinear sampling reaches frame pixels that map up to one crop pixel outside the crop, so the
        box is that of the crop grown by one pixel on every side.
        """
        width, height = self.crop_size
        corners = np.array([[-1, -1], [width, -1], [-1, height], [width, height]], np.float64)
        to_frame = cv2.invertAffineTransform(affine.astype(np.float64))
        points = corners @ to_frame[:, :2].T + to_frame[:, 2]
        x0 = max(0, math.floor(points[:, 0].min()) - _MARGIN)
        y0 = max(0, math.floor(points[:, 1].min()) - _MARGIN)
        x1 = min(frame_shape[1], math.ceil(points[:, 0].max()) + _MARGIN + 1)
        y1 = min(frame_shape[0], math.ceil(points[:, 1].max()) + _MARGIN + 1)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1
