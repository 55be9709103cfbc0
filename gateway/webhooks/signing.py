"""Signing webhooks the Standard Webhooks way (https://www.standardwebhooks.com/), with its reference package.

Every delivery attempt carries ``webhook-id`` (the same for every attempt of one delivery, so a
receiver can drop repeats), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``). The secret is one per
deployment: ``whsec_<base64 of 24–64 random bytes>``, from an environment variable, or a file the
gateway writes on first start (mode 0600) and keeps, like the generated API key.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)
"""The secret's length range in bytes (Standard Webhooks); a generated one has the most."""


class SecretError(ValueError):
    """A configured webhook secret is malformed."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES[1])).decode()


def check_secret(secret: str) -> str:
    """``secret`` if it is ``whsec_`` + base64 of 24–64 bytes; else :class:`SecretError` (never echoing it)."""
    if not secret.startswith(SECRET_PREFIX):
        raise SecretError(f"the webhook secret must start with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"the webhook secret must be {SECRET_PREFIX} + base64") from None
    if not SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1]:
        raise SecretError(f"the webhook secret must hold {SECRET_BYTES[0]} to {SECRET_BYTES[1]} bytes")
    return secret


def load_secret(env_var: str, path: Path) -> str:
    """The secret in ``$env_var``; without one, the secret kept in ``path``, made there on first use."""
    configured = os.environ.get(env_var, "").strip()
    if configured:
        return check_secret(configured)
    if path.is_file():
        return check_secret(path.read_text(encoding="utf-8").strip())
    secret = new_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use that one
        return check_secret(path.read_text(encoding="utf-8").strip())
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(secret + "\n")
    return secret


class Signer:
    """Makes the three Standard Webhooks headers for a body."""

    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(check_secret(secret))

    def headers(self, message_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
        now = now or datetime.now(UTC)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._webhook.sign(message_id, now, body),
        }
