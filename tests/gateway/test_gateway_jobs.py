"""The job routes' own rules against the gateway app in this process (real job table, stand-in backend:
:mod:`support.local_gateway`): the caller's job list and its pages, the queue's fair share across keys. Jobs
through a real Triton: test_gateway_api.py."""

from __future__ import annotations

import base64
import logging
import time

import pytest
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS, LOAD_TEST_LIMITS
from support.local_gateway import STAND_IN_WEIGHTS, LocalGateway, StandInBackend

FINISHED = {"Succeed", "Failed", "Cancelled"}


@pytest.fixture(scope="module")
def body(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("jobs")
    video = write_video(folder / "clip.mp4", demo_frames(10)).read_bytes()
    audio = write_wav(folder / "speech.wav", speech(0.4)).read_bytes()
    return {"video_source": base64.b64encode(video).decode(), "audio_source": base64.b64encode(audio).decode()}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_job_list_shows_the_callers_own_jobs_newest_first(local_gateway, body) -> None:
    client = local_gateway.client

    def job(key: str) -> str:
        response = client.post("/lipsync/submit", headers=auth(key), json=body | {"inference_steps": 1})
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    first, second, other = job(KEYS[0]), job(KEYS[0]), job(KEYS[1])
    listed = client.get("/v1/jobs", headers=auth(KEYS[0]), params={"limit": 2}).json()["jobs"]
    assert [listed_job["request_id"] for listed_job in listed] == [second, first]
    assert all("status" in listed_job for listed_job in listed)
    assert other not in {listed_job["request_id"] for listed_job in client.get("/v1/jobs", headers=auth(KEYS[0])).json()["jobs"]}
    assert client.get("/v1/jobs", headers=auth(KEYS[1])).json()["jobs"][0]["request_id"] == other
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers=auth(KEYS[0]), params={"limit": 0}).status_code == 422
    deadline = time.monotonic() + 30
    while not all(listed_job["status"] in FINISHED for listed_job in listed):
        assert time.monotonic() < deadline, listed
        time.sleep(0.05)
        listed = client.get("/v1/jobs", headers=auth(KEYS[0]), params={"limit": 2}).json()["jobs"]
    assert all(listed_job["status"] == "Succeed" and listed_job["weights"] == STAND_IN_WEIGHTS for listed_job in listed)


def test_the_job_list_pages_with_a_cursor_that_holds_under_new_submits(local_gateway, body) -> None:
    client, key = local_gateway.client, KEYS[1]

    def submit() -> str:
        response = client.post("/lipsync/submit", headers=auth(key), json=body | {"inference_steps": 1})
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    def page(**params) -> dict:
        response = client.get("/v1/jobs", headers=auth(key), params=params)
        assert response.status_code == 200, response.text
        return response.json()

    before = page(limit=100)["jobs"]
    submitted = [submit() for _ in range(5)]
    newest_first = submitted[::-1] + [job["request_id"] for job in before]
    first = page(limit=2)
    listed = [job["request_id"] for job in first["jobs"]]
    cursor = first["next_cursor"]
    newer = submit()  # a submit between two pages moves nothing on the pages after the first
    while cursor is not None:
        following = page(limit=2, cursor=cursor)
        listed += [job["request_id"] for job in following["jobs"]]
        cursor = following["next_cursor"]
    assert listed == newest_first
    assert page(limit=1)["jobs"][0]["request_id"] == newer


@pytest.mark.parametrize(("params", "named"), [
    ({"limit": 2, "offset": 2}, "offset"), ({"limt": 2}, "limt"), ({"limit": 101}, "limit"), ({"limit": 0}, "limit"),
    ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"), ({"cursor": "W251bGwsICJ4Il0"}, "cursor"), ({"cursor": "%%%"}, "cursor"),
    ({"cursor": "x" * 201}, "cursor"),
])
def test_unknown_or_bad_job_list_parameters_are_a_422_naming_them(local_gateway, params, named) -> None:
    response = local_gateway.client.get("/v1/jobs", headers=auth(KEYS[0]), params=params)
    assert response.status_code == 422 and named in response.json()["reason"], response.text


