"""The one exception family of a lip-sync job, classified by kind rather than by base class.

Every error a job can end with is a :class:`LipSyncError` carrying an :class:`ErrorKind`; what each
kind becomes on the wire (HTTP status, Triton error code, whether a retry may help) is one table,
:data:`lipsync.contract.FAILURES`. Anything else that escapes a job is ``internal``.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    BAD_INPUT = "bad_input"
    """The caller can fix it: an unreadable file, no face, an option out of range."""
    NOT_FOUND = "not_found"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    """The service cannot take the job now; the same request may succeed later."""
    INTERNAL = "internal"
    """The server's fault (a bug, a misconfiguration): the message is for its operator."""


class LipSyncError(Exception):
    """Root of the job errors; ``kind`` comes from the subclass or is given explicitly."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = ErrorKind(kind)


class BadInput(LipSyncError, ValueError):
    """An input or option the caller must fix. Also a ``ValueError``, as Python code expects of bad arguments."""

    kind = ErrorKind.BAD_INPUT


class NotFound(LipSyncError):
    kind = ErrorKind.NOT_FOUND


class JobCancelled(LipSyncError):
    """The caller's cancellation check returned True; raised between windows or DDIM steps."""

    kind = ErrorKind.CANCELLED


class Unavailable(LipSyncError):
    kind = ErrorKind.UNAVAILABLE


class WeightsError(RuntimeError):
    """A checkpoint file is missing, corrupt, or not the file the weights config describes.

    Raised where weights are fetched or loaded (:mod:`lipsync.weights` and the loaders), not by a job."""
