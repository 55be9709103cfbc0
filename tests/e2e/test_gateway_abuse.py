"""Abuse of the gateway: bodies sent without a key, decode bombs, idempotency keys reused for other
requests, probes for other keys' jobs, a forged Host header, more requests and jobs than a key may have.
Every answer is the JSON error shape, nothing is created, and the gateway's memory stays flat.

Memory is measured on a real ``lipsync-serve gateway`` process (real Triton on CPU); what the gateway
decides alone runs against the app in this process on a stand-in backend (:mod:`support.local_gateway`),
over a real socket where the test speaks raw HTTP."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from support.bombs import huge_frame_video
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS, memory_mb, reset_peak_memory
from support.local_gateway import LocalGateway, StandInBackend

from gateway.backends.triton_client import JobRequest, TritonJobError, stream_job
from gateway.store import new_job_id
from lipsync.testing import sample_sum

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
OTHER = {"Authorization": f"Bearer {KEYS[1]}"}
BIG_BODY = 150 * 1024 * 1024
"""What a client without a key announces: 30× the test gateway's body cap."""
FLAT_MB = 32
"""How much the gateway's peak memory may rise while refusing a request (its RSS is ~100 MB)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("abuse")
    return {
        "video": write_video(folder / "clip.mp4", demo_frames(10)).read_bytes(),
        "audio": write_wav(folder / "speech.wav", speech(0.4)).read_bytes(),
        "other_audio": write_wav(folder / "other.wav", speech(0.6)).read_bytes(),
        "bomb": huge_frame_video(folder / "bomb.mov", 8192, 8192).read_bytes(),
    }


def body(media: dict[str, bytes], video: str = "video", audio: str = "audio", **options) -> dict:
    return {"video_source": b64(media[video]), "audio_source": b64(media[audio]), "inference_steps": 1} | options


def http(gateway):
    """What sends requests to ``gateway``: its in-process client, else HTTP over loopback."""
    return getattr(gateway, "client", httpx2)


def job_count(gateway) -> float:
    return sample_sum(http(gateway).get(f"{gateway.url}/metrics").text, "lipsync_gateway_jobs")


def nothing_left_behind(gateway, jobs_before: float) -> None:
    assert job_count(gateway) == jobs_before
    assert not any((gateway.data_dir / "incoming").iterdir())


def is_error(response: httpx2.Response, code: int) -> str:
    assert response.status_code == code, response.text
    answer = response.json()
    assert answer["status"] == "Failed" and answer["reason"], answer
    return answer["reason"]


# --- authentication before the body ---------------------------------------------------------------


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(rest) < int(headers.get("content-length", 0)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, rest


def refused_mid_body(port: int, head: str, first: bytes, more: bytes, total: int) -> tuple[int, dict, dict, int]:
    """Send ``head`` and the start of a body of ``total`` bytes, then stop: the answer must come while
    the body is unfinished. Then keep sending ``more`` until the server hangs up.

    Returns the answer's status, headers and JSON, and how many body bytes the server let us send.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(head.encode("latin-1") + b"\r\n" + first)
        status, headers, answer = read_response(conn)  # nothing more is sent until the answer is here
        sent = len(first)
        try:
            while sent < total:
                conn.sendall(more)
                sent += len(more)
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
    return status, headers, json.loads(answer), sent


def request_head(path: str, headers: dict[str, str]) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())


@pytest.mark.parametrize(
    ("path", "headers", "first", "more"),
    [
        ("/lipsync/submit", {"Content-Type": "application/json", "Content-Length": str(BIG_BODY)},
         b'{"video_source": "' + b"A" * 65536, b"A" * (1 << 20)),
        ("/lipsync/upload", {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(BIG_BODY)},
         b'--x\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n\r\n' + b"\0" * 65536,
         b"\0" * (1 << 20)),
        ("/lipsync/upload", {"Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked"},
         b"10000\r\n" + b"\0" * 0x10000 + b"\r\n", b"100000\r\n" + b"\0" * 0x100000 + b"\r\n"),
        ("/lipsync/status", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
         b"10000\r\n" + b" " * 0x10000 + b"\r\n", b"100000\r\n" + b" " * 0x100000 + b"\r\n"),
    ],
    ids=["json 150 MB", "multipart 150 MB", "chunked multipart", "chunked status"],
)
@pytest.mark.parametrize("key", [None, "Bearer wrong-key"], ids=["no key", "wrong key"])
@pytest.mark.slow
def test_a_body_without_a_valid_key_is_refused_before_it_is_read(gateway, path, headers, first, more, key) -> None:
    jobs_before = job_count(gateway)
    pid = gateway.process.pid
    resident = memory_mb(pid)
    reset_peak_memory(pid)
    head = request_head(path, headers | ({"Authorization": key} if key else {}))
    status, answer_headers, answer, sent = refused_mid_body(gateway.port, head, first, more, BIG_BODY)
    assert status == 401 and answer["status"] == "Failed" and "API key" in answer["reason"]
    assert answer_headers["connection"] == "close" and answer_headers["www-authenticate"] == "Bearer"
    assert sent < BIG_BODY // 10, f"the server took {sent:,} bytes after refusing"
    assert memory_mb(pid, "VmHWM") - resident < FLAT_MB
    nothing_left_behind(gateway, jobs_before)


