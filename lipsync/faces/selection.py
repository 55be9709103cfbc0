"""Which face to sync in a clip with several people: every face per frame → tracks → one choice.

``largest`` is official's rule, applied per frame by the detectors themselves (:meth:`FaceDetector.detect`).
The other two choices detect every face of every frame (:meth:`FaceDetector.detect_all`), link them
into tracks by box overlap frame to frame (:func:`link_tracks`), so one person keeps one track even
when another face is momentarily larger, and then pick one track:

- ``box``: the track under a point ``[x, y]`` or overlapping a box ``[x0, y0, x1, y1]`` given in source
  pixels on the first frame where a face appears;
- ``active_speaker``: per shot, the track whose mouth motion follows the envelope of the video's own
  audio track best (:func:`speaker_scores`).

Frames where the chosen track has no face get no face (they pass through untouched). The choice is
reported as :class:`FaceUsed`: the choice, the chosen face's box on its first frame and a confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from lipsync.contract import FaceChoice, parse_face_box
from lipsync.errors import BadInput
from lipsync.faces.detection import FaceLandmarks
from lipsync.faces.settings import SelectionSettings

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class FaceUsed:
    """Which face a job synced: the choice, the face's box on its first frame, how sure the choice is (0–1)."""

    choice: str
    box: Box
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return {"choice": self.choice, "box": [round(v, 1) for v in self.box], "confidence": round(self.confidence, 3)}


@dataclass
class Track:
    """One person's faces, by frame index."""

    faces: dict[int, FaceLandmarks] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return max(self.faces)

    @property
    def first(self) -> int:
        return min(self.faces)


