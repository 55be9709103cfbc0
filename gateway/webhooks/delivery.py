"""Telling a client's ``webhook_url`` that its job finished: a signed JSON POST from a durable outbox.

When a job ends its webhook becomes a row of the job table's outbox (:meth:`JobStore.enqueue_webhook`)
before anything is sent, so a delivery survives restarts. One event-loop thread sends them:

- Every attempt has one deadline for all of it (``webhook_timeout_s``: resolving, connecting, TLS,
  sending, the response's status line and headers); a receiver that trickles bytes is cut off there.
  The body of the answer is never read.
- At most ``webhook_concurrency`` attempts are in flight, and at most ``webhook_per_owner`` of one
  API key's jobs, so slow receivers of one key cannot take every slot from the others.
- A failed attempt (non-2xx, network error, deadline, refused address) is retried after
  ``webhook_backoff_s``, doubled each time up to ``webhook_backoff_max_s``, until
  ``webhook_attempts``; the next attempt time is in the outbox, so back-off survives restarts too.
- The target is checked again (:class:`AddressPolicy`) before every attempt and the request goes to
  the address that was checked; redirects are not followed, proxies from the environment not used,
  connections not reused (a pooled TLS connection must not carry another host's request).
- Stopping cancels attempts in flight at once: their rows stay pending and the next start sends
  them. Delivery is therefore at least once; receivers drop repeats by ``webhook-id``.

The outcome also lands in the job's ``webhook_state`` (``pending``, ``delivered``, ``failed: …``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import httpx2
from pydantic import BaseModel

from gateway.core.settings import GatewaySettings
from gateway.store import Delivery, Job, JobStore, StoreUnavailable
from gateway.webhooks.signing import Signer
from gateway.webhooks.targets import AddressPolicy, Destination, WebhookRefused

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "lipsync-serve-webhook"
_STOP_JOIN_S = 5.0
"""How long stopping waits for the delivery thread to cancel its attempts (cancelling is immediate)."""


def backoff_s(attempts: int, first_s: float, max_s: float) -> float:
    """The wait after the ``attempts``-th failed attempt: ``first_s``, doubled each time, at most ``max_s``."""
    return min(max_s, first_s * 2 ** (attempts - 1))


class Webhooks:
    def __init__(self, store: JobStore, settings: GatewaySettings, signer: Signer, policy: AddressPolicy) -> None:
        self.store = store
        self.settings = settings
        self.signer = signer
        self.policy = policy
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task | None = None
        self._started = threading.Event()

    def admit(self, url: str | None) -> str | None:
        """At submit: ``url`` if the gateway may call it, else :class:`WebhookRefused` (the client's 400)."""
        if url is None:
            return None
        self.policy.destination(url)
        return url

    def send(self, job: Job, payload: BaseModel) -> None:
        """Queue ``job``'s webhook (committed before this returns) and let the delivery thread know."""
        if job.webhook_url:
            self.send_to(job.id, job.owner, job.webhook_url, payload)

    def send_to(self, subject_id: str, owner: str, url: str, payload: BaseModel) -> None:
        """Queue the one webhook of a job or batch ``subject_id`` and let the delivery thread know."""
        self.store.enqueue_webhook(subject_id, owner, url, payload.model_dump_json())
        self.wake()

    def wake(self) -> None:
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the next start sends it
                self._loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._dispatch(),), name="webhooks", daemon=True)
        self._thread.start()
        self._started.wait()

    def close(self) -> None:
        """Cancel what is in flight and stop; pending deliveries stay in the outbox, handed back for the next
        start (or another gateway)."""
        if self._loop is not None and self._main is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._main.cancel)
        if self._thread is not None:
            self._thread.join(_STOP_JOIN_S)
            with contextlib.suppress(StoreUnavailable):  # then their leases run out instead
                self.store.release_webhooks()

    async def _dispatch(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._main = asyncio.current_task()
        self._started.set()
        running: dict[str, asyncio.Task] = {}
        owners: Counter[str] = Counter()
        limits = httpx2.Limits(max_keepalive_connections=0)
        client = httpx2.AsyncClient(trust_env=False, follow_redirects=False, limits=limits, timeout=None)
        try:
            while True:
                try:
                    await self._step(client, running, owners)
                except StoreUnavailable as exc:
                    log.warning("webhook delivery paused: the job database is unavailable (%s)", exc)
                    await asyncio.sleep(self.settings.store_retry_s)
                except Exception:
                    log.exception("webhook delivery loop")
                    await asyncio.sleep(self.settings.webhook_backoff_s)
        except asyncio.CancelledError:
            pass
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            await client.aclose()

    async def _step(self, client: httpx2.AsyncClient, running: dict[str, asyncio.Task], owners: Counter[str]) -> None:
        """Start what is due, then sleep until something is queued, an attempt ends, or the next retry is due."""
        assert self._wake is not None
        self._wake.clear()
        await self._start_due(client, running, owners)
        if len(running) >= self.settings.webhook_concurrency:
            await self._wake.wait()  # an attempt ending frees a slot
            return
        next_due = await self._store(self.store.next_webhook_due, tuple(running), self._saturated(owners))
        timeout = None if next_due is None else next_due - time.time()
        if timeout is not None and timeout <= 0:
            return  # became due meanwhile
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _saturated(self, owners: Counter[str]) -> tuple[str, ...]:
        return tuple(owner for owner, count in owners.items() if count >= self.settings.webhook_per_owner)

    async def _start_due(
        self, client: httpx2.AsyncClient, running: dict[str, asyncio.Task], owners: Counter[str]
    ) -> None:
        """Start the due deliveries that the global and per-owner caps leave room for."""
        per_owner, free = self.settings.webhook_per_owner, self.settings.webhook_concurrency - len(running)
        if free <= 0:
            return
        # Each owner brings at most per_owner rows (saturated owners none), so this many rows hold enough
        # owners to fill every free slot.
        due = await self._store(
            self.store.due_webhooks,
            time.time(),
            tuple(running),
            self._saturated(owners),
            per_owner,
            free * per_owner,
        )
        for delivery in due:
            if len(running) >= self.settings.webhook_concurrency:
                break
            if owners[delivery.owner] >= per_owner:
                continue
            owners[delivery.owner] += 1
            task = asyncio.create_task(self._deliver(client, delivery))
            running[delivery.id] = task
            task.add_done_callback(functools.partial(self._finished, delivery, running, owners))

    def _finished(
        self,
        delivery: Delivery,
        running: dict[str, asyncio.Task],
        owners: Counter[str],
        _: asyncio.Task,
    ) -> None:
        running.pop(delivery.id, None)
        owners[delivery.owner] -= 1
        if owners[delivery.owner] <= 0:
            del owners[delivery.owner]
        assert self._wake is not None
        self._wake.set()

    async def _deliver(self, client: httpx2.AsyncClient, delivery: Delivery) -> None:
        """One attempt within the deadline, then its outcome in the outbox."""
        deadline_s = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(deadline_s):
                error = await self._post(client, delivery)
        except TimeoutError:
            error = f"no answer within {deadline_s:g} s"
        except WebhookRefused as exc:
            error = f"refused: {exc}"
        except (httpx2.HTTPError, OSError) as exc:
            error = type(exc).__name__
        except Exception as exc:
            log.exception("webhook for job %s: unexpected error", delivery.job_id)
            error = f"internal error: {type(exc).__name__}"
        attempts = delivery.attempts + 1
        if error is None:
            await self._store(self.store.webhook_delivered, delivery.id)
            return
        log.warning(
            "webhook for job %s, attempt %d/%d: %s", delivery.job_id, attempts, self.settings.webhook_attempts, error
        )
        if attempts >= self.settings.webhook_attempts:
            await self._store(self.store.webhook_failed, delivery.id, error)
        else:
            wait = backoff_s(attempts, self.settings.webhook_backoff_s, self.settings.webhook_backoff_max_s)
            await self._store(self.store.webhook_retry, delivery.id, error, time.time() + wait)

    async def _post(self, client: httpx2.AsyncClient, delivery: Delivery) -> str | None:
        """POST to the checked addresses in turn (the next one only if connecting failed); None on a 2xx."""
        destination: Destination = await _in_daemon_thread(self.policy.destination, delivery.url)
        headers = (
            destination.headers
            | self.signer.headers(delivery.id, delivery.body)
            | {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
            }
        )
        body = delivery.body.encode()
        for index, address in enumerate(destination.addresses):
            try:
                async with client.stream(
                    "POST",
                    destination.url(address),
                    content=body,
                    headers=headers,
                    extensions=destination.extensions,
                ) as response:
                    return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
            except httpx2.ConnectError:
                if index == len(destination.addresses) - 1:
                    raise
        raise AssertionError("a destination has at least one address")

    @staticmethod
    async def _store(function: Callable[..., T], *args: Any) -> T:
        """A job-table call off the event loop (it may wait for the table's lock)."""
        return await asyncio.to_thread(function, *args)


async def _in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a daemon thread: a DNS lookup that hangs is abandoned at the deadline and never
    holds the process's exit (executor threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result, error = None, None
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while this ran: nobody waits for it
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="webhook-dns", daemon=True).start()
    return await future
