"""Copies the server's output into ``triton.log`` line by line, leaving out lines known to be noise.

A CPU-only host makes Triton's core log an error at start-up (``CudaDriverHelper has not been
initialized.``: it probes CUDA virtual memory whatever the flags say) although nothing is wrong; no
flag turns the probe off, so the launcher drops that line (``configs/serving.yaml``,
``triton.cpu_log_noise``) rather than have users chase it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO


class LogPump:
    """A thread writing ``source`` (the server's stdout and stderr) to ``path``, without lines containing ``drop``."""

    def __init__(self, source: IO[bytes], path: Path, drop: Sequence[str] = ()) -> None:
        self.source = source
        self.path = path
        self.drop = [text.encode() for text in drop]
        self.thread = threading.Thread(target=self._run, name="triton-log", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open(self.path, "ab", buffering=0) as log, self.source:
            for line in self.source:  # ends when the server and every stub holding the pipe have exited
                if not any(text in line for text in self.drop):
                    log.write(line)

    def join(self, timeout_s: float = 5) -> None:
        self.thread.join(timeout_s)
