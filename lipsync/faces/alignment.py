"""3-point similarity alignment of a face to LatentSync's template, with official's EMA smoothing.

Official (``AlignRestore`` in the LatentSync repo) does, per frame:

1. round the three alignment points to whole pixels (NumPy rounding, halves to even);
2. Procrustes: centre both point sets on their means and divide each by its standard deviation, taken
   over all six coordinates with Bessel's correction (n − 1 = 5); the rotation comes from the SVD of
   ``points_normᵀ · template_norm``, with the last singular vector flipped when the result would be a
   reflection; scale = std(template) / std(points);
3. smoothing: ``bias = template_norm[nose] − points_norm[nose]`` — a difference of *normalised*
   coordinates, so a fraction of a pixel — EMA'd as 0.2·previous + 0.8·current and added to the
   translation column, in crop pixels. The EMA state lives as long as the aligner (one video);
4. warp the frame into the crop (bilinear, grey 127 outside the frame), quantise by truncation (the
   float warp result is cast to uint8), then resize the crop to R×R with Lanczos-4.

We warp with OpenCV where official uses kornia: both sample pixel centres at integer coordinates, so
the results agree up to official's fp16 arithmetic on the GPU (whose matrix alone is off by ~0.05 px
at 1080p). We compute the transform in float64, official in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lipsync.faces.settings import AlignmentSettings, FaceSettings

_WARP_MARGIN = 2
"""Frame pixels kept around the crop's footprint when warping (see ``FaceAligner._footprint``)."""


@dataclass(frozen=True)
class AlignedFace:
    """A face warped into model space and the transform that put it there."""

    image: np.ndarray
    """(R, R, 3) uint8 RGB."""
    affine: np.ndarray
    """(2, 3) float64 mapping full-frame pixel coordinates to crop pixel coordinates (crop, not R×R)."""


def crop_size(resolution: int, settings: AlignmentSettings) -> tuple[int, int]:
    """(width, height) of the warp target for face resolution ``resolution``: 210×280 at 256, 420×560 at 512.

    The crop scales with the resolution; only resolutions for which it comes out in whole pixels are
    accepted (multiples of 128 with the official base 210×280 at 256).
    """
    base = settings.base_resolution
    size = tuple(side * resolution / base for side in settings.crop_size)
    if resolution <= 0 or any(side != int(side) for side in size):
        raise ValueError(
            f"face resolution {resolution} gives a crop of {size[0]}×{size[1]} px; "
            f"use a resolution that scales {settings.crop_size[0]}×{settings.crop_size[1]} @ {base} to whole pixels"
        )
    return int(size[0]), int(size[1])


def template_points(resolution: int, settings: AlignmentSettings) -> np.ndarray:
    """(3, 2) template in crop pixels: the base template × template_scale · R / base_resolution."""
    ratio = settings.template_scale * resolution / settings.base_resolution
    return np.asarray(settings.template, dtype=np.float64) * ratio


def similarity_transform(points: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Procrustes) taking ``points`` to ``template``, both (3, 2).

    Returns the (2, 3) affine and the unsmoothed nose bias (template_norm[2] − points_norm[2]).
    """
    points = np.asarray(points, dtype=np.float64)
    template = np.asarray(template, dtype=np.float64)
    points_mean, template_mean = points.mean(axis=0), template.mean(axis=0)
    points_std = np.std(points - points_mean, ddof=1)
    template_std = np.std(template - template_mean, ddof=1)
    points_norm = (points - points_mean) / points_std
    template_norm = (template - template_mean) / template_std

    u, _, vt = np.linalg.svd(points_norm.T @ template_norm)
    v = vt.T
    rotation = v @ u.T
    if np.linalg.det(rotation) < 0:
        v[:, -1] = -v[:, -1]
        rotation = v @ u.T
    scaled = template_std / points_std * rotation
    translation = template_mean - scaled @ points_mean
    affine = np.concatenate([scaled, translation[:, None]], axis=1)
    return affine, template_norm[2] - points_norm[2]


class FaceAligner:
    """Aligns the faces of one video, frame by frame; :meth:`reset` before the next video.

    The EMA of the nose bias carries over from frame to frame, so frames must come in playback order.
    """

    def __init__(self, resolution: int, settings: AlignmentSettings | None = None) -> None:
        self.settings = settings or FaceSettings.load().alignment
        self.resolution = resolution
        self.crop_size = crop_size(resolution, self.settings)
        self.template = template_points(resolution, self.settings)
        self._bias: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the smoothing state (start of a new video)."""
        self._bias = None

    def transform(self, points: np.ndarray) -> np.ndarray:
        """The smoothed (2, 3) frame→crop affine for one frame's three points; advances the EMA."""
        affine, bias = similarity_transform(np.round(points), self.template)
        if self._bias is not None:
            bias = self.settings.ema_previous * self._bias + (1 - self.settings.ema_previous) * bias
        self._bias = bias
        affine[:, 2] += bias
        return affine

    def align(self, frame: np.ndarray, points: np.ndarray) -> AlignedFace:
        """Warp ``frame`` ((H, W, 3) uint8 RGB) so that ``points`` land on the template; advances the EMA."""
        affine = self.transform(points)
        return AlignedFace(self.warp(frame, affine), affine)

    def warp(self, frame: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The (R, R, 3) uint8 face that a frame→crop ``affine`` (from :meth:`transform`) cuts from ``frame``.

        Stateless, so a pipeline can compute all affines in one pass and warp in another. Only the
        frame region the crop samples (its footprint plus a margin) is converted to float and warped:
        the same pixels and border as warping the whole frame, without touching the rest of it.
        """
        x0, y0, x1, y1 = self._footprint(affine, frame.shape)
        shifted = affine.astype(np.float64).copy()
        shifted[:, 2] += shifted[:, :2] @ (x0, y0)
        crop = cv2.warpAffine(
            frame[y0:y1, x0:x1].astype(np.float32),
            shifted,
            self.crop_size,
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(self.settings.border_value,) * 3,
        ).astype(np.uint8)
        return cv2.resize(crop, (self.resolution, self.resolution), interpolation=cv2.INTER_LANCZOS4)

    def _footprint(self, affine: np.ndarray, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the frame pixels bilinear sampling of the crop can reach, clipped to the frame.

        The crop's corners, one pixel beyond on every side, mapped into the frame, plus a margin of
        two pixels for the sampling neighbourhood and the warp's fixed-point coordinates. A crop
        entirely off the frame keeps a 1×1 region (then every sample is the border value).
        """
        width, height = self.crop_size
        corners = np.array([[-1, -1], [width, -1], [-1, height], [width, height]], np.float64)
        to_frame = cv2.invertAffineTransform(affine.astype(np.float64))
        points = corners @ to_frame[:, :2].T + to_frame[:, 2]
        frame_height, frame_width = frame_shape[:2]
        x0 = min(max(0, int(np.floor(points[:, 0].min())) - _WARP_MARGIN), frame_width - 1)
        y0 = min(max(0, int(np.floor(points[:, 1].min())) - _WARP_MARGIN), frame_height - 1)
        x1 = max(min(frame_width, int(np.ceil(points[:, 0].max())) + _WARP_MARGIN + 1), x0 + 1)
        y1 = max(min(frame_height, int(np.ceil(points[:, 1].max())) + _WARP_MARGIN + 1), y0 + 1)
        return x0, y0, x1, y1
