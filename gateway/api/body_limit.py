"""Request body cap as ASGI middleware: by ``Content-Length`` up front, and by counting chunked bodies.

One cap for every route, and larger ones for the paths that take many files at once (a batch); the 413
names the setting that sets the cap.

A body that outgrows the cap while it is read raises an HTTP 413 error inside the app, so FastAPI's
body parsing passes it on (it turns other parse errors into 400) to the app's JSON error handler.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.core.errors import ApiError, send_error

Cap = tuple[int, str]
"""Bytes, and the name of the setting they come from."""


class _TooLarge(HTTPException):
    def __init__(self, cap: Cap) -> None:
        super().__init__(413, _message(cap))


def _message(cap: Cap) -> str:
    limit, setting = cap
    return f"request body larger than {limit / (1024 * 1024):g} MB ({setting})"


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int, setting: str, paths: Mapping[str, Cap] | None = None) -> None:
        self.app = app
        self.cap: Cap = (limit, setting)
        self.paths = dict(paths or {})
        """Caps of particular paths, in place of ``limit``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.paths.get(scope["path"], self.cap)
        limit = cap[0]
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, cap)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(cap)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, cap)

    async def _reject(self, send: Send, cap: Cap) -> None:
        await send_error(send, ApiError(413, _message(cap)))