@pytest.mark.slow
def test_a_body_over_the_cap_with_a_valid_key_is_refused_from_its_length(gateway) -> None:
    head = request_head("/lipsync/submit", AUTH | {"Content-Type": "application/json", "Content-Length": str(BIG_BODY)})
    status, headers, answer, sent = refused_mid_body(gateway.port, head, b"{", b" " * (1 << 20), BIG_BODY)
    assert status == 413 and answer["status"] == "Failed" and headers["connection"] == "close"
    assert sent < BIG_BODY // 10


# --- decode bombs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_decode_bomb_is_refused_from_its_headers_without_the_memory_it_would_take(gateway, media) -> None:
    """One 8192×8192 frame in 190 KiB: 96 MB decoded, 192 MB as RGB (a 12000×12000 one cost the gateway 414 MB)."""
    assert len(media["bomb"]) < 250_000
    jobs_before = job_count(gateway)
    pid = gateway.process.pid
    resident = memory_mb(pid)
    reset_peak_memory(pid)
    response = httpx2.post(f"{gateway.url}/lipsync/submit", headers=AUTH, json=body(media, "bomb"), timeout=60)
    reason = is_error(response, 422)
    assert reason.startswith("video_source: ") and "8192×8192" in reason and "(max_side)" in reason
    assert memory_mb(pid, "VmHWM") - resident < 64
    upload = httpx2.post(f"{gateway.url}/lipsync/upload", headers=AUTH, timeout=60,
                         files={"video": ("v.mov", media["bomb"]), "audio": ("a.wav", media["audio"])})
    assert "(max_side)" in is_error(upload, 422)
    nothing_left_behind(gateway, jobs_before)


