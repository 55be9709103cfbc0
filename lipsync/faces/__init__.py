"""Faces: detection backends, 3-point alignment, the fixed mouth mask and feathered paste-back.

The MediaPipe backend is the default; the InsightFace backend (official's, non-commercial weights) is
imported from :mod:`lipsync.faces.insightface_backend` only by those who opt in.
"""

from lipsync.faces.alignment import (
    AlignedFace,
    FaceAligner,
    crop_size,
    similarity_transform,
    template_points,
)
from lipsync.faces.detection import DetectorPool, FaceDetector, FaceLandmarks
from lipsync.faces.mask import load_mask, render_mask_image
from lipsync.faces.mediapipe_backend import MediaPipeFaceDetector
from lipsync.faces.paste import FacePaster
from lipsync.faces.settings import FACES_CONFIG, FaceSettings

__all__ = [
    "FACES_CONFIG",
    "AlignedFace",
    "DetectorPool",
    "FaceAligner",
    "FaceDetector",
    "FaceLandmarks",
    "FacePaster",
    "FaceSettings",
    "MediaPipeFaceDetector",
    "crop_size",
    "load_mask",
    "render_mask_image",
    "similarity_transform",
    "template_points",
]
