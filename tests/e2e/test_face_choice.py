"""Choosing the face in a two-person clip, through the gateway and the real Triton (CPU, tiny weights).

Two composites of the real demo clip side by side (``support.clips.two_person_composite``): once the
left person speaks, once the right one, the other half a still frame; the composite's own sound is the
speech. For each way of choosing, only the chosen person's half is changed: the other half's pixels
are the input's apart from encoding (the jobs are encoded at CRF 0). Jobs run 1 DDIM step.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx2
import numpy as np
import pytest
from support.clips import COMPOSITE_HALF, two_person_composite, write_video
from support.gateway_process import KEYS

from lipsync.faces import MediaPipeFaceDetector
from lipsync.media import VideoReader

pytestmark = [pytest.mark.slow]

FINISHED = {"Succeed", "Failed", "Cancelled"}
HALF_WIDTH = COMPOSITE_HALF[0]
BLOCK = 16
CHANGED = 12.0
"""Mean absolute difference (0–255) of a 16×16 block above which the block was generated, not re-encoded."""


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("two-people")
    return {side: two_person_composite(folder / f"{side}.mp4", side) for side in ("left", "right")}


@pytest.fixture(scope="module")
def http(gateway) -> httpx2.Client:
    with httpx2.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=120) as client:
        yield client


def job_ids(http: httpx2.Client) -> list[str]:
    return [job["request_id"] for job in http.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]


def submit(http: httpx2.Client, clip: Path, **options) -> httpx2.Response:
    data = base64.b64encode(clip.read_bytes()).decode()
    return http.post("/lipsync/submit", json={"video_source": data, "audio_source": data} | options)


def finished(http: httpx2.Client, request_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := http.post("/lipsync/status", json={"request_id": request_id}).json())["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"stuck at {status}"
        time.sleep(0.5)
    return status


def frames(path: Path) -> np.ndarray:
    with VideoReader(path) as reader:
        return np.stack(list(reader)).astype(np.int16)


def changed_halves(before: np.ndarray, after: np.ndarray) -> list[set[str]]:
    """Per frame, the halves with a generated block (see :data:`CHANGED`)."""
    frames_, height, width = before.shape[:3]
    difference = np.abs(after - before).mean(axis=3)
    blocks = difference[:, : height // BLOCK * BLOCK, : width // BLOCK * BLOCK]
    blocks = blocks.reshape(frames_, height // BLOCK, BLOCK, width // BLOCK, BLOCK).mean(axis=(2, 4))
    centres = (np.arange(width // BLOCK) + 0.5) * BLOCK
    return [
        {side for side, columns in (("left", centres < HALF_WIDTH), ("right", centres >= HALF_WIDTH))
         if (frame[:, columns] > CHANGED).any()}
        for frame in blocks
    ]


def point_on(clip: Path, side: str) -> str:
    """The centre of ``side``'s face on the first frame, as a ``face_box`` point."""
    with VideoReader(clip) as reader:
        first = next(iter(reader))
    detector = MediaPipeFaceDetector()
    try:
        faces = detector.detect_all(first)
    finally:
        detector.close()
    centres = [((face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2) for face in faces]
    x, y = next(centre for centre in centres if (centre[0] < HALF_WIDTH) == (side == "left"))
    return f"{x:.0f},{y:.0f}"


@pytest.mark.parametrize("speaking", ["left", "right"])
@pytest.mark.parametrize("choice", ["largest", "box", "active_speaker"])
def test_only_the_chosen_person_is_synced(http, composites, tmp_path: Path, speaking: str, choice: str) -> None:
    clip = composites[speaking]
    options = {"inference_steps": 1, "crf": 0, "loop_mode": "cut", "face": choice}
    if choice == "box":  # the still person, so that the choice is not the speaker by chance
        options["face_box"] = point_on(clip, "right" if speaking == "left" else "left")
    response = submit(http, clip, **options)
    assert response.status_code == 200, response.text
    status = finished(http, response.json()["request_id"])
    assert status["status"] == "Succeed", status
    face = status["results"]["face"]
    assert face["choice"] == choice and 0 <= face["confidence"] <= 1
    chosen_side = "left" if (face["box"][0] + face["box"][2]) / 2 < HALF_WIDTH else "right"
    expected = {"box": "right" if speaking == "left" else "left", "active_speaker": speaking}.get(choice, chosen_side)
    assert chosen_side == expected

    result = tmp_path / "result.mp4"
    result.write_bytes(httpx2.get(status["results"]["video"][0]["url"], timeout=60).content)
    halves = changed_halves(frames(clip), frames(result))
    if choice == "largest":  # the two faces are the same size: each frame syncs one of them, never both
        assert all(len(changed) <= 1 for changed in halves), halves
        assert halves[0] == {chosen_side}
    else:
        assert all(changed == {expected} for changed in halves), halves
    if choice == "active_speaker":
        assert face["confidence"] > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"face": "box", "face_box": "5000,10"}, "face_box 5000,10 lies outside the 540×480 frame"),
        ({"face": "box", "face_box": "10,10,20,481"}, "lies outside the 540×480 frame"),
        ({"face": "box", "face_box": "-1,10"}, "lies outside"),
        ({"face": "box", "face_box": "10;10"}, "face_box is 'x,y'"),
        ({"face": "box", "face_box": "30,30,10,10"}, "x0 < x1"),
        ({"face": "box"}, "face=box needs face_box"),
        ({"face_box": "10,10"}, "face_box is only taken with face=box"),
        ({"face": "active_speaker", "face_box": "10,10"}, "face_box is only taken with face=box"),
        ({"face": "loudest"}, "face"),
    ],
)
def test_bad_face_options_are_refused_and_nothing_is_created(http, composites, options: dict, message: str) -> None:
    before = job_ids(http)
    response = submit(http, composites["left"], **options)
    assert response.status_code == 422, response.text
    assert message in response.json()["reason"]
    assert job_ids(http) == before


def test_active_speaker_needs_the_videos_own_sound(http, composites, tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    with VideoReader(composites["left"]) as reader:
        pictures = list(reader)
    write_video(silent, pictures[:10])
    before = job_ids(http)
    data = base64.b64encode(silent.read_bytes()).decode()
    sound = base64.b64encode(composites["left"].read_bytes()).decode()
    response = http.post("/lipsync/submit", json={"video_source": data, "audio_source": sound, "face": "active_speaker"})
    assert response.status_code == 422, response.text
    assert "needs the video's own audio track" in response.json()["reason"]
    assert job_ids(http) == before
