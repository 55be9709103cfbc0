"""Face choice in two-person clips (lipsync/faces/selection.py): tracks, a box or point, the active speaker.

The clips are side-by-side composites of two parts of the real demo clip (one mirrored): one half
speaks with its own sound as the composite's audio, the other is a still frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.clips import COMPOSITE_HALF, FPS, SAMPLE_RATE, two_person_composite

from lipsync.audio import load_audio
from lipsync.contract import check_against_video
from lipsync.errors import BadInput
from lipsync.faces import FaceLandmarks, FaceSettings, MediaPipeFaceDetector
from lipsync.faces.selection import (
    link_tracks,
    select_faces,
    shot_starts,
    speech_envelope,
    thumbnail,
)
from lipsync.media import VideoReader

SETTINGS = FaceSettings.load().selection
HALF_WIDTH, HEIGHT = COMPOSITE_HALF


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list, list, np.ndarray]]:
    """Per speaking side: every face of every frame, the thumbnails and the audio envelope."""
    folder = tmp_path_factory.mktemp("composites")
    detector = MediaPipeFaceDetector()
    found = {}
    try:
        for side in ("left", "right"):
            path = two_person_composite(folder / f"{side}.mp4", side)
            with VideoReader(path) as reader:
                frames = list(reader)
            faces = [detector.detect_all(frame) for frame in frames]
            thumbnails = [thumbnail(frame, SETTINGS) for frame in frames]
            envelope = speech_envelope(load_audio(path, SAMPLE_RATE), SAMPLE_RATE, FPS, len(frames))
            found[side] = (faces, thumbnails, envelope)
    finally:
        detector.close()
    return found


def _side(face: FaceLandmarks) -> str:
    return "left" if (face.box[0] + face.box[2]) / 2 < HALF_WIDTH else "right"


def test_both_people_are_found_and_tracked(composites) -> None:
    faces, _, _ = composites["left"]
    assert all(len(frame) == 2 for frame in faces)
    tracks = link_tracks(faces, SETTINGS)
    assert len(tracks) == 2
    for track in tracks:
        assert len(track.faces) == len(faces)
        assert len({_side(face) for face in track.faces.values()}) == 1


@pytest.mark.parametrize("speaking", ["left", "right"])
def test_active_speaker_is_the_speaking_half(composites, speaking: str) -> None:
    faces, thumbnails, envelope = composites[speaking]
    selection = select_faces("active_speaker", None, faces, thumbnails, envelope, SETTINGS)
    assert all(face is not None and _side(face) == speaking for face in selection.faces)
    assert selection.used.choice == "active_speaker"
    assert 0 < selection.used.confidence <= 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_point_or_a_box_chooses_that_person(composites, side: str) -> None:
    faces, thumbnails, _ = composites["left"]
    target = next(face for face in faces[0] if _side(face) == side)
    x1, y1, x2, y2 = target.box
    for face_box in (f"{(x1 + x2) / 2:.0f},{(y1 + y2) / 2:.0f}", f"{x1 - 5:.0f},{y1 - 5:.0f},{x2 + 5:.0f},{y2 + 5:.0f}"):
        selection = select_faces("box", face_box, faces, thumbnails, None, SETTINGS)
        assert all(face is not None and _side(face) == side for face in selection.faces)
        assert selection.used.box == target.box
        assert 0.5 <= selection.used.confidence <= 1


def test_a_point_on_no_face_is_refused_with_the_faces_there(composites) -> None:
    faces, thumbnails, _ = composites["left"]
    with pytest.raises(BadInput, match=r"on no face of frame 0.*faces there"):
        select_faces("box", "2,2", faces, thumbnails, None, SETTINGS)


def _face(box: tuple[float, float, float, float]) -> FaceLandmarks:
    return FaceLandmarks(np.zeros((3, 2)), box, 1.0)


def test_the_tracked_person_stays_chosen_while_the_other_is_larger_or_hidden() -> None:
    small, large, huge = (10.0, 10.0, 50.0, 60.0), (100.0, 10.0, 150.0, 70.0), (90.0, 0.0, 200.0, 120.0)
    frames = [[_face(small), _face(large)] for _ in range(10)]
    frames += [[_face(small), _face(huge)] for _ in range(3)]  # the other person leans in
    frames += [[_face(large)] for _ in range(2)]  # the chosen one is hidden
    frames += [[_face(small), _face(large)] for _ in range(5)]
    thumbnails = [np.zeros((4, 4), np.uint8)] * len(frames)
    selection = select_faces("box", "30,30", frames, thumbnails, None, SETTINGS)
    assert [None if face is None else face.box for face in selection.faces] == (
        [small] * 13 + [None] * 2 + [small] * 5
    )


@pytest.mark.parametrize(
    ("face", "face_box", "has_audio", "message"),
    [
        ("box", "500,10", True, "outside the 400×300 frame"),
        ("box", "-1,10,50,50", True, "outside the 400×300 frame"),
        ("box", "10,10,50,301", True, "outside the 400×300 frame"),
        ("active_speaker", None, False, "needs the video's own audio track"),
    ],
)
def test_what_the_video_cannot_offer_is_refused(face: str, face_box: str | None, has_audio: bool, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        check_against_video(face, face_box, 400, 300, has_audio)
    check_against_video(face, "10,10" if face_box else None, 400, 300, True)


def test_composites_are_what_they_claim(tmp_path: Path) -> None:
    path = two_person_composite(tmp_path / "right.mp4", "right")
    with VideoReader(path) as reader:
        assert (reader.info.width, reader.info.height) == (2 * HALF_WIDTH, HEIGHT)
        assert reader.info.has_audio
        frames = list(reader)
    left_motion = np.abs(np.diff(np.stack([f[:, :HALF_WIDTH] for f in frames]).astype(np.int16), axis=0)).mean()
    right_motion = np.abs(np.diff(np.stack([f[:, HALF_WIDTH:] for f in frames]).astype(np.int16), axis=0)).mean()
    assert left_motion < 1 < right_motion


def test_shots_start_at_cuts_and_the_speaker_is_chosen_per_shot() -> None:
    dark, light = np.zeros((32, 32), np.uint8), np.full((32, 32), 200, np.uint8)
    assert shot_starts([dark] * 5 + [light] * 5 + [dark] * 3, SETTINGS) == [0, 5, 10]
    left, right = (10.0, 10.0, 50.0, 60.0), (100.0, 10.0, 150.0, 70.0)
    envelope = np.tile([0.0, 0.0, 0.5, 0.5], 10)  # speech on and off every other frame pair
    moving = [0.0, 0.1, 0.1, 0.0]  # a mouth opening while the speech is on (its motion follows the envelope)

    def mouth(frame: int, speaking: bool) -> float:
        return moving[frame % 4] if speaking else 0.05

    frames = [
        [FaceLandmarks(np.zeros((3, 2)), left, 1.0, mouth(index, index < 20)),
         FaceLandmarks(np.zeros((3, 2)), right, 1.0, mouth(index, index >= 20))]
        for index in range(40)
    ]
    thumbnails = [dark] * 20 + [light] * 20
    selection = select_faces("active_speaker", None, frames, thumbnails, envelope, SETTINGS)
    assert [face.box for face in selection.faces] == [left] * 20 + [right] * 20
    assert selection.used.box == left
