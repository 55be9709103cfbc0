"""The gateway's parts on their own: job table transitions and recovery, retention, API keys, base64 and
content checks. (Jobs that run on Triton are in test_gateway_api.py.)"""

from __future__ import annotations

import base64
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from clips import demo_frames, speech, write_video, write_wav
from gateway.auth import ApiKeys, KeyConfigError, digest, local_key
from gateway.settings import GatewaySettings
from gateway.storage import DataDir, is_job_id
from gateway.store import JobStore, new_job_id
from gateway.store_sqlite import SqliteJobStore
from gateway.validation import InvalidInput, check_audio, check_video, decode_base64

PARAMS = {"inference_steps": 1, "guidance_scale": 1.5, "seed": 1, "loop_mode": None, "version": None}


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    store = SqliteJobStore(tmp_path / "jobs.db")
    yield store
    store.close()


def queue(store: JobStore, owner: str = "a", key: str | None = None) -> str:
    job, created = store.create(new_job_id(), owner, PARAMS, idempotency_key=key)
    return job.id


def test_the_table_is_in_wal_mode_and_survives_reopening(tmp_path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db")
    job_id = queue(store)
    store.close()
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = SqliteJobStore(tmp_path / "jobs.db")
    assert reopened.get(job_id).status == "InQueue"
    reopened.close()


def test_jobs_run_in_submission_order_and_queue_positions_follow(store) -> None:
    first, second, third = queue(store), queue(store), queue(store)
    assert [store.queue_position(store.get(j)) for j in (first, second, third)] == [1, 2, 3]
    claimed = store.claim_next()
    assert claimed.id == first and claimed.status == "InProgress" and claimed.attempts == 1
    assert [store.queue_position(store.get(j)) for j in (first, second, third)] == [0, 1, 2]
    store.cancel(second, "by test")
    assert store.queue_position(store.get(third)) == 1
    assert store.claim_next().id == third
    assert store.claim_next() is None


def test_a_cancelled_running_job_stays_cancelled_whatever_its_worker_reports(store) -> None:
    job_id = queue(store)
    store.claim_next()
    store.set_progress(job_id, 0.5, "generate")
    assert store.cancel(job_id, "by test")
    assert not store.cancel(job_id, "again")
    assert not store.is_running(job_id)
    assert store.succeed(job_id, 1.0, {}) is False
    assert store.fail(job_id, "late") is False
    store.set_progress(job_id, 0.9, "generate")
    job = store.get(job_id)
    assert (job.status, job.reason, job.progress) == ("Cancelled", "by test", 0.5)


def test_progress_never_goes_back(store) -> None:
    job_id = queue(store)
    store.claim_next()
    store.set_progress(job_id, 0.6, "generate")
    store.set_progress(job_id, 0.4, "generate")
    assert store.get(job_id).progress == 0.6


def test_success_gives_an_unguessable_download_token(store) -> None:
    tokens = set()
    for _ in range(2):
        job_id = queue(store)
        store.claim_next()
        assert store.succeed(job_id, 2.5, {"frames": 50})
        job = store.get(job_id)
        assert job.status == "Succeed" and job.info == {"frames": 50} and len(job.result_token) >= 40
        tokens.add(job.result_token)
    assert len(tokens) == 2


def test_an_idempotency_key_is_per_owner(store) -> None:
    first = queue(store, "a", "k1")
    job, created = store.create(new_job_id(), "a", PARAMS, idempotency_key="k1")
    assert not created and job.id == first
    assert queue(store, "b", "k1") != first
    assert queue(store, "a") != queue(store, "a")  # no key: always a new job


def test_expired_leases_requeue_running_jobs_with_attempts_left_and_fail_the_rest(store) -> None:
    once, twice, waiting = queue(store), queue(store), queue(store)
    store.claim_next()  # once: attempt 1
    store.claim_next()  # twice: attempt 1
    store.requeue(twice, "Triton was unavailable")
    assert store.claim_next().id == twice  # keeps its place before `waiting`; attempt 2
    assert store.recover(max_attempts=2) == ([], [])  # leases still running
    assert store.renew_leases() == 2
    requeued, failed = store.recover(max_attempts=2, now=time.time() + store.lease_s + 1)
    assert requeued == [once] and failed == [twice]
    assert store.get(once).status == "InQueue" and "lease ran out" in store.get(once).reason
    assert store.get(twice).status == "Failed" and "stopped" in store.get(twice).reason
    assert store.get(waiting).status == "InQueue"
    assert store.counts()["InProgress"] == 0


def test_a_job_stopped_on_purpose_keeps_its_attempt(store) -> None:
    job_id = queue(store)
    store.claim_next()
    store.requeue(job_id, "re-queued: the gateway stopped while the job ran", refund=True)
    assert store.get(job_id).attempts == 0
    assert store.claim_next().attempts == 1


def test_concurrent_claims_never_hand_out_a_job_twice(store) -> None:
    ids = {queue(store) for _ in range(40)}
    claimed: list[str] = []

    def claim() -> None:
        while (job := store.claim_next()) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def test_retention_deletes_old_finished_jobs_and_orphan_files_only(tmp_path, store) -> None:
    data = DataDir(tmp_path / "data")
    old, recent, running = queue(store), queue(store), queue(store)
    for job_id in (old, recent, running):
        staged = data.staging()
        (staged / "video").write_bytes(b"v")
        (staged / "audio").write_bytes(b"a")
        data.adopt(staged, job_id)
    for _ in range(3):
        store.claim_next()
    for job_id in (old, recent):
        data.write_result(job_id, b"mp4")
        store.succeed(job_id, 1.0, {})
    orphan = data.result(new_job_id())
    orphan.write_bytes(b"left over")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    deleted = data.cleanup(store, retention_s=1800, now=time.time() + 1000)  # `old` and `recent` finished ~now
    assert deleted == 0 and data.result(old).is_file()
    deleted = data.cleanup(store, retention_s=1800, now=time.time() + 2000)
    assert deleted == 2
    assert store.get(old) is None and not data.result(old).exists() and not data.inputs(old).exists()
    assert store.get(running).status == "InProgress" and data.video(running).is_file()
    assert not orphan.exists()


@pytest.mark.parametrize("value", ["../x", "0" * 31, "0" * 33, "A" * 32, "0" * 31 + "/", "", "0" * 32 + "\n"])
def test_paths_are_built_only_from_ids_of_our_shape(tmp_path, value) -> None:
    assert not is_job_id(value)
    with pytest.raises(ValueError):
        DataDir(tmp_path).inputs(value)
    with pytest.raises(ValueError):
        DataDir(tmp_path).result(value)
    assert is_job_id(new_job_id())


def test_keys_come_from_the_environment_and_a_file_as_plain_keys_or_digests(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "alpha, beta")
    key_file = tmp_path / "keys"
    key_file.write_text(f"# comment\ngamma\nsha256:{digest('delta').hex()}\n\n")
    keys = ApiKeys.load("TEST_KEYS", key_file)
    owners = [keys.owner(key) for key in ("alpha", "beta", "gamma", "delta")]
    assert None not in owners and len(set(owners)) == 4
    assert "alpha" not in owners[0] and len(owners[0]) == 16
    assert keys.owner("alpha ") is None and keys.owner("") is None and keys.owner("ALPHA") is None
    assert ApiKeys.load("TEST_KEYS_UNSET", None).owner("alpha") is None


def test_a_malformed_digest_entry_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "sha256:abc")
    with pytest.raises(KeyConfigError):
        ApiKeys.load("TEST_KEYS", None)


