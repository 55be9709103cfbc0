"""What an ``Idempotency-Key`` is bound to: a fingerprint of the request it was first used with.

As payment APIs do, a key names one request: sending it again with the same request returns the
first job; with a different request (other video, audio or options) it is an error (409), never
silently the first job. The fingerprint is a SHA-256 over the SHA-256 of the video and audio bytes
and the options as validated, so the same job sent as JSON (base64) or as a multipart upload has the
same fingerprint, while leaving an option out differs from sending its default value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import BinaryIO

from gateway.jobs.schemas import SubmitOptions

_CHUNK = 1 << 20


def fingerprint(options: SubmitOptions, video_sha256: str, audio_sha256: str) -> str:
    canonical = json.dumps(
        {"options": options.model_dump(mode="json"), "video": video_sha256, "audio": audio_sha256},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_bytes(data: bytes, target: Path) -> str:
    """Write ``data`` to ``target``; its SHA-256 as hex."""
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def copy_file(source: BinaryIO, target: Path) -> str:
    """Copy an open file to ``target`` in chunks; the SHA-256 of what was copied, as hex."""
    hashed = hashlib.sha256()
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            hashed.update(chunk)
            out.write(chunk)
    return hashed.hexdigest()
