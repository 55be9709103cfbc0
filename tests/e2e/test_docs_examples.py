"""The code blocks of the README and the docs run as written, against the test server (real Triton and gateway).

Every fenced ``python`` and ``bash`` block of the README and of ``docs/*.md`` runs, unless the line
above it is ``<!-- not-run: why -->``; blocks in other languages are shown data (json, yaml), and a
block without a language must be such data or be marked. Python blocks run one by one; a document's
bash blocks run in order in one shell, as a reader pastes them. Both run in a folder holding
``face.mp4`` and ``speech.wav``, with the test interpreter's ``bin/`` first on ``PATH`` (the
``lipsync`` command), and reach the servers through the variables the documents name
(``LIPSYNC_URL``, ``LIPSYNC_API_KEY``, ``TRITON_HTTP``, ``TRITON_GRPC``, ``LIPSYNC_WEBHOOK_SECRET``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS

from lipsync.media import VideoReader

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = ("README.md", *sorted(str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md")))
RUN = ("python", "bash")
"""Languages that run; blocks in others (json, yaml) are shown data."""
README_MAX_LINES = 120
NOT_RUN = re.compile(r"<!-- not-run: .+ -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)

pytestmark = pytest.mark.slow


def code_blocks(document: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of the blocks of ``document`` that run."""
    text = (REPO / document).read_text()
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
        os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", LIPSYNC_URL=gateway.url, LIPSYNC_API_KEY=KEYS[0], TRITON_HTTP=triton.settings.http_address,
        TRITON_GRPC=triton.settings.grpc_url, LIPSYNC_WEBHOOK_SECRET=(gateway.data_dir / "webhook_secret").read_text().strip(),
    )


def _run(command: list[str], folder: Path, environment: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _assert_video(path: Path) -> None:
    with VideoReader(path) as reader:
        assert len(list(reader)) > 0


def test_the_documents_have_blocks_to_run() -> None:
    assert {doc for doc, _, _ in PYTHON_BLOCKS} == {"README.md", "docs/gateway-api.md", "docs/triton-api.md"}
    assert BASH_DOCUMENTS == ["README.md", "docs/cli.md", "docs/gateway-api.md"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_block_names_its_language(document: str) -> None:
    """So that no command hides in a block nobody runs: python and bash blocks run or say why not; the
    other languages (json, yaml, text) are shown data."""
    text = (REPO / document).read_text()
    bare = [text.count("\n", 0, match.start()) + 1 for match in FENCE.finditer(text) if not match.group(1)]
    assert bare == [], f"{document}: blocks without a language at lines {bare}"


def test_the_readme_fits_two_screens() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


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