def _model_stub_pids(triton) -> list[int]:
    """The ``lipsync`` model's Python backend stubs (one process per instance), children of the server."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            status = (proc / "status").read_text()
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
        if parent == str(triton.process.pid) and any(arg.endswith(b"/lipsync/1/model.py") for arg in command):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_the_model_refuses_a_decode_bomb_sent_straight_to_triton(triton, media) -> None:
    stubs = _model_stub_pids(triton)
    assert stubs, "no Python backend stub found"
    resident = {pid: memory_mb(pid) for pid in stubs}
    for pid in stubs:
        reset_peak_memory(pid)
    with pytest.raises(TritonJobError) as raised:
        stream_job(triton.settings.grpc_url, JobRequest(video=media["bomb"], audio=media["audio"], inference_steps=1))
    assert raised.value.kind == "bad_input" and "(max_side)" in str(raised.value)
    assert max(memory_mb(pid, "VmHWM") - resident[pid] for pid in stubs) < 128  # it cost Triton 2 GB


# --- idempotency --------------------------------------------------------------------------------------


def test_an_idempotency_key_is_bound_to_the_request_it_was_first_used_with(local_gateway, media) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    first = local_gateway.client.post("/lipsync/submit", headers=AUTH | key, json=body(media))
    assert first.status_code == 200, first.text
    request_id = first.json()["request_id"]
    jobs_before = job_count(local_gateway)
    try:
        again = local_gateway.client.post("/lipsync/submit", headers=AUTH | key, json=body(media))
        assert again.status_code == 200 and again.json()["request_id"] == request_id
        as_upload = local_gateway.client.post(  # the same request as multipart: the same job
            "/lipsync/upload", headers=AUTH | key, data={"inference_steps": "1"},
            files={"video": ("v.mp4", media["video"]), "audio": ("a.wav", media["audio"])},
        )
        assert as_upload.status_code == 200 and as_upload.json()["request_id"] == request_id
        for changed in (body(media, inference_steps=2), body(media, audio="other_audio"), body(media, seed=5)):
            conflict = local_gateway.client.post("/lipsync/submit", headers=AUTH | key, json=changed)
            assert "Idempotency-Key" in is_error(conflict, 409)
        conflict = local_gateway.client.post(
            "/lipsync/upload", headers=AUTH | key, data={"inference_steps": "3"},
            files={"video": ("v.mp4", media["video"]), "audio": ("a.wav", media["audio"])},
        )
        assert is_error(conflict, 409)
        nothing_left_behind(local_gateway, jobs_before)
        other_key = local_gateway.client.post("/lipsync/submit", headers=OTHER | key, json=body(media, seed=5))
        assert other_key.status_code == 200 and other_key.json()["request_id"] != request_id  # keys are per API key
        local_gateway.client.post("/lipsync/cancel", headers=OTHER, json=other_key.json())
    finally:
        local_gateway.client.post("/lipsync/cancel", headers=AUTH, json={"request_id": request_id})


# --- existence oracle, tokens, Host ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_job(local_gateway, media) -> dict:
    """A job of KEYS[0] that succeeded: its status with the result URL."""
    response = local_gateway.client.post("/lipsync/submit", headers=AUTH, json=body(media))
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    deadline = time.monotonic() + 30
    while True:
        status = local_gateway.client.post("/lipsync/status", headers=AUTH, json={"request_id": request_id}).json()
        if status["status"] in ("Succeed", "Failed", "Cancelled"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["status"] == "Succeed", status
    return status


def probes(gateway: LocalGateway, request_id: str) -> Iterator[tuple[str, httpx2.Response]]:
    client, result = gateway.client, f"/lipsync/result/{request_id}"
    yield "result, no credential", client.get(result)
    yield "result, wrong token", client.get(result, params={"token": "A" * 43})
    yield "result, non-ASCII token", client.get(f"{result}?token=%C3%A9")
    yield "result, undecodable token", client.get(f"{result}?token=%ED%A0%80%FF")
    yield "result, unaccepted key", client.get(result, headers={"Authorization": "Bearer wrong"})
    yield "result, non-ASCII key", client.get(result, headers={"Authorization": b"Bearer \xc3\xa9"})
    yield "result, other owner's key", client.get(result, headers=OTHER)
    for path in ("status", "cancel"):
        for who, headers in (("other owner", OTHER), ("unaccepted key", {"Authorization": "Bearer wrong"}),
                             ("non-ASCII key", {"Authorization": b"Bearer \xc3\xa9"})):
            yield f"{path}, {who}", client.post(f"/lipsync/{path}", headers=headers, json={"request_id": request_id})


def test_nothing_tells_whether_a_job_exists(local_gateway, finished_job) -> None:
    existing, unknown = finished_job["request_id"], new_job_id()
    for (name, seen), (_, unseen) in zip(probes(local_gateway, existing), probes(local_gateway, unknown), strict=True):
        assert seen.status_code in (401, 404), (name, seen.text)
        assert (seen.status_code, seen.json()) == (unseen.status_code, unseen.json()), name
        assert seen.json()["status"] == "Failed"
        if name.startswith("result"):
            assert seen.status_code == 404, name
    url = finished_job["results"]["video"][0]["url"]
    download = local_gateway.client.get(url)
    assert download.status_code == 200  # the job is there for its token…
    assert download.headers["x-content-type-options"] == "nosniff"
    assert download.headers["cache-control"] == "private, no-store"
    mine = local_gateway.client.post("/lipsync/status", headers=AUTH, json={"request_id": existing})
    assert mine.json()["status"] == "Succeed"  # …and the probes changed nothing


def test_result_urls_come_from_the_configuration_not_the_host_header(local_gateway, finished_job) -> None:
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    status = local_gateway.client.post(
        "/lipsync/status", headers=AUTH | forged, json={"request_id": finished_job["request_id"]},
    ).json()
    url = status["results"]["video"][0]["url"]
    assert url.startswith(f"{local_gateway.url}/lipsync/result/") and "evil" not in url


def test_a_path_with_a_trailing_slash_is_a_404_never_a_redirect_built_from_the_host(local_gateway, finished_job) -> None:
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    url = httpx2.URL(finished_job["results"]["video"][0]["url"])
    slashed = url.copy_with(path=url.path + "/")
    for method, path, extra in (("GET", slashed, {}), ("POST", "/lipsync/status/", {"json": {"request_id": "0" * 32}}),
                                ("GET", "/healthz/", {}), ("GET", "/v1/jobs/", {})):
        response = local_gateway.client.request(method, path, headers=AUTH | forged, **extra)
        assert response.status_code == 404, (path, response.status_code, response.headers)
        assert "location" not in response.headers and response.json()["status"] == "Failed", path


# --- rates and quotas ---------------------------------------------------------------------------------


THIRD_KEY = "key-gamma-5555555555"


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[LocalGateway]:
    """A gateway with tight per-key limits and a third key, on a backend whose jobs run until cancelled."""
    folder = tmp_path_factory.mktemp("limited")
    (folder / "keys").write_text(THIRD_KEY + "\n")
    settings = {
        "rate_limit": "9/minute", "submit_rate_limit": "5/minute", "max_active_jobs": 2, "quota_retry_after_s": 7,
        "max_concurrent_submits": 4, "api_keys_file": str(folder / "keys"),
    }
    with LocalGateway(folder / "data", StandInBackend(hold=True), **settings) as local:
        yield local.serve()


def test_the_info_page_shows_no_server_path(limited) -> None:
    info = limited.client.get("/v1/info")
    assert info.status_code == 200
    assert info.json()["api_keys"] == {"env": "LIPSYNC_API_KEYS", "local_key_file": None, "keys_file": True}
    assert "/" not in json.dumps(info.json()["api_keys"])


def test_a_key_over_its_rates_or_job_quota_gets_429_with_retry_after(limited, media) -> None:
    url = limited.url

    def submit(headers: dict = AUTH, **options) -> httpx2.Response:
        job = body(media, **options)
        return httpx2.post(f"{url}/lipsync/submit", headers=headers, json=job, timeout=60)

    def cancel(headers: dict, job: httpx2.Response) -> httpx2.Response:
        return httpx2.post(f"{url}/lipsync/cancel", headers=headers, json=job.json(), timeout=30)

    first = submit(AUTH | {"Idempotency-Key": "a"})                                   # requests 1, submits 1
    assert first.status_code == 200, first.text
    second = submit(seed=2)                                                           # 2, 2: quota full
    assert second.status_code == 200, second.text
    quota = submit(seed=3)                                                            # 3, 3
    assert "(max_active_jobs)" in is_error(quota, 429) and quota.headers["Retry-After"] == "7"
    replay = submit(AUTH | {"Idempotency-Key": "a"})                                  # 4, 4: creates nothing
    assert replay.status_code == 200 and replay.json() == first.json()
    assert submit(seed=4).status_code == 429                                          # 5, 5
    rate = submit(seed=5)                                                             # 6, over submit_rate_limit
    assert "(submit_rate_limit)" in is_error(rate, 429) and 1 <= int(rate.headers["Retry-After"]) <= 60
    head = request_head("/lipsync/submit", AUTH | {"Content-Type": "application/json", "Content-Length": str(BIG_BODY)})
    status, headers, answer, sent = refused_mid_body(limited.port, head, b"{", b" " * (1 << 20), BIG_BODY)  # 7
    assert status == 429 and "retry-after" in headers and sent < BIG_BODY // 10  # before the body, too
    assert job_count(limited) == 2 and not any((limited.data_dir / "incoming").iterdir())
    assert cancel(AUTH, first).status_code == 200 and cancel(AUTH, second).status_code == 200  # 8, 9
    polls = httpx2.post(f"{url}/lipsync/status", headers=AUTH, json=first.json(), timeout=30)  # 10
    assert "(rate_limit)" in is_error(polls, 429) and 1 <= int(polls.headers["Retry-After"]) <= 60

    # the other key has its own counters; concurrent submits cannot overshoot its quota
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda seed: submit(OTHER, seed=seed), range(4)))
    assert sorted(answer.status_code for answer in answers) == [200, 200, 429, 429]
    assert job_count(limited) == 4 and not any((limited.data_dir / "incoming").iterdir())
    for answer in answers:
        if answer.status_code == 200:
            assert cancel(OTHER, answer).status_code == 200


def test_a_key_may_have_only_so_many_submits_in_flight(limited) -> None:
    """Bodies being received count: a key cannot make the gateway hold more than max_concurrent_submits of them."""
    key = {"Authorization": f"Bearer {THIRD_KEY}", "Content-Type": "application/json"}
    head = request_head("/lipsync/submit", key | {"Content-Length": str(1 << 20)}) + "\r\n"
    slow = [socket.create_connection(("127.0.0.1", limited.port), timeout=20) for _ in range(4)]
    try:
        for conn in slow:  # four submits whose bodies never finish
            conn.sendall(head.encode() + b'{"video_source": "')
        time.sleep(1)  # for the gateway to take in their headers
        fifth = httpx2.post(f"{limited.url}/lipsync/submit", headers=key, content=b"{}", timeout=30)
        assert "(max_concurrent_submits)" in is_error(fifth, 429) and fifth.headers["Retry-After"] == "1"
    finally:
        for conn in slow:
            conn.close()
    assert not any((limited.data_dir / "incoming").iterdir())
