"""API keys: read from an environment variable and/or a file, kept only as SHA-256 digests.

A key is given either as itself or as ``sha256:<hex digest>`` (so a key file need not hold secrets).
A request's Bearer key is hashed and compared with every known digest in constant time; the job
owner recorded in the table is a short id derived from the digest, never the key. Secrets from a
request (keys, download tokens) are compared as UTF-8 bytes, so any text a client sends compares
(unequal) instead of raising.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

_PREFIX = "sha256:"


class KeyConfigError(ValueError):
    """A configured key entry is malformed."""


def _utf8(text: str) -> bytes:
    """``text`` as bytes, whatever it holds (lone surrogates included)."""
    return text.encode("utf-8", "surrogatepass")


def digest(key: str) -> bytes:
    return hashlib.sha256(_utf8(key)).digest()


def secure_equal(given: str, expected: str) -> bool:
    """Constant-time equality of two strings of any characters (``hmac.compare_digest`` refuses
    non-ASCII ``str``, so both are compared as bytes)."""
    return hmac.compare_digest(_utf8(given), _utf8(expected))


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, or None for any other value."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def owner_id(key_digest: bytes) -> str:
    """The id jobs are filed under: the digest's first 16 hex digits (not enough to test guesses offline
    faster than against the API, and never the key)."""
    return key_digest.hex()[:16]


def _parse(entry: str) -> bytes:
    entry = entry.strip()
    if entry.startswith(_PREFIX):
        try:
            value = bytes.fromhex(entry[len(_PREFIX) :])
        except ValueError:
            raise KeyConfigError("a sha256: key entry must be 64 hex digits") from None
        if len(value) != 32:
            raise KeyConfigError("a sha256: key entry must be 64 hex digits")
        return value
    return digest(entry)


class ApiKeys:
    """The set of accepted keys, as digests."""

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = list(digests)

    @classmethod
    def load(cls, env_var: str, key_file: str | Path | None, extra: Sequence[str] = ()) -> ApiKeys:
        """Keys from ``$env_var`` (comma-separated), ``key_file`` (one per line, ``#`` comments) and ``extra``."""
        entries = [e for e in os.environ.get(env_var, "").split(",") if e.strip()] + list(extra)
        if key_file:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
            entries += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls([_parse(entry) for entry in entries])

    def __len__(self) -> int:
        return len(self._digests)

    def owner(self, key: str | None) -> str | None:
        """The owner id of ``key``, or None if it is not accepted. Every digest is compared (no early exit)."""
        if key is None:
            return None
        candidate = digest(key)
        match = None
        for known in self._digests:
            if hmac.compare_digest(candidate, known):
                match = known
        return None if match is None else owner_id(match)


LOCAL_KEY_FILE = "local_api_key"
"""In the data directory: the key ``up`` makes when no key is configured."""


def local_key(path: Path) -> str:
    """The key of a local service started without configured keys: read from ``path``, or made and
    saved there (mode 0600) on first use, so it stays the same across restarts."""
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key
