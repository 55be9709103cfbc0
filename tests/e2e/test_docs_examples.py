"""The code blocks of the API docs run as written, against the test server (real Triton and gateway).

Every fenced ``python`` and ``bash`` block of the documents in :data:`DOCUMENTS` runs, unless the line
above it is ``<!-- not-run: why -->``. Python blocks run one by one; a document's bash blocks run in
order in one shell, as a reader pastes them. Both run in a folder holding ``face.mp4`` and
``speech.wav`` and reach the servers through the variables the documents name (``LIPSYNC_URL``,
``LIPSYNC_API_KEY``, ``TRITON_HTTP``, ``TRITON_GRPC``, ``LIPSYNC_WEBHOOK_SECRET``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lipsync.media import VideoReader
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOCUMENTS = ("triton-api.md", "gateway-api.md")
RUN = ("python", "bash")
"""Languages that run; blocks in others (json, yaml) are shown data."""
NOT_RUN = re.compile(r"<!-- not-run: .+ -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)

pytestmark = pytest.mark.slow


def code_blocks(document: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of the blocks of ``document`` that run."""
    text = (DOCS / document).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if match.group(1) in RUN and not NOT_RUN.fullmatch(above.strip()):
            blocks.append((match.group(1), match.group(2), line))
    return blocks


PYTHON_BLOCKS = [(doc, code, line) for doc in DOCUMENTS for language, code, line in code_blocks(doc) if language == "python"]
BASH_DOCUMENTS = [doc for doc in DOCUMENTS if any(language == "bash" for language, _, _ in code_blocks(doc))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``face.mp4`` (16 frames of the demo clip at quarter size) and ``speech.wav`` (0.64 s):
    one 16-frame window, so the documents' 20-step jobs stay short."""
    folder = tmp_path_factory.mktemp("doc-inputs")
    write_video(folder / "face.mp4", demo_frames(16, (270, 480)))
    write_wav(folder / "speech.wav", speech(0.64))
    return folder


@pytest.fixture
def reader_folder(inputs: Path, tmp_path: Path) -> Path:
    for name in ("face.mp4", "speech.wav"):
        shutil.copy(inputs / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def environment(triton, gateway) -> dict[str, str]:
    return dict(
        os.environ, LIPSYNC_URL=gateway.url, LIPSYNC_API_KEY=KEYS[0], TRITON_HTTP=triton.settings.http_address,
        TRITON_GRPC=triton.settings.grpc_url, LIPSYNC_WEBHOOK_SECRET=(gateway.data_dir / "webhook_secret").read_text().strip(),
    )


def _run(command: list[str], folder: Path, environment: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _assert_video(path: Path) -> None:
    with VideoReader(path) as reader:
        assert len(list(reader)) > 0


def test_the_documents_have_blocks_to_run() -> None:
    assert {doc for doc, _, _ in PYTHON_BLOCKS} == set(DOCUMENTS)
    assert BASH_DOCUMENTS == ["gateway-api.md"]


@pytest.mark.parametrize(("document", "code", "line"), PYTHON_BLOCKS, ids=[f"{doc}:{line}" for doc, _, line in PYTHON_BLOCKS])
def test_python_block_runs(document: str, code: str, line: int, reader_folder: Path, environment: dict[str, str]) -> None:
    _run([sys.executable, "-c", code], reader_folder, environment)
    if "out.mp4" in code:
        _assert_video(reader_folder / "out.mp4")


@pytest.mark.parametrize("document", BASH_DOCUMENTS)
def test_bash_blocks_run_in_order_in_one_shell(document: str, reader_folder: Path, environment: dict[str, str]) -> None:
    script = "\n".join(code for language, code, _ in code_blocks(document) if language == "bash")
    _run(["bash", "-euo", "pipefail", "-c", script], reader_folder, environment)
    if "out.mp4" in script:
        _assert_video(reader_folder / "out.mp4")