def test_a_keys_only_job_runs_before_another_keys_fifteen_queued_ones(tmp_path, body) -> None:
    with LocalGateway(tmp_path / "data", StandInBackend(hold=True), **LOAD_TEST_LIMITS) as local:  # one job at a time
        client = local.client

        def submit(key: str) -> str:
            response = client.post("/lipsync/submit", headers=auth(key), json=body | {"inference_steps": 1})
            assert response.status_code == 200, response.text
            return response.json()["request_id"]

        def status(key: str, job_id: str) -> dict:
            return client.post("/lipsync/status", headers=auth(key), json={"request_id": job_id}).json()

        busy = [submit(KEYS[1]) for _ in range(16)]
        deadline = time.monotonic() + 30
        while status(KEYS[1], busy[0])["status"] != "InProgress":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        late = submit(KEYS[0])
        assert status(KEYS[0], late)["queue_position"] == 1
        assert [status(KEYS[1], job_id)["queue_position"] for job_id in busy[1:]] == list(range(2, 17))
        assert client.post("/lipsync/cancel", headers=auth(KEYS[1]), json={"request_id": busy[0]}).status_code == 200
        while status(KEYS[0], late)["status"] != "InProgress":  # the worker's next claim
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status(KEYS[1], busy[1])["status"] == "InQueue"


@pytest.mark.postgres
def test_requests_get_503_while_postgresql_is_down_and_a_job_ending_meanwhile_is_committed_after(
    tmp_path, body, postgres, caplog,
) -> None:
    """The worker keeps its threads through the outage: the running job's ending is retried until PostgreSQL
    answers, and the next queued job is claimed afterwards."""
    caplog.set_level(logging.WARNING, logger="gateway.jobs.worker")
    backend = StandInBackend(hold=True)
    url = postgres.new_database("outage_local")
    with LocalGateway(tmp_path / "data", backend, database_url=url, store_retry_s=1, **LOAD_TEST_LIMITS) as local:
        client = local.client

        def submit() -> str:
            response = client.post("/lipsync/submit", headers=auth(KEYS[0]), json=body | {"inference_steps": 1})
            assert response.status_code == 200, response.text
            return response.json()["request_id"]

        def status(job_id: str) -> dict:
            return client.post("/lipsync/status", headers=auth(KEYS[0]), json={"request_id": job_id}).json()

        running, queued = submit(), submit()
        deadline = time.monotonic() + 30
        while status(running)["status"] != "InProgress":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        postgres.halt()
        try:
            answer = client.post("/lipsync/status", headers=auth(KEYS[0]), json={"request_id": running})
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
            assert answer.json() == {
                "status": "Failed", "reason": "the job database is unavailable for now; nothing was changed, retry in 1 s",
            }
            refused = client.post("/lipsync/submit", headers=auth(KEYS[0]), json=body | {"inference_steps": 1})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert client.get("/metrics").status_code == 503
            backend.release.set()  # the job ends while its row cannot be written
            while not any("trying again" in record.getMessage() for record in caplog.records):
                assert time.monotonic() < deadline + 30
                time.sleep(0.05)
        finally:
            postgres.resume()
        endings = {}
        for job_id in (running, queued):
            while (seen := status(job_id))["status"] not in FINISHED:
                assert time.monotonic() < deadline + 60, seen
                time.sleep(0.05)
            endings[job_id] = seen["status"]
        assert endings == {running: "Succeed", queued: "Succeed"}
        listed = client.get("/v1/jobs", headers=auth(KEYS[0])).json()["jobs"]
        assert {job["request_id"] for job in listed} == {running, queued}  # the refused submit made nothing
