"""``lipsync-serve up``, the README's main command: Triton and the gateway start together, a key is made
when none is configured, it says which weights it serves and when it is ready, and SIGTERM or Ctrl-C stops
both cleanly and quickly, running jobs included. One ``up`` per work folder; a Triton that a killed ``up``
left behind is stopped by the next; taken ports are refused; a Triton that dies takes ``up`` down with it."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from support.clips import demo_frames, speech, write_video, write_wav
from support.tensors import triton_inputs
from tritonclient.utils import InferenceServerException

from gateway.launcher.ports import free_port, listens
from gateway.launcher.shm import SHM_DIR, stub_regions

IDLE_STOP_S = 5
"""The stated bound on stopping an idle ``up``; asserted with :data:`SLOW_MACHINE` slack."""
BUSY_STOP_S = 10
"""The stated bound on stopping an ``up`` whose jobs are running (they are cancelled)."""
SLOW_MACHINE = 2
"""Slack factor for shared CI machines; the measured time is reported either way."""


class Up:
    """One ``lipsync-serve up`` process on the given ports and folders, its output in ``up-<n>.log``."""

    def __init__(self, tmp_path: Path, ports: dict[str, int]) -> None:
        self.tmp_path = tmp_path
        self.ports = ports
        self.workdir = tmp_path / "serve"
        self.data = tmp_path / "data"
        self.process: subprocess.Popen | None = None
        self.log = tmp_path / "up.log"

    def start(self) -> Up:
        p = self.ports
        command = [
            sys.executable, "-m", "gateway.cli", "up", "--device", "cpu", "--weights", "tiny", "--port", str(p["gateway"]),
            "--grpc-port", str(p["grpc"]), "--http-port", str(p["http"]), "--metrics-port", str(p["metrics"]),
            "--workdir", str(self.workdir), "--checkpoints", str(self.tmp_path / "checkpoints"), "--data-dir", str(self.data),
        ]
        env = {name: value for name, value in os.environ.items() if name != "LIPSYNC_API_KEYS"}
        self.log = self.tmp_path / f"up-{len(list(self.tmp_path.glob('up-*.log')))}.log"
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        return self

    def run(self, timeout_s: float = 60) -> int:
        """Start, and wait for an exit (for runs that must refuse)."""
        return self.start().process.wait(timeout_s)

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not _ready(f"http://127.0.0.1:{self.ports['gateway']}/readyz"):
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.5)

    def triton_pid(self, timeout_s: float = 60) -> int:
        """The tritonserver this run recorded in the work folder's PID file."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return json.loads((self.workdir / "triton.pid").read_text())["triton"]["pid"]
            except (OSError, ValueError, KeyError):
                assert self.process.poll() is None, self.output()
                time.sleep(0.2)
        raise AssertionError(f"no Triton recorded:\n{self.output()}")

    @property
    def key(self) -> str:
        return (self.data / "local_api_key").read_text().strip()

    def submit(self, clip: tuple[Path, Path], steps: int) -> str:
        """Upload a job through the gateway; its request id."""
        video, audio = clip
        with open(video, "rb") as v, open(audio, "rb") as a:
            answer = httpx2.post(
                f"http://127.0.0.1:{self.ports['gateway']}/lipsync/upload", files={"video": v, "audio": a},
                data={"inference_steps": str(steps)}, headers={"Authorization": f"Bearer {self.key}"}, timeout=60,
            )
        assert answer.status_code == 200, answer.text
        return answer.json()["request_id"]

    def wait_for(self, job: str, done: Callable[[dict], bool], timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status = httpx2.post(
                f"http://127.0.0.1:{self.ports['gateway']}/lipsync/status", json={"request_id": job},
                headers={"Authorization": f"Bearer {self.key}"}, timeout=10,
            ).json()
            if done(status):
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.5)

    def shm_regions(self) -> set[str]:
        """The Python backend's shared-memory regions of this run's Triton: named on its stubs' command lines."""
        return stub_regions(psutil.Process(self.process.pid).children(recursive=True))

    def interrupt(self) -> tuple[float, int, str]:
        """Ctrl-C: SIGINT, and wait for the exit. Seconds it took, exit code, triton.log written meanwhile."""
        log = self.workdir / "triton.log"
        offset = log.stat().st_size
        started = time.monotonic()
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(120)
        seconds = time.monotonic() - started
        with open(log, "rb") as text:
            text.seek(offset)
            return seconds, code, text.read().decode(errors="replace")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One second of the demo clip at quarter size (25 frames, 2 windows) and its speech."""
    folder = tmp_path_factory.mktemp("clip")
    return write_video(folder / "face.mp4", demo_frames(25, (270, 480))), write_wav(folder / "speech.wav", speech(1.0))


def _assert_stopped_cleanly(seconds: float, bound_s: float, code: int, log: str, regions: set[str], output: str) -> None:
    print(f"lipsync-serve up stopped in {seconds:.1f} s (stated bound {bound_s} s)")
    assert code == 0, output
    assert "Traceback" not in output, output
    assert seconds <= bound_s * SLOW_MACHINE, f"the stop took {seconds:.1f} s\n{output}\n{log}"
    assert [line for line in log.splitlines() if line.startswith("E")] == [], log
    assert "Exit timeout expired" not in log + output, log
    assert "successfully unloaded 'lipsync' version 1" in log, log
    assert "successfully unloaded 'lipsync_unary' version 1" in log, log
    assert regions and not _left(regions), regions


def _left(regions: set[str]) -> list[str]:
    """Those of ``regions`` still in /dev/shm."""
    return [name for name in regions if (SHM_DIR / name).exists()]


def _ports() -> dict[str, int]:
    return {name: free_port() for name in ("gateway", "grpc", "http", "metrics")}


def _gone(pids: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_up_refuses_ports_that_another_process_holds(tmp_path: Path) -> None:
    ports = _ports()
    with socket.create_server(("127.0.0.1", ports["gateway"])), socket.create_server(("127.0.0.1", ports["metrics"])):
        up = Up(tmp_path, ports)
        assert up.run() == 1
    output = up.output()
    assert f"gateway port {ports['gateway']} on 127.0.0.1 is in use by pid {os.getpid()}: " in output
    assert f"Triton metrics port {ports['metrics']} on 127.0.0.1 is in use by pid {os.getpid()}: " in output
    assert not (up.workdir / "triton.log").exists()  # refused before Triton started
    assert not (up.workdir / "triton.pid").exists()  # and the work folder is free again


@pytest.mark.slow
def test_up_starts_triton_and_the_gateway_and_sigterm_stops_both(tmp_path: Path) -> None:
    up, second = Up(tmp_path, _ports()), Up(tmp_path, _ports())
    try:
        up.start().wait_ready()
        port, http = up.ports["gateway"], up.ports["http"]
        key = up.key
        assert key in up.output()  # printed for the user
        assert "weights: tiny demo weights (random weights: the mouth will be noise; put real LatentSync checkpoints in " \
               f"{tmp_path / 'checkpoints'}/" in up.output()
        assert up.output().count("ready at ") == 1
        assert f"ready at http://127.0.0.1:{port} (API key in {up.data / 'local_api_key'})\n" in up.output()
        assert (up.data / "local_api_key").stat().st_mode & 0o777 == 0o600
        status = httpx2.post(
            f"http://127.0.0.1:{port}/lipsync/status", json={"request_id": "0" * 32},
            headers={"Authorization": f"Bearer {key}"}, timeout=10,
        )
        assert status.status_code == 404  # the key is accepted; the job is unknown
        assert httpx2.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5).status_code == 200
        assert second.run() == 1  # the same work folder, while the first serves from it: refused, naming the first
        assert f"is in use by another lipsync-serve (pid {up.process.pid}: " in second.output()
        assert _ready(f"http://127.0.0.1:{port}/readyz")
        regions = up.shm_regions()
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(120) == 0
        assert regions and not _left(regions)
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5)
        assert not (up.workdir / "triton.pid").exists()
    finally:
        up.close()
        second.close()


@pytest.mark.slow
def test_up_stops_the_triton_a_killed_up_left_behind_and_exits_when_its_own_triton_dies(tmp_path: Path) -> None:
    ports = _ports()
    killed, up = Up(tmp_path, ports), Up(tmp_path, ports)
    try:
        killed.start()
        orphan = killed.triton_pid()
        deadline = time.monotonic() + 60
        while not (stubs := [child.pid for child in psutil.Process(orphan).children()]):
            assert time.monotonic() < deadline, killed.output()
            time.sleep(0.2)
        while not (orphaned := killed.shm_regions()):
            assert time.monotonic() < deadline, killed.output()
            time.sleep(0.2)
        # A Triton that outlives its launcher: stopped, it neither exits on the launcher's death nor frees the folder.
        os.kill(orphan, signal.SIGSTOP)
        while psutil.Process(orphan).status() != psutil.STATUS_STOPPED:  # before the launcher's death sends SIGTERM
            time.sleep(0.05)
        killed.process.kill()
        killed.process.wait()

        up.start().wait_ready()
        assert _gone([orphan, *stubs]), up.output()
        assert not _left(orphaned), up.output()  # the killed server's shared memory is gone with it
        regions = up.shm_regions()
        assert f"stopping the Triton left behind in {up.workdir} by an earlier run (pid {orphan}: " in up.output()
        server = up.triton_pid()
        assert server != orphan and listens(server, ports["http"]) and listens(server, ports["grpc"])
        assert f" {orphan} " in (up.workdir / "triton.log.1").read_text()  # the earlier run's log is kept
        assert f" {server} " in (up.workdir / "triton.log").read_text()

        os.killpg(server, signal.SIGKILL)  # Triton dies under a running up: up says so and exits 1
        assert up.process.wait(60) == 1
        assert f"tritonserver (pid {server}) was killed by SIGKILL" in up.output()
        assert not _ready(f"http://127.0.0.1:{ports['gateway']}/readyz")
        assert regions and not _left(regions)
    finally:
        killed.close()
        up.close()


def _accepted_and_refused_requests_on_both_models(up: Up, clip: tuple[Path, Path]) -> None:
    """Straight to Triton: a job and a refused request on ``lipsync_unary`` (HTTP) and a refused one on
    ``lipsync`` (gRPC stream); the gateway's job is the accepted ``lipsync`` one."""
    video, audio = (path.read_bytes() for path in clip)
    unary = httpclient.InferenceServerClient(f"127.0.0.1:{up.ports['http']}", network_timeout=300)
    try:
        result = unary.infer("lipsync_unary", triton_inputs(httpclient, {"VIDEO": video, "AUDIO": audio, "STEPS": np.int32(1)}))
        assert json.loads(result.as_numpy("INFO")[0])["frames"] == 25
        with pytest.raises(InferenceServerException, match="finite"):
            unary.infer("lipsync_unary", triton_inputs(httpclient, {"VIDEO": video, "AUDIO": audio, "GUIDANCE": np.float32("nan")}))
        with pytest.raises(InferenceServerException, match="invalid input"):
            unary.infer("lipsync_unary", triton_inputs(httpclient, {"VIDEO": b"not a video" * 10, "AUDIO": audio}))
    finally:
        unary.close()
    answers: queue.Queue = queue.Queue()
    stream = grpcclient.InferenceServerClient(f"127.0.0.1:{up.ports['grpc']}")
    try:
        stream.start_stream(callback=lambda result, error: answers.put((result, error)))
        stream.async_stream_infer("lipsync", triton_inputs(grpcclient, {"VIDEO": video, "AUDIO": audio, "CRF": np.int32(99)}))
        while (answer := answers.get(timeout=60))[1] is None:  # STAGE "failed", then the error
            pass
        assert "crf must be in" in str(answer[1])
        stream.stop_stream()
    finally:
        stream.close()


