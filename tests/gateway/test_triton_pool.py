"""Jobs spread over several Triton endpoints (:mod:`gateway.backends.triton_pool`): the selection policy and the
health cache on their own, the pool on stand-in endpoints, then real jobs on the session Triton beside
an endpoint where nothing listens."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from support.clips import (
    DEMO_AUDIO,
    DEMO_VIDEO,
    demo_frames,
    speech,
    write_video,
    write_wav,
)

from gateway.api.app import triton_backend
from gateway.backends.base import TritonBackend
from gateway.backends.triton_client import JobRequest, JobResult, TritonJobError
from gateway.backends.triton_pool import HealthCache, TritonPool, least_loaded
from gateway.core.settings import GatewaySettings
from gateway.launcher.ports import free_port
from lipsync.errors import ErrorKind


def test_least_loaded_picks_the_endpoint_running_fewest_jobs() -> None:
    assert least_loaded(["a", "b", "c"], {"a": 2, "b": 0, "c": 1}, start=0) == "b"
    assert least_loaded(["a", "b", "c"], {"a": 2, "b": 0, "c": 1}, start=2) == "b"


def test_least_loaded_breaks_ties_round_robin_from_start() -> None:
    idle = {"a": 0, "b": 0, "c": 0}
    assert [least_loaded(["a", "b", "c"], idle, start) for start in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert least_loaded(["a", "b", "c"], {"a": 1, "b": 0, "c": 0}, start=0) == "b"
    assert least_loaded(["a", "b", "c"], {"a": 1, "b": 0, "c": 0}, start=2) == "c"


def test_least_loaded_counts_unknown_endpoints_as_idle_and_needs_a_candidate() -> None:
    assert least_loaded(["a", "b"], {"a": 1}, start=0) == "b"
    with pytest.raises(ValueError):
        least_loaded([], {}, start=0)


def test_health_answers_are_kept_for_the_ttl_and_a_mark_replaces_them() -> None:
    now = [0.0]
    asked: list[str] = []
    cache = HealthCache(lambda url: asked.append(url) or True, ttl_s=2.0, clock=lambda: now[0])
    assert cache.ready("a") and cache.ready("a") and asked == ["a"]
    now[0] = 2.5
    assert cache.ready("a") and asked == ["a", "a"]
    cache.mark("a", False)
    assert not cache.ready("a") and asked == ["a", "a"]


class StandIn:
    """An endpoint that answers readiness with ``up`` and runs a job through ``work`` (or fails it unavailable when down)."""

    def __init__(self, name: str, up: bool = True, work: Callable[[], None] = lambda: None) -> None:
        self.name, self.up, self.work = name, up, work
        self.jobs = 0

    def ready(self) -> bool:
        return self.up

    def weights(self) -> str:
        return f"weights-of-{self.name}"

    def run(self, job: JobRequest, on_progress: object, should_cancel: object) -> JobResult:
        if not self.up:
            raise TritonJobError("Triton is unavailable: refused", ErrorKind.UNAVAILABLE)
        self.jobs += 1
        self.work()
        return JobResult(self.name.encode())


def pool_of(*stand_ins: StandIn, ttl_s: float = 60.0) -> TritonPool:
    pool = TritonPool([stand_in.name for stand_in in stand_ins], health_ttl_s=ttl_s)
    pool.backends = {stand_in.name: stand_in for stand_in in stand_ins}
    return pool


JOB = JobRequest(video=b"", audio=b"")


def run(pool: TritonPool) -> bytes:
    return pool.run(JOB, lambda *_: None, lambda: False).video


def test_sequential_jobs_go_round_robin_and_skip_an_endpoint_that_is_not_ready() -> None:
    pool = pool_of(StandIn("a"), StandIn("b"), StandIn("down", up=False), StandIn("c"))
    assert [run(pool) for _ in range(6)] == [b"a", b"b", b"c", b"a", b"b", b"c"]
    assert pool.backends["down"].jobs == 0 and pool.running == dict.fromkeys(pool.urls, 0)


def test_a_job_goes_to_the_endpoint_with_fewest_running_jobs() -> None:
    release = threading.Event()
    busy = StandIn("busy", work=release.wait)
    pool = pool_of(busy, StandIn("free"))
    thread = threading.Thread(target=run, args=(pool,))
    thread.start()
    try:
        while pool.running["busy"] == 0:
            threading.Event().wait(0.01)
        assert [run(pool) for _ in range(3)] == [b"free"] * 3
    finally:
        release.set()
        thread.join()
    assert pool.running == {"busy": 0, "free": 0}


def test_an_endpoint_that_fails_a_job_as_unavailable_is_skipped_until_its_next_check() -> None:
    flaky = StandIn("flaky")
    pool = pool_of(flaky, StandIn("steady"))
    assert pool.ready_urls() == ["flaky", "steady"]
    flaky.up = False  # goes down after its (cached) readiness answer
    with pytest.raises(TritonJobError) as failed:
        run(pool)
    assert failed.value.kind is ErrorKind.UNAVAILABLE and failed.value.retry
    assert [run(pool) for _ in range(3)] == [b"steady"] * 3


def test_the_pool_is_ready_while_one_endpoint_is_and_names_its_weights() -> None:
    pool = pool_of(StandIn("down", up=False), StandIn("up"))
    assert pool.ready() and pool.weights() == "weights-of-up"
    none = pool_of(StandIn("x", up=False), StandIn("y", up=False))
    assert not none.ready()
    with pytest.raises(TritonJobError) as failed:
        run(none)
    assert failed.value.kind is ErrorKind.UNAVAILABLE
    with pytest.raises(TritonJobError):
        none.weights()


def test_endpoints_come_from_the_environment_and_several_make_a_pool(monkeypatch) -> None:
    monkeypatch.setenv("LIPSYNC_TRITON_URLS", "t1:8001, t2:8001")
    settings = GatewaySettings.load()
    assert settings.triton_endpoints == ("t1:8001", "t2:8001")
    assert isinstance(triton_backend(settings), TritonPool)
    assert GatewaySettings.load(triton_urls="t3:8001").triton_endpoints == ("t3:8001",)  # a flag wins
    monkeypatch.delenv("LIPSYNC_TRITON_URLS")
    single = GatewaySettings.load(triton_grpc="triton:8001")
    assert single.triton_endpoints == ("triton:8001",) and isinstance(triton_backend(single), TritonBackend)


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_VIDEO.is_file() and DEMO_AUDIO.is_file()), reason="shared demo fixtures not found")
def test_jobs_succeed_on_the_live_endpoint_and_the_dead_one_is_skipped(triton, tmp_path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    pool = TritonPool([dead, triton.settings.grpc_url], poll_s=0.2, timeout_s=300)
    video = write_video(tmp_path / "clip.mp4", demo_frames(25)).read_bytes()
    audio = write_wav(tmp_path / "speech.wav", speech(1.0)).read_bytes()
    assert pool.ready() and pool.ready_urls() == [triton.settings.grpc_url]
    assert pool.weights() == "tiny-demo"
    for _ in range(2):
        result = pool.run(JobRequest(video=video, audio=audio, inference_steps=1), lambda *_: None, lambda: False)
        assert result.video and result.info["frames"] == 25
    assert pool.running == {dead: 0, triton.settings.grpc_url: 0}
