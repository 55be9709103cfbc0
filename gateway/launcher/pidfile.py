"""The work folder's PID file: which launcher serves from it and which ``tritonserver`` that launcher started.

The launcher holds an exclusive ``flock`` on the file as long as it lives; the kernel drops the lock
when the launcher exits, however it exits (Triton does not inherit the descriptor). So a held lock
means a live launcher, and a second one refuses to start; a free lock with a recorded Triton that
is still running means a Triton left behind by a launcher that was killed.

The file is rewritten in place, never replaced: a new file would be a new, unlocked inode.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import TextIO

from gateway.launcher.processes import ProcessRecord


class WorkFolderInUse(RuntimeError):
    """Another live launcher holds the work folder."""


class PidFile:
    """A claimed PID file; :meth:`claim` to get one, :meth:`release` when the server has stopped."""

    def __init__(self, path: Path, file: TextIO, previous: dict[str, ProcessRecord]) -> None:
        self.path = path
        self._file = file
        self.previous = previous
        """What the file recorded before this claim (``launcher``, ``triton``), e.g. a Triton left behind."""

    @classmethod
    def claim(cls, path: Path) -> PidFile:
        """Lock ``path`` (created if missing); raise :class:`WorkFolderInUse` naming its holder if another process has it."""
        file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(file.read()).get("launcher")
            file.close()
            raise WorkFolderInUse(
                f"{path.parent} is in use by another lipsync-serve ({holder.describe() if holder else 'pid unknown'}); "
                "stop it first or choose another --workdir"
            ) from None
        return cls(path, file, _parse(file.read()))

    def record(self, **processes: ProcessRecord) -> None:
        """Replace the file's content with ``processes`` (name → record)."""
        self._file.seek(0)
        self._file.truncate()
        json.dump({name: record.to_json() for name, record in processes.items()}, self._file)
        self._file.flush()

    def release(self) -> None:
        """Remove the file (nothing of ours runs any more), then drop the lock."""
        self.path.unlink(missing_ok=True)
        self._file.close()


def _parse(text: str) -> dict[str, ProcessRecord]:
    """The records in ``text``; none from a file that is empty or being rewritten."""
    try:
        return {name: ProcessRecord.from_json(data) for name, data in json.loads(text).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
