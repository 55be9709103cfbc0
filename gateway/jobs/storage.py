"""The data directory: the job table, each job's inputs and its result, and their retention.

Layout under ``data_dir``: ``jobs.db``, ``incoming/`` (uploads being checked), ``inputs/<id>/video``
and ``inputs/<id>/audio``, ``results/<id>.mp4``. Paths are built only from ids this gateway made
(:func:`gateway.store.new_job_id`); a request's id is checked against that shape before it is used.
"""

from __future__ import annotations

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


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
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

    def write_result(self, job_id: str, video: bytes) -> None:
        """Write then rename, so a result file is either complete or absent."""
        path = self.result(job_id)
        partial = path.with_suffix(".part")
        partial.write_bytes(video)
        partial.rename(path)

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