def iou(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def link_tracks(frames: Sequence[Sequence[FaceLandmarks]], settings: SelectionSettings) -> list[Track]:
    """Faces linked frame to frame: each face joins the track whose last box overlaps it most (IoU of at
    least ``min_iou``, seen within ``max_gap`` frames), best pairs first; the others start tracks."""
    tracks: list[Track] = []
    for index, faces in enumerate(frames):
        open_tracks = [track for track in tracks if index - track.last <= settings.max_gap + 1]
        pairs = sorted(
            (
                (iou(track.faces[track.last].box, face.box), t, f)
                for t, track in enumerate(open_tracks)
                for f, face in enumerate(faces)
            ),
            key=lambda pair: -pair[0],
        )
        taken_tracks: set[int] = set()
        taken_faces: set[int] = set()
        for overlap, t, f in pairs:
            if overlap < settings.min_iou or t in taken_tracks or f in taken_faces:
                continue
            open_tracks[t].faces[index] = faces[f]
            taken_tracks.add(t)
            taken_faces.add(f)
        tracks.extend(Track({index: face}) for f, face in enumerate(faces) if f not in taken_faces)
    return tracks


def thumbnail(frame: np.ndarray, settings: SelectionSettings) -> np.ndarray:
    """A small grey uint8 picture of ``frame`` (RGB) for finding cuts."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (settings.thumbnail_size,) * 2, interpolation=cv2.INTER_AREA)


def shot_starts(thumbnails: Sequence[np.ndarray], settings: SelectionSettings) -> list[int]:
    """The first frame of each shot: 0, then every frame that differs from the one before by more than
    ``cut_threshold`` (mean absolute difference of the thumbnails)."""
    return [0] + [
        index
        for index in range(1, len(thumbnails))
        if float(cv2.absdiff(thumbnails[index], thumbnails[index - 1]).mean()) > settings.cut_threshold
    ]


def speech_envelope(waveform: np.ndarray, sample_rate: int, fps: int, frames: int) -> np.ndarray:
    """RMS of ``waveform`` over each frame's span (zero past its end), one value per frame."""
    per_frame = sample_rate / fps
    envelope = np.zeros(frames)
    for index in range(frames):
        chunk = waveform[round(index * per_frame) : round((index + 1) * per_frame)]
        envelope[index] = math.sqrt(float(np.mean(np.square(chunk, dtype=np.float64)))) if chunk.size else 0.0
    return envelope


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or values.size < 2:
        return values
    padded = np.pad(values, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def speaker_score(track: Track, start: int, end: int, envelope: np.ndarray, settings: SelectionSettings) -> float:
    """How well ``track``'s mouth motion follows ``envelope`` over frames ``start``–``end`` (exclusive).

    The mouth opening is interpolated over the frames the track misses; its motion (absolute change
    per frame) and the envelope are averaged over ``smooth_frames``; the score is their best Pearson
    correlation over shifts of up to ``max_lag_frames``, and 0 when the mean motion is under
    ``min_mouth_motion`` (a face that does not move its mouth is not speaking).
    """
    seen = sorted(index for index in track.faces if start <= index < end and track.faces[index].mouth is not None)
    if len(seen) < 3:
        return 0.0
    frames = np.arange(seen[0], seen[-1] + 1)
    opening = np.interp(frames, seen, [float(track.faces[index].mouth or 0.0) for index in seen])  # all measured
    motion = _smooth(np.abs(np.diff(opening, prepend=opening[0])), settings.smooth_frames)
    if float(motion.mean()) < settings.min_mouth_motion:
        return 0.0
    speech = _smooth(envelope[frames], settings.smooth_frames)
    best = 0.0
    for lag in range(-settings.max_lag_frames, settings.max_lag_frames + 1):
        a = motion[max(0, lag) : len(motion) + min(0, lag)]
        b = speech[max(0, -lag) : len(speech) + min(0, -lag)]
        best = max(best, _correlation(a, b))
    return best


@dataclass(frozen=True)
class Selection:
    """The chosen face per frame (``None``: the chosen person is not visible) and what was chosen."""

    faces: list[FaceLandmarks | None]
    used: FaceUsed


def select_faces(
    choice: str,
    face_box: str | None,
    frames: Sequence[Sequence[FaceLandmarks]],
    thumbnails: Sequence[np.ndarray],
    envelope: np.ndarray | None,
    settings: SelectionSettings,
) -> Selection:
    """One face per frame for ``box`` or ``active_speaker`` (``envelope``: one audio RMS value per frame)."""
    tracks = link_tracks(frames, settings)
    if not tracks:
        return Selection([None] * len(frames), FaceUsed(choice, (0.0, 0.0, 0.0, 0.0), 0.0))
    if choice == FaceChoice.BOX.value:
        assert face_box is not None
        track, confidence = _by_box(tracks, parse_face_box(face_box))
        chosen = [track.faces.get(index) for index in range(len(frames))]
        return Selection(chosen, FaceUsed(choice, track.faces[track.first].box, confidence))
    if choice != FaceChoice.ACTIVE_SPEAKER.value or envelope is None:
        raise ValueError(f"select_faces takes box or active_speaker with an envelope, got {choice!r}")
    return _by_speaker(tracks, len(frames), shot_starts(thumbnails, settings), envelope, settings)


def _by_box(tracks: list[Track], values: tuple[float, ...]) -> tuple[Track, float]:
    """The track under the point, or overlapping the box most, on the first frame with a face.

    Confidence: for a point, 1 over the number of faces whose box holds it; for a box, its IoU with
    the chosen face's box.
    """
    first = min(track.first for track in tracks)
    present = [track for track in tracks if first in track.faces]
    boxes = ", ".join("[" + ", ".join(f"{v:.0f}" for v in track.faces[first].box) + "]" for track in present)
    if len(values) == 2:
        x, y = values
        holding = [t for t in present if _contains(t.faces[first].box, x, y)]
        if not holding:
            raise BadInput(
                f"face_box point {x:g},{y:g} is on no face of frame {first}, the first with a face "
                f"(faces there: {boxes})"
            )
        track = min(holding, key=lambda t: math.dist(_centre(t.faces[first].box), (x, y)))
        return track, 1.0 / len(holding)
    box: Box = (values[0], values[1], values[2], values[3])
    track = max(present, key=lambda t: iou(t.faces[first].box, box))
    overlap = iou(track.faces[first].box, box)
    if overlap == 0:
        raise BadInput(
            f"face_box {', '.join(f'{v:g}' for v in box)} overlaps no face of frame {first}, "
            f"the first with a face (faces there: {boxes})"
        )
    return track, overlap


def _by_speaker(
    tracks: list[Track], count: int, starts: list[int], envelope: np.ndarray, settings: SelectionSettings
) -> Selection:
    """Per shot, the candidate track with the best :func:`speaker_score`.

    Candidates are the tracks seen in at least ``min_track_frames`` frames of the shot (all tracks seen
    there when none is). Confidence per shot: the best score's margin over the runner-up (1 with one
    candidate; 0 when no candidate moves its mouth with the speech, and the largest one is kept);
    the job's confidence is their mean weighted by the shots' lengths.
    """
    chosen: list[FaceLandmarks | None] = [None] * count
    used: FaceUsed | None = None
    weighted = 0.0
    for start, end in zip(starts, [*starts[1:], count], strict=True):
        seen = {id(t): sum(start <= index < end for index in t.faces) for t in tracks}
        candidates = [t for t in tracks if seen[id(t)] >= settings.min_track_frames] or [
            t for t in tracks if seen[id(t)]
        ]
        if not candidates:
            continue
        scores = sorted(
            ((speaker_score(t, start, end, envelope, settings), t) for t in candidates), key=lambda pair: -pair[0]
        )
        best_score, track = scores[0]
        if len(scores) == 1:
            confidence = 1.0
        elif best_score <= 0:
            track = max(candidates, key=lambda t: seen[id(t)] * _mean_area(t, start, end))
            confidence = 0.0
        else:
            confidence = min(1.0, best_score - max(0.0, scores[1][0]))
        for index in range(start, end):
            chosen[index] = track.faces.get(index)
        weighted += confidence * (end - start)
        if used is None:
            first = min(index for index in track.faces if start <= index < end)
            used = FaceUsed(FaceChoice.ACTIVE_SPEAKER.value, track.faces[first].box, 0.0)
    assert used is not None
    return Selection(chosen, FaceUsed(used.choice, used.box, weighted / max(1, count)))


def _mean_area(track: Track, start: int, end: int) -> float:
    areas = [face.area for index, face in track.faces.items() if start <= index < end]
    return float(np.mean(areas)) if areas else 0.0


def _contains(box: Box, x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
