"""Default face backend: MediaPipe's full-range face detector, then FaceMesh on a crop around the face.

Both models ship inside the ``mediapipe==0.10.21`` wheel (Apache-2.0), so nothing is downloaded at
run time. FaceMesh on its own runs a short-range detector on a 128 px view of the whole frame, which
loses faces narrower than ~200 px in a 1920×1080 frame (and, in static mode, misplaced the whole mesh
on some frames of the demo clip); the full-range detector finds them, and FaceMesh then sees a crop
in which the face fills about half the width.

Every frame is processed on its own (FaceMesh in static mode): official detection is per frame as
well, there is no tracker state to reset between videos, and frames may arrive in any order (the
pipeline aligns looped videos once). The aligner's EMA is the only temporal smoothing, as in official.
"""

from __future__ import annotations

import numpy as np
from mediapipe.framework.formats.detection_pb2 import Detection
from mediapipe.python.solutions.face_detection import FaceDetection
from mediapipe.python.solutions.face_mesh import FaceMesh

from lipsync.faces.detection import FaceLandmarks, alignment_points, check_frame
from lipsync.faces.settings import FaceSettings, MediaPipeSettings


class MediaPipeFaceDetector:
    """:class:`~lipsync.faces.detection.FaceDetector` on MediaPipe; :meth:`close` frees its graphs."""

    def __init__(self, settings: MediaPipeSettings | None = None) -> None:
        self.settings = settings or FaceSettings.load().mediapipe
        self._detector = FaceDetection(
            model_selection=self.settings.model_selection,
            min_detection_confidence=self.settings.min_detection_confidence,
        )
        self._mesh = FaceMesh(
            static_image_mode=True,
            max_num_faces=1,
            refine_landmarks=False,
            min_detection_confidence=self.settings.min_mesh_confidence,
        )

    def detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        check_frame(frame)
        detections = self._detector.process(frame).detections
        if not detections:
            return None
        boxes = [d.location_data.relative_bounding_box for d in detections]
        best = max(range(len(boxes)), key=lambda i: boxes[i].width * boxes[i].height)
        return self._landmarks(frame, detections[best])

    def detect_all(self, frame: np.ndarray) -> list[FaceLandmarks]:
        check_frame(frame)
        detections = self._detector.process(frame).detections or []
        return [face for face in (self._landmarks(frame, d) for d in detections) if face is not None]

    def _landmarks(self, frame: np.ndarray, detection: Detection) -> FaceLandmarks | None:
        """FaceMesh on a square crop around one stage-1 ``detection``."""
        height, width = frame.shape[:2]
        rel, score = detection.location_data.relative_bounding_box, float(detection.score[0])
        x1, y1 = rel.xmin * width, rel.ymin * height
        x2, y2 = x1 + rel.width * width, y1 + rel.height * height

        # Square crop around the box, clipped to the frame (FaceMesh takes any aspect ratio).
        half = self.settings.crop_scale * max(x2 - x1, y2 - y1) / 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = max(0, int(cx - half)), max(0, int(cy - half))
        right, bottom = min(width, int(np.ceil(cx + half))), min(height, int(np.ceil(cy + half)))
        if right - left < 2 or bottom - top < 2:
            return None
        crop = np.ascontiguousarray(frame[top:bottom, left:right])
        meshes = self._mesh.process(crop).multi_face_landmarks
        if not meshes:
            return None
        landmarks = np.array([(p.x, p.y) for p in meshes[0].landmark], dtype=np.float64)
        landmarks = landmarks * (right - left, bottom - top) + (left, top)
        upper, lower = landmarks[list(self.settings.mouth_points)]
        top_point, chin = landmarks[list(self.settings.face_height_points)]
        mouth = float(np.linalg.norm(upper - lower)) / max(float(np.linalg.norm(top_point - chin)), 1e-6)
        return FaceLandmarks(alignment_points(landmarks, self.settings.points), (x1, y1, x2, y2), score, mouth)

    def close(self) -> None:
        self._detector.close()
        self._mesh.close()
