"""What keeps one launcher's processes apart from another's, on real processes: children that die with
their launcher, PID records that a reused PID does not fool, the work folder's locked PID file, taken
ports, kept logs. The same guards end to end, with Triton: ``tests/e2e/test_serve_up.py``."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from gateway.launcher.logfiles import rotate
from gateway.launcher.pidfile import PidFile, WorkFolderInUse
from gateway.launcher.ports import Listener, listens, taken
from gateway.launcher.processes import ProcessRecord
from gateway.launcher.shm import REGION_PREFIX, SHM_DIR, record_regions
from gateway.launcher.triton_server import (
    REGIONS_FILE,
    TritonError,
    TritonServer,
    TritonSettings,
)

LAUNCHER = """
import os, subprocess, sys, time
from pathlib import Path
from gateway.launcher.pidfile import PidFile
from gateway.launcher.processes import ProcessRecord, die_with_parent
pid_file = PidFile.claim(Path(sys.argv[1]))
child = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=die_with_parent())
pid_file.record(launcher=ProcessRecord.of(os.getpid()), triton=ProcessRecord.of(child.pid))
print(child.pid, flush=True)
time.sleep(60)
"""
"""A launcher in miniature: claims a PID file, starts a child that should die with it, records both."""


def _gone(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_killed_launcher_takes_its_child_along_and_frees_its_pid_file(tmp_path: Path) -> None:
    path = tmp_path / "triton.pid"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(launcher.stdout.readline())
        with pytest.raises(WorkFolderInUse, match=f"pid {launcher.pid}: "):
            PidFile.claim(path)
        launcher.kill()
        launcher.wait()
        assert _gone(child)  # SIGTERM from the kernel when its launcher died
        claimed = PidFile.claim(path)  # the lock went with the launcher; its records stay for the next one
        assert claimed.previous["launcher"].pid == launcher.pid
        assert claimed.previous["triton"].pid == child and claimed.previous["triton"].process() is None
        claimed.release()
        assert not path.exists()
    finally:
        launcher.kill()
        launcher.wait()


def test_a_record_matches_only_the_process_it_was_taken_from() -> None:
    record = ProcessRecord.of(os.getpid())
    assert record.process() is not None
    assert ProcessRecord.from_json(record.to_json()) == record
    assert dataclasses.replace(record, started=record.started - 1).process() is None  # same PID, another process
    assert dataclasses.replace(record, command=("other",)).process() is None
    child = subprocess.Popen(["sleep", "60"])
    child_record = ProcessRecord.of(child.pid)
    child.kill()
    child.wait()
    assert child_record.process() is None


def test_a_child_is_recorded_by_its_argv_even_after_it_exited() -> None:
    """A server that dies at once is a zombie when its launcher records it: no command line can be read then."""
    child = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 30
    try:
        while psutil.Process(child.pid).cmdline() != ["sleep", "60"]:  # until the exec is done (empty meanwhile)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ProcessRecord.of(child.pid, ("sleep", "60")) == ProcessRecord.of(child.pid)  # the argv is what is read
    finally:
        child.kill()
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # killed, not yet waited for
        assert time.monotonic() < deadline
        time.sleep(0.01)
    record = ProcessRecord.of(child.pid, ("sleep", "60"))
    assert record.command == ("sleep", "60")
    assert record.process() is None  # exited
    child.wait()


def test_a_taken_port_is_reported_with_its_holder() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        assert listens(os.getpid(), port)
        [message] = taken([Listener("Triton gRPC", "127.0.0.1", port)])
        assert message.startswith(f"Triton gRPC port {port} on 127.0.0.1 is in use by pid {os.getpid()}: ")
    assert taken([Listener("Triton gRPC", "127.0.0.1", port)]) == []


def test_logs_of_earlier_runs_are_kept_up_to_the_configured_count(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    for run in range(4):
        rotate(log, keep=2)
        log.write_text(f"run {run}")
    assert [path.name for path in sorted(tmp_path.iterdir())] == ["triton.log", "triton.log.1", "triton.log.2"]
    assert [(tmp_path / name).read_text() for name in ("triton.log", "triton.log.1", "triton.log.2")] == ["run 3", "run 2", "run 1"]



def test_the_next_launcher_removes_the_shared_memory_a_killed_one_recorded(tmp_path: Path) -> None:
    """Its server and stubs are gone (killed): only the work folder's record names their regions."""
    ours, other = (SHM_DIR / f"{REGION_PREFIX}{uuid.uuid4()}" for _ in range(2))
    ours.write_bytes(b"x")
    other.write_bytes(b"x")  # another server's region, not in the record
    try:
        record_regions(tmp_path / REGIONS_FILE, [ours.name, "../../etc/passwd"])
        with socket.socket() as holder:  # the launcher then refuses to start: a taken port
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            settings = TritonSettings.load(device="cpu", weights="tiny", workdir=tmp_path, http_port=port,
                                           grpc_port=port, metrics_port=port)
            with pytest.raises(TritonError, match="in use"):
                TritonServer(settings).start()
        assert not ours.exists() and other.exists()
        assert not (tmp_path / REGIONS_FILE).exists()
    finally:
        ours.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
