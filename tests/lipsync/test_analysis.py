"""The streamed analysis pass: alignments become final frame by frame, errors reach the reader."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lipsync.analysis import AnalysisStopped, FaceTrack, NoFaceError


def _affine(value: float) -> np.ndarray:
    return np.full((2, 3), value)


def test_faceless_frames_borrow_the_nearest_face_the_later_on_a_tie() -> None:
    track = FaceTrack("clip.mp4")
    track.extend([None, _affine(1), None, None, _affine(4), None, None, None, _affine(8)])
    track.finish()
    borrowed = {frame: track.alignment(frame) for frame in range(9)}
    assert [float(affine[0, 0]) for affine, _ in borrowed.values()] == [1, 1, 1, 4, 4, 4, 8, 8, 8]
    assert [has_face for _, has_face in borrowed.values()] == [False, True, False, False, True, False, False, False, True]


def test_a_frame_waits_until_a_later_face_makes_its_alignment_final() -> None:
    track = FaceTrack("clip.mp4")
    track.extend([_affine(0), None])
    waited = threading.Event()

    def reader() -> None:
        track.wait_for(1)
        waited.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert not waited.wait(0.2)  # frame 1 has no face yet: the nearest face may still come
    track.extend([_affine(2)])
    assert waited.wait(5)
    thread.join()
    assert float(track.alignment(1)[0][0, 0]) == 2  # tie between frames 0 and 2: the later one
    assert track.frames is None
    track.finish()
    assert track.wait_until_done() == 3 and track.frames == 3


def test_the_last_frames_without_face_are_final_when_the_analysis_ends() -> None:
    track = FaceTrack("clip.mp4")
    track.extend([_affine(0), None, None])
    track.finish()
    track.wait_for(2)
    assert float(track.alignment(2)[0][0, 0]) == 0


def test_no_face_anywhere_is_raised_to_the_reader() -> None:
    track = FaceTrack("clip.mp4")
    track.extend([None, None])
    track.finish()
    with pytest.raises(NoFaceError, match="no face was found in any of the 2 frames of clip.mp4"):
        track.wait_for(0)


def test_an_analysis_error_is_raised_to_the_reader() -> None:
    track = FaceTrack("clip.mp4")
    track.finish(RuntimeError("decoder broke"))
    with pytest.raises(RuntimeError, match="decoder broke"):
        track.wait_until_done()


def test_a_stopped_track_ends_the_analysis() -> None:
    track = FaceTrack("clip.mp4")
    track.stop()
    with pytest.raises(AnalysisStopped):
        track.extend([_affine(0)])
