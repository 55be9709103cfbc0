"""Opt-in face backend, as official LatentSync 1.5-late/1.6 runs it: InsightFace SCRFD + 106 landmarks.

LICENCE: the insightface library is MIT, but its pretrained models (the buffalo_l pack, which holds
``det_10g.onnx`` and ``2d106det.onnx``) are for NON-COMMERCIAL RESEARCH PURPOSES ONLY. This backend is
therefore never the default; choose it only where that licence allows.

Install with ``pip install 'lipsync-serve[insightface]'``; the models come from the LatentSync-1.6 Hub
repo's ``auxiliary/`` folder (``scripts/download_weights.py``). What follows official (docs/latentsync-notes.md):

- the detector runs at ``det_size`` 512×512 with its own score threshold at ``min_score``;
- the filters use the detector's box truncated to integer pixels: too small (w < 50 or h < 80), too
  wide or too narrow (w/h > 1.5 or < 0.2) or too unsure (score < 0.5) boxes are dropped, and the
  largest remaining box wins (the first one, in the detector's score order, among equal sizes);
- landmarks run on the winner only (official runs them on every face, then discards all but one);
- the 106 landmarks are rounded to integers before the brow and nose means are taken;
- frames are handed over as RGB, as official does, although insightface expects BGR: its networks
  see the red and blue channels swapped, and we keep that so detections match official's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from lipsync.faces.detection import FaceLandmarks, alignment_points, check_frame
from lipsync.faces.settings import FaceSettings, InsightFaceSettings


class InsightFaceDetector:
    """:class:`~lipsync.faces.detection.FaceDetector` on InsightFace ONNX models (non-commercial weights)."""

    def __init__(
        self,
        detector_model: str | Path,
        landmark_model: str | Path,
        settings: InsightFaceSettings | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        """``detector_model``: ``det_10g.onnx``; ``landmark_model``: ``2d106det.onnx``.

        ``providers`` (onnxruntime execution providers) defaults to the config's list.
        """
        self.settings = settings or FaceSettings.load().insightface
        insightface = _import_insightface()
        providers = list(providers or self.settings.providers)
        for path in (detector_model, landmark_model):
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"InsightFace model not found: {path} (fetch it with scripts/download_weights.py)"
                )
        self._face_type = insightface.app.common.Face
        self._detector = insightface.model_zoo.get_model(str(detector_model), providers=providers)
        self._landmarker = insightface.model_zoo.get_model(str(landmark_model), providers=providers)
        if getattr(self._detector, "taskname", None) != "detection":
            raise ValueError(f"{detector_model} is not an InsightFace detection model")
        if getattr(self._landmarker, "taskname", None) != "landmark_2d_106":
            raise ValueError(f"{landmark_model} is not an InsightFace 106-point landmark model")
        # ctx_id 0 keeps the providers given above (a negative one would force the CPU).
        self._detector.prepare(0, input_size=self.settings.det_size, det_thresh=self.settings.min_score)
        self._landmarker.prepare(0)

    def detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        check_frame(frame)
        boxes, keypoints = self._detector.detect(frame, max_num=0, metric="default")
        best = select_face(boxes[:, :4], boxes[:, 4], self.settings)
        return None if best is None else self._landmarks(frame, boxes, keypoints, best)

    def detect_all(self, frame: np.ndarray) -> list[FaceLandmarks]:
        """Every face passing official's filters. 106-point landmarks give no mouth opening here, so
        ``active_speaker`` needs the MediaPipe backend."""
        check_frame(frame)
        boxes, keypoints = self._detector.detect(frame, max_num=0, metric="default")
        return [
            self._landmarks(frame, boxes, keypoints, index)
            for index in passing_faces(boxes[:, :4], boxes[:, 4], self.settings)
        ]

    def _landmarks(
        self, frame: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray | None, index: int
    ) -> FaceLandmarks:
        box, score = boxes[index, :4], float(boxes[index, 4])
        face = self._face_type(bbox=box, kps=None if keypoints is None else keypoints[index], det_score=score)
        landmarks = self._landmarker.get(frame, face)
        x1, y1, x2, y2 = (float(v) for v in box)
        return FaceLandmarks(points_from_106(landmarks, self.settings), (x1, y1, x2, y2), score)


def passing_faces(boxes: np.ndarray, scores: np.ndarray, settings: InsightFaceSettings) -> list[int]:
    """Indices of the detector ``boxes`` (N, 4) and ``scores`` (N,) that pass official's filters."""
    kept = []
    for index, (box, score) in enumerate(zip(boxes, scores, strict=True)):
        x1, y1, x2, y2 = np.asarray(box).astype(np.int_).tolist()
        width, height = x2 - x1, y2 - y1
        if width < settings.min_width or height < settings.min_height:
            continue
        if not settings.min_aspect <= width / height <= settings.max_aspect:
            continue
        if score < settings.min_score:
            continue
        kept.append(index)
    return kept


def select_face(boxes: np.ndarray, scores: np.ndarray, settings: InsightFaceSettings) -> int | None:
    """Index of the face official keeps among detector ``boxes`` (N, 4) and ``scores`` (N,), or ``None``:
    the largest passing box (by truncated integer size), the first one among equal sizes."""
    best, best_area = None, 0
    for index in passing_faces(boxes, scores, settings):
        x1, y1, x2, y2 = np.asarray(boxes[index]).astype(np.int_).tolist()
        if (x2 - x1) * (y2 - y1) > best_area:
            best, best_area = index, (x2 - x1) * (y2 - y1)
    return best


def points_from_106(landmarks: np.ndarray, settings: InsightFaceSettings) -> np.ndarray:
    """The three alignment points from 106 landmarks (rounded to integers first, as official does)."""
    landmarks = np.asarray(landmarks)
    if landmarks.shape != (106, 2):
        raise ValueError(f"expected (106, 2) landmarks, got {landmarks.shape}")
    return alignment_points(np.round(landmarks).astype(np.int_), settings.points)


def _import_insightface() -> ModuleType:
    try:
        import insightface.app.common
        import insightface.model_zoo
    except ImportError as exc:
        raise ImportError(
            "the InsightFace face backend needs the optional dependencies: "
            "pip install 'lipsync-serve[insightface]' (insightface, onnxruntime-gpu)"
        ) from exc
    return insightface
