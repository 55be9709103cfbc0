"""A corpus of bad requests against the gateway app (in this process, real job table and media checks,
a stand-in backend: :mod:`support.local_gateway`): each gets a clean 4xx JSON error, no job is created, no upload
is left behind, and the gateway keeps serving. (Bodies without a key, decode-bomb memory, idempotency,
existence probes and rate limits: test_gateway_abuse.py.)"""

from __future__ import annotations

import base64
import subprocess

import pytest
from support.bombs import huge_frame_video, silent_flac, sparse_video
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS

from lipsync.testing import sample_sum

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-input")
    video = write_video(folder / "clip.mp4", demo_frames(10)).read_bytes()
    audio = write_wav(folder / "speech.wav", speech(0.4)).read_bytes()
    return {
        "video": b64(video), "audio": b64(audio), "truncated": b64(video[: len(video) // 2]),
        "text": b64(b"this is not a media file\n" * 40), "wav_as_video": b64(audio),
        "4000x4000": b64(huge_frame_video(folder / "big.mp4", 4000, 4000).read_bytes()),
        "700 s video": b64(sparse_video(folder / "sparse.mp4", 700).read_bytes()),
        "610 s audio": b64(silent_flac(folder / "silence.flac", 610).read_bytes()),
    }


@pytest.fixture
def gateway(local_gateway):
    return local_gateway


def job_count(gateway) -> float:
    return sample_sum(gateway.client.get("/metrics").text, "lipsync_gateway_jobs")


def submit_body(media: dict[str, str], **changes) -> dict:
    return {"video_source": media["video"], "audio_source": media["audio"], "inference_steps": 1} | changes


CASES = {
    "invalid base64": lambda m: {"json": submit_body(m, video_source="not base64 at all!!")},
    "non-media bytes": lambda m: {"json": submit_body(m, video_source=m["text"])},
    "truncated mp4": lambda m: {"json": submit_body(m, video_source=m["truncated"])},
    "audio-only file as the video": lambda m: {"json": submit_body(m, video_source=m["wav_as_video"])},
    "non-media audio": lambda m: {"json": submit_body(m, audio_source=m["text"])},
    "empty video": lambda m: {"json": submit_body(m, video_source="")},
    "missing audio field": lambda m: {"json": {"video_source": m["video"]}},
    "empty object": lambda m: {"json": {}},
    "a JSON list": lambda m: {"json": [1, 2]},
    "not JSON": lambda m: {"content": b"{video_source: ", "headers": {"Content-Type": "application/json"}},
    "steps out of range": lambda m: {"json": submit_body(m, inference_steps=0)},
    "steps not a number": lambda m: {"json": submit_body(m, inference_steps="many")},
    "unknown loop mode": lambda m: {"json": submit_body(m, loop_mode="sideways")},
    "unknown version": lambda m: {"json": submit_body(m, version="../1.5")},
    "unknown sampling mode": lambda m: {"json": submit_body(m, mode="turbo")},
    "file webhook": lambda m: {"json": submit_body(m, webhook_url="file:///etc/passwd")},
    "unknown field": lambda m: {"json": submit_body(m, output_path="/etc/passwd")},
    "idempotency key too long": lambda m: {"json": submit_body(m), "headers": {"Idempotency-Key": "k" * 201}},
    "steps as a string": lambda m: {"json": submit_body(m, inference_steps="2")},
    "steps as a float": lambda m: {"json": submit_body(m, inference_steps=2.0)},
    "steps as a bool": lambda m: {"json": submit_body(m, inference_steps=True)},
    "guidance as a string": lambda m: {"json": submit_body(m, guidance_scale="1.5")},
    "guidance as a bool": lambda m: {"json": submit_body(m, guidance_scale=False)},
    "seed as a float": lambda m: {"json": submit_body(m, seed=7.5)},
    "version as a number": lambda m: {"json": submit_body(m, version=1.5)},
    "video as a number": lambda m: {"json": submit_body(m, video_source=12345)},
    "video over max_pixels": lambda m: {"json": submit_body(m, video_source=m["4000x4000"]), "reason": "max_pixels"},
    "video over max_video_s": lambda m: {"json": submit_body(m, video_source=m["700 s video"]), "reason": "max_video_s"},
    "audio over max_audio_s": lambda m: {"json": submit_body(m, audio_source=m["610 s audio"]), "reason": "max_audio_s"},
}


@pytest.mark.parametrize("case", CASES)
def test_bad_submit_gets_422_and_creates_nothing(gateway, media, case) -> None:
    before = job_count(gateway)
    request = CASES[case](media)
    headers = AUTH | request.pop("headers", {})
    expected_reason = request.pop("reason", "")
    response = gateway.client.post("/lipsync/submit", headers=headers, **request)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["status"] == "Failed" and isinstance(body["reason"], str) and body["reason"]
    assert expected_reason in body["reason"]
    assert "/tmp" not in body["reason"] and str(gateway.data_dir) not in body["reason"]
    assert job_count(gateway) == before
    assert not any((gateway.data_dir / "incoming").iterdir())


BOTH = {"video": "video", "audio": "audio"}


@pytest.mark.parametrize(
    ("files", "data"),
    [
        ({"video": "text", "audio": "audio"}, {}),
        ({"video": "video", "audio": "text"}, {}),
        ({"video": "video"}, {}),
        (BOTH, {"inference_steps": "-3"}),
        (BOTH, {"inference_steps": "2.0"}),
        (BOTH, {"inference_steps": "true"}),
        (BOTH, {"inference_steps": " 2"}),
        (BOTH, {"seed": "1e3"}),
        (BOTH, {"guidance_scale": "nan"}),
        (BOTH, {"guidance_scale": "true"}),
        (BOTH, {"inference_steps": "01"}),
        (BOTH, {"guidance_scale": ".5"}),
        (BOTH, {"guidance_scale": "5."}),
        (BOTH, {"inference_steps": ["1", "2"]}),
        (BOTH, {"output_path": "/etc/passwd"}),
        (BOTH | {"extra": "video"}, {}),
        ({"video": "video", "audio": "610 s audio"}, {}),
    ],
    ids=["non-media video", "non-media audio", "no audio part", "bad steps", "steps 2.0", "steps true", "steps with a space",
         "seed 1e3", "guidance nan", "guidance true", "steps 01", "guidance .5", "guidance 5.", "steps twice",
         "unknown field", "a third file", "audio over max_audio_s"],
)
def test_bad_multipart_upload_gets_422(gateway, media, files, data) -> None:
    before = job_count(gateway)
    parts = [(name, (f"{name}.mp4", base64.b64decode(media[kind]))) for name, kind in files.items()]
    response = gateway.client.post("/lipsync/upload", headers=AUTH, files=parts, data=data)
    assert response.status_code == 422, response.text
    assert response.json()["status"] == "Failed"
    assert all(field in response.text for field in data)  # the message names the field
    assert job_count(gateway) == before
    assert not any((gateway.data_dir / "incoming").iterdir())


@pytest.mark.parametrize("empty", ["video", "audio"])
def test_an_empty_uploaded_file_is_called_empty_for_video_and_audio_alike(gateway, media, empty) -> None:
    before = job_count(gateway)
    parts = [(name, (f"{name}.mp4", b"" if name == empty else base64.b64decode(media[name]))) for name in BOTH]
    response = gateway.client.post("/lipsync/upload", headers=AUTH, files=parts)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == f"{empty}_source: the file is empty"
    assert job_count(gateway) == before


def test_a_body_over_the_cap_gets_413(gateway, media) -> None:
    huge = {"video_source": "A" * (6 * 1024 * 1024), "audio_source": media["audio"]}  # the fixture's cap: 5 MB
    response = gateway.client.post("/lipsync/submit", headers=AUTH, json=huge)
    assert response.status_code == 413
    assert response.json()["status"] == "Failed"


def test_a_chunked_body_over_the_cap_gets_413(gateway) -> None:
    def chunks():  # a well-formed multipart start, then a file part that never ends
        yield b'--x\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n\r\n'
        for _ in range(7):
            yield b"A" * (1024 * 1024)

    response = gateway.client.post(
        "/lipsync/upload", headers=AUTH | {"Content-Type": "multipart/form-data; boundary=x"}, content=chunks(),
    )
    assert response.status_code == 413
    assert response.json()["status"] == "Failed"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"}],
    ids=["no key", "wrong key", "not bearer", "empty key"],
)
def test_requests_without_an_accepted_key_get_401(gateway, media, headers) -> None:
    unknown = {"request_id": "0" * 32}
    for path, body in (("submit", submit_body(media)), ("status", unknown), ("cancel", unknown)):
        response = gateway.client.post(f"/lipsync/{path}", headers=headers, json=body)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["status"] == "Failed"


@pytest.mark.parametrize(
    ("request_id", "code"),
    [("../../jobs.db", 400), ("/etc/passwd", 400), ("A" * 32, 400), ("0" * 31 + "%", 400), ("", 400), (42, 422),
     (None, 422), ("0" * 32, 404)],
)
def test_bad_or_unknown_request_ids_get_4xx(gateway, request_id, code) -> None:
    for path in ("status", "cancel"):
        response = gateway.client.post(f"/lipsync/{path}", headers=AUTH, json={"request_id": request_id})
        assert response.status_code == code, (path, response.text)
        assert response.json()["status"] == "Failed"


@pytest.mark.parametrize("path", ["..%2F..%2Fjobs.db", "..%2Fresults%2Fx", "%2Fetc%2Fpasswd", "0" * 32, "x" * 32 + ".mp4"])
def test_path_like_result_ids_get_4xx(gateway, path) -> None:
    response = gateway.client.get(f"/lipsync/result/{path}?token=x")
    assert 400 <= response.status_code < 500
    assert response.json()["status"] == "Failed"


def test_another_keys_job_is_unknown(gateway, media) -> None:
    created = gateway.client.post("/lipsync/submit", headers=AUTH, json=submit_body(media))
    assert created.status_code == 200, created.text
    request_id = created.json()["request_id"]
    other = {"Authorization": f"Bearer {KEYS[1]}"}
    for path in ("status", "cancel"):
        response = gateway.client.post(f"/lipsync/{path}", headers=other, json={"request_id": request_id})
        assert response.status_code == 404 and response.json()["status"] == "Failed"
    assert gateway.client.get(f"/lipsync/result/{request_id}", headers=other).status_code == 404
    mine = gateway.client.post("/lipsync/status", headers=AUTH, json={"request_id": request_id})
    assert mine.status_code == 200 and mine.json()["status"] != "Cancelled"  # the other key's cancel did nothing


def test_unknown_routes_and_methods_get_json_errors(gateway) -> None:
    assert gateway.client.get("/nothing-here").json()["status"] == "Failed"
    wrong_method = gateway.client.get("/lipsync/submit")
    assert wrong_method.status_code == 405 and wrong_method.json()["status"] == "Failed"
    assert gateway.client.get("/healthz").json() == {"status": "ok"}
    assert gateway.client.get("/readyz").status_code == 200


def test_a_submit_that_fills_the_data_folder_gets_507_and_leaves_nothing(tmp_path, media) -> None:
    """A 2 MiB data folder (tmpfs; the tests run as root) and no space kept (``min_free_mb`` 0): the
    3 MiB upload runs out of space while it is written; the client gets 507, the partial upload is gone."""
    from support.local_gateway import LocalGateway

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        with LocalGateway(disk / "data", min_free_mb=0) as local:
            body = {"video_source": b64(b"\0" * 3 * 2**20), "audio_source": media["audio"]}
            response = local.client.post("/lipsync/submit", headers=AUTH, json=body)
            assert response.status_code == 507, response.text
            assert response.json() == {"status": "Failed", "reason": response.json()["reason"]}
            assert "ran out of space" in response.json()["reason"]
            assert not any((disk / "data" / "incoming").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_responses_are_counted_by_route_and_code_refusals_of_the_guard_too(gateway) -> None:
    def responses(route: str, code: str) -> float:
        text = gateway.client.get("/metrics").text
        return sample_sum(text, "lipsync_gateway_http_responses_total", route=route, code=code)

    before = responses("/lipsync/status", "404"), responses("unmatched", "401")
    assert gateway.client.post("/lipsync/status", json={"request_id": "0" * 32}, headers=AUTH).status_code == 404
    assert gateway.client.post("/lipsync/status", json={"request_id": "0" * 32}).status_code == 401
    assert (responses("/lipsync/status", "404"), responses("unmatched", "401")) == (before[0] + 1, before[1] + 1)
