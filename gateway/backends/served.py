"""Which weight set Triton serves (``tiny-demo``, ``latentsync-1.5`` …), so that every answer can say it.

The ``lipsync`` model decides at load time (real weights when present, random demo weights otherwise),
so the gateway asks it: once at start, on a background thread that retries until Triton answers, and
again on every successful readiness check, which also notices a Triton restarted with other weights.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from gateway.backends.base import JobBackend
from lipsync.config import load_config, run_defaults
from lipsync.contract import OPTIONS
from lipsync.media import MediaSettings
from lipsync.weights import load_weights_config

log = logging.getLogger(__name__)


def demo_weights() -> str:
    """The label of the random demo weights (``configs/weights.yaml``, version ``tiny``)."""
    return load_weights_config().version("tiny").label


def served_defaults(weights: str | None, media: MediaSettings) -> dict[str, Any]:
    """What a job that leaves options out gets from a server serving ``weights`` (a label; ``None``: not known):
    the contract's own defaults, ``media``'s crf and the served UNet config's ``run`` section, the one place
    each is decided (the gateway only shows them)."""
    defaults = {option.name: option.default for option in OPTIONS if option.rest and option.default is not None}
    defaults["crf"] = media.crf
    versions = [spec for spec in load_weights_config().versions.values() if spec.label == weights]
    if versions:
        defaults |= run_defaults(load_config(versions[0].unet_config))
    return defaults


class ServedWeights:
    """The last answer of Triton's ``lipsync`` model to "which weights?"; ``None`` until it answered."""

    def __init__(self, backend: JobBackend, retry_s: float = 2.0) -> None:
        self.backend, self.retry_s = backend, retry_s
        self.value: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._until_known, name="served-weights", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def refresh(self) -> str | None:
        """Ask Triton now; keeps the last answer when it cannot tell."""
        try:
            self.value = self.backend.weights()
        except Exception as exc:  # noqa: BLE001 - any failure to ask means "not known now"
            log.debug("served weights unknown: %s", exc)
        return self.value

    def _until_known(self) -> None:
        while self.value is None and not self._stop.is_set():
            if self.refresh() is None:
                self._stop.wait(self.retry_s)
