"""Child processes that do not outlive their launcher, and records that recognise a process later.

A PID alone does not identify a process: once it exits, the kernel may hand the number to another
one. :class:`ProcessRecord` keeps the start time and command line beside it, and
:meth:`ProcessRecord.process` finds the process only when all three still match.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

PR_SET_PDEATHSIG = 1
"""``prctl`` option (``linux/prctl.h``): the signal a process gets when the thread that started it exits."""


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    started: float
    """``psutil`` creation time (seconds since the epoch, clock-tick resolution)."""
    command: tuple[str, ...]

    @classmethod
    def of(cls, pid: int, command: tuple[str, ...] | None = None) -> ProcessRecord:
        """The record of the running process ``pid``; a child started with a known ``command`` (its argv)
        may give it, since a child that already exited (a zombie until it is waited for) has no command line
        left to read, only its start time."""
        process = psutil.Process(pid)
        return cls(pid, process.create_time(), command if command is not None else tuple(process.cmdline()))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(int(data["pid"]), float(data["started"]), tuple(data["command"]))

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "command": list(self.command)}

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or ``None`` (gone, or its PID now belongs to another)."""
        try:
            process = psutil.Process(self.pid)
            if (
                process.create_time() == self.started
                and tuple(process.cmdline()) == self.command
                and not _exited(process)
            ):
                return process
        except psutil.Error:
            pass
        return None

    def describe(self) -> str:
        return f"pid {self.pid}: {' '.join(self.command)}"


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``signum`` when the thread that
    started it exits, so a launcher killed with SIGKILL does not leave the child behind (Linux only).

    The parent's thread, not its process, is what the kernel watches: start such children from a thread
    that lives as long as they should (the main thread).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def kill_and_wait(processes: Iterable[psutil.Process], timeout_s: float = 10) -> list[psutil.Process]:
    """SIGKILL ``processes`` and wait until they are gone; those still there after ``timeout_s``."""
    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    deadline = time.monotonic() + timeout_s
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [process for process in alive if not _exited(process)]
    return alive


def _exited(process: psutil.Process) -> bool:
    """Gone, or a zombie (it holds no ports or files any more; only its parent's wait is missing)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
