"""The data directory: the job table, each job's inputs and its result, and their retention.

Layout under ``data_dir``: ``jobs.db``, ``incoming/`` (uploads being checked), ``inputs/<id>/video``
and ``inputs/<id>/audio``, ``results/<id>.mp4``. Paths are built only from ids this gateway made
(:func:`gateway.store.new_job_id`); a request's id is checked against that shape before it is used.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from gateway.store import JobStore

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(value: str) -> bool:
    return _JOB_ID.fullmatch(value) is not None


class DataDirFull(Exception):
    """The data folder has less free space than it keeps (``min_free_mb``), or ran out; the message says so."""


def is_out_of_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


class DataDir:
    def __init__(self, root: Path, min_free_mb: float = 0) -> None:
        self.root = root
        self.reserve = int(min_free_mb * 2**20)
        """Bytes of free space that new inputs and results must leave (the job table's room to commit)."""
        for folder in (self.incoming, self.root / "inputs", self.root / "results"):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "jobs.db"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def staging(self) -> Path:
        """A fresh private folder for one request's uploads, moved into place by :meth:`adopt`."""
        return Path(tempfile.mkdtemp(dir=self.incoming))

    def inputs(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError("not a job id")
        return self.root / "inputs" / job_id

    def video(self, job_id: str) -> Path:
        return self.inputs(job_id) / "video"

    def audio(self, job_id: str) -> Path:
        return self.inputs(job_id) / "audio"

    def result(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError("not a job id")
        return self.root / "results" / f"{job_id}.mp4"

    def adopt(self, staged: Path, job_id: str) -> None:
        """Make a staging folder (holding ``video`` and ``audio``) the inputs of ``job_id``."""
        staged.rename(self.inputs(job_id))

    def check_space(self, needed: int = 0) -> None:
        """Raise :class:`DataDirFull` unless ``needed`` bytes fit with :attr:`reserve` left free."""
        free = shutil.disk_usage(self.root).free
        if free - needed < self.reserve:
            raise DataDirFull(
                f"the data folder has {free / 2**20:,.1f} MiB free and keeps {self.reserve / 2**20:,.0f} MiB "
                f"(min_free_mb){f' beside {needed / 2**20:,.1f} MiB to write' if needed else ''}"
            )

    def write_result(self, job_id: str, video: bytes) -> None:
        """Write then rename, so a result file is either complete or absent; :class:`DataDirFull` when it
        does not fit (nothing of it is left)."""
        self.check_space(len(video))
        path = self.result(job_id)
        partial = path.with_suffix(".part")
        try:
            partial.write_bytes(video)
            partial.rename(path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            if is_out_of_space(exc):
                raise DataDirFull(f"the data folder ran out of space ({exc.strerror})") from None
            raise

    def drop_inputs(self, job_id: str) -> None:
        shutil.rmtree(self.inputs(job_id), ignore_errors=True)

    def drop(self, job_id: str) -> None:
        self.drop_inputs(job_id)
        self.result(job_id).unlink(missing_ok=True)
        self.result(job_id).with_suffix(".part").unlink(missing_ok=True)

    def cleanup(self, store: JobStore, retention_s: float, now: float | None = None) -> int:
        """Delete jobs finished more than ``retention_s`` ago (row and files), and files no job owns.

        Returns how many jobs were deleted.
        """
        now = time.time() if now is None else now
        expired = store.delete_finished(now - retention_s)
        for job_id in expired:
            self.drop(job_id)
        known = store.all_ids()
        # Files no job row owns (a request or job that died midway); only old ones, so that a request
        # between moving its inputs into place and creating its row keeps them.
        orphans = [path for path in (self.root / "inputs").iterdir() if path.name not in known]
        orphans += [path for path in (self.root / "results").iterdir() if path.name.split(".")[0] not in known]
        orphans += list(self.incoming.iterdir())
        for path in orphans:
            if now - path.stat().st_mtime <= retention_s:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if expired:
            log.info("retention: deleted %d finished jobs", len(expired))
        return len(expired)