def test_the_local_key_is_made_once_private_and_reused(tmp_path) -> None:
    path = tmp_path / "data" / "local_api_key"
    key = local_key(path)
    assert len(key) >= 40 and local_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600


def test_settings_come_from_serving_yaml_with_overrides(tmp_path) -> None:
    settings = GatewaySettings.load(port=9999, data_dir=tmp_path)
    assert settings.port == 9999 and settings.data_dir == tmp_path
    assert settings.max_body_bytes == 200 * 1024 * 1024
    assert settings.triton_grpc.endswith(":8001")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("aGVsbG8=", b"hello"), ("aGVs\nbG8=", b"hello"), ("data:video/mp4;base64,aGVsbG8=", b"hello")],
)
def test_base64_accepts_line_breaks_and_data_urls(text, expected) -> None:
    assert decode_base64(text, "video_source") == expected


@pytest.mark.parametrize("text", ["aGVsbG8", "aGVsbG8=!", "héllo", "", "====", "data:video/mp4;base64,"])
def test_malformed_or_empty_base64_is_invalid_input(text) -> None:
    with pytest.raises(InvalidInput, match="video_source"):
        decode_base64(text, "video_source")


def test_content_checks_use_the_bytes_not_the_name(tmp_path) -> None:
    video = write_video(tmp_path / "clip.mp4", demo_frames(5)).rename(tmp_path / "clip.wav")  # named like audio
    audio = write_wav(tmp_path / "speech.wav", speech(0.3)).rename(tmp_path / "speech.mp4")  # named like a video
    check_video(video, "video_source")
    check_audio(audio, "audio_source")
    with pytest.raises(InvalidInput, match="video_source"):
        check_video(audio, "video_source")
    with pytest.raises(InvalidInput, match="audio_source has no audio stream"):
        check_audio(video, "audio_source")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(InvalidInput) as raised:
        check_video(truncated, "video_source")
    assert str(tmp_path) not in str(raised.value)
    text = tmp_path / "notes.mp4"
    text.write_bytes(base64.b64encode(os.urandom(3000)))
    for check, field in ((check_video, "video_source"), (check_audio, "audio_source")):
        with pytest.raises(InvalidInput, match=field):
            check(text, field)