@pytest.mark.slow
def test_ctrl_c_after_jobs_and_refusals_stops_up_within_seconds_and_leaves_nothing_behind(
    tmp_path: Path, tiny_clip: tuple[Path, Path], record_property
) -> None:
    """A refused ``lipsync_unary`` request once kept ``lipsync`` loaded (its BLS stream was left unread),
    so every later stop waited out Triton's exit timeout."""
    up = Up(tmp_path, _ports())
    try:
        up.start().wait_ready()
        regions = up.shm_regions()
        job = up.submit(tiny_clip, steps=2)
        assert up.wait_for(job, lambda status: status["status"] != "InQueue" and status["status"] != "InProgress")["status"] == "Succeed"
        _accepted_and_refused_requests_on_both_models(up, tiny_clip)
        seconds, code, log = up.interrupt()
        record_property("stop_seconds", round(seconds, 2))
        _assert_stopped_cleanly(seconds, IDLE_STOP_S, code, log, regions, up.output())
        # The terminal: a line when the job started and one when it ended, none per status poll, and a last
        # line once everything stopped.
        lines = up.output().splitlines()
        assert f"job {job} started" in lines, up.output()
        assert [line for line in lines if line.startswith(f"job {job} succeeded in ")], up.output()
        assert not [line for line in lines if "/lipsync/status" in line], up.output()
        assert lines[-1] == "stopped: Triton and the gateway", up.output()
    finally:
        up.close()


@pytest.mark.slow
def test_ctrl_c_after_refusals_cancels_running_jobs_and_stops_up_within_the_stated_bound(
    tmp_path: Path, tiny_clip: tuple[Path, Path], record_property
) -> None:
    up = Up(tmp_path, _ports())
    try:
        up.start().wait_ready()
        regions = up.shm_regions()
        _accepted_and_refused_requests_on_both_models(up, tiny_clip)
        job = up.submit(tiny_clip, steps=200)  # minutes on this CPU: still running when the stop comes
        running = up.wait_for(job, lambda status: status["progress"] >= 0.2 or status["status"] not in ("InQueue", "InProgress"))
        assert running["status"] == "InProgress", running  # faces found, denoising
        seconds, code, log = up.interrupt()
        record_property("stop_seconds", round(seconds, 2))
        _assert_stopped_cleanly(seconds, BUSY_STOP_S, code, log, regions, up.output())
        lines = up.output().splitlines()
        assert [line for line in lines if line.startswith(f"job {job} stopped after ")
                and line.endswith(" and re-queued: the gateway stopped while the job ran")], up.output()
        assert lines[-1] == "stopped: Triton and the gateway", up.output()
    finally:
        up.close()
