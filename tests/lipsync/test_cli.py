"""``lipsync run`` as a user runs it: a subprocess with tiny weights, its JSON report and its errors.

Every bad input must end with exit status 1, exactly one ``error: ...`` line on stderr, no Python
traceback, and an empty output folder (no result, no ``*.part`` temp file).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_media import audio_only, evc_mp4
from test_pipeline import SIZE, demo_frames, flat, speech, write_video, write_wav

from lipsync.weights import WeightPaths, weight_paths

ENTRY_POINT = Path(sys.executable).with_name("lipsync")

pytestmark = [
    pytest.mark.slow,
]


def lipsync(*args: str | Path, entry_point: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(ENTRY_POINT)] if entry_point else [sys.executable, "-m", "lipsync.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    """Lines of stderr that report an error (the progress bar redraws with carriage returns)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def checkpoints(tiny_weights: WeightPaths) -> Path:
    """The root folder the session's tiny weight set was written below (what ``--checkpoints`` takes)."""
    return next(root for root in tiny_weights.unet.parents if weight_paths("tiny", root) == tiny_weights)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid short clip (16 demo frames, frame 3 without a face) and 0.64 s of speech, plus bad inputs."""
    folder = tmp_path_factory.mktemp("cli-inputs")
    frames = demo_frames(16)
    frames[3] = flat(128)
    clip = write_video(folder / "clip.mp4", frames)
    write_wav(folder / "speech.wav", speech(0.64))
    data = clip.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    audio_only(folder / "speech.m4a")
    write_wav(folder / "silence.wav", np.zeros(0, np.float32))
    evc_mp4(folder / "evc.mp4")
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "empty.wav").write_bytes(b"")
    rng = np.random.default_rng(0)
    write_video(folder / "no-face.mp4", [flat(128)] + [rng.integers(0, 256, (SIZE[1], SIZE[0], 3), np.uint8) for _ in range(5)])
    return folder


def test_run_writes_the_video_and_prints_a_json_report(inputs: Path, tmp_path: Path) -> None:
    """Through the installed ``lipsync`` entry point, with tiny weights written on first use."""
    weights, out_dir = tmp_path / "checkpoints", tmp_path / "out"
    weights.mkdir()
    out_dir.mkdir()
    completed = lipsync(
        "run", "--tiny", "--checkpoints", weights, "--steps", "1", "--video", inputs / "clip.mp4",
        "--audio", inputs / "speech.wav", "--out", out_dir / "synced.mp4", entry_point=True,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert report["output"] == str(out_dir / "synced.mp4")
    assert (report["frames"], report["faceless_frames"]) == (16, 1)
    assert set(report["seconds"]) >= {"audio", "decode", "detect_align", "denoise", "encode"}
    assert [path.name for path in out_dir.iterdir()] == ["synced.mp4"]
    assert "writing tiny demo weights" in completed.stderr
    assert weight_paths("tiny", weights).unet.is_file()
    assert "Traceback" not in completed.stderr and not error_lines(completed.stderr)
    # MediaPipe's C++ logging (TFLite, absl) is not shown; the progress bar is
    assert not re.search(r"^[IW]\d{4} |TensorFlow Lite|absl::InitializeLog", completed.stderr, re.MULTILINE), completed.stderr
    assert "generate" in completed.stderr and "100%" in completed.stderr


BAD_INPUTS: dict[str, tuple[Callable[[Path], tuple[Path, Path]], str]] = {
    "truncated-video": (lambda d: (d / "truncated.mp4", d / "speech.wav"), r"truncated\.mp4 is .*truncated"),
    "audio-only-as-video": (lambda d: (d / "speech.m4a", d / "speech.wav"), r"speech\.m4a has no video stream"),
    "zero-length-audio": (lambda d: (d / "clip.mp4", d / "silence.wav"), r"silence\.wav contains no audio samples"),
    "0-byte-video": (lambda d: (d / "empty.mp4", d / "speech.wav"), r"empty\.mp4 is empty$"),
    "0-byte-audio": (lambda d: (d / "clip.mp4", d / "empty.wav"), r"empty\.wav is empty$"),
    "unsupported-codec": (lambda d: (d / "evc.mp4", d / "speech.wav"), r"evc\.mp4: its video codec is not supported"),
    "missing-video": (lambda d: (d / "nope.mp4", d / "speech.wav"), r"video file not found: .*nope\.mp4"),
    "missing-audio": (lambda d: (d / "clip.mp4", d / "nope.wav"), r"audio file not found: .*nope\.wav"),
    "no-face": (lambda d: (d / "no-face.mp4", d / "speech.wav"), r"no face was found in any of the 6 frames of no-face\.mp4"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_error_line_without_traceback_or_leftovers(
    inputs: Path, checkpoints: Path, tmp_path: Path, case: str
) -> None:
    pick, message = BAD_INPUTS[case]
    video, audio = pick(inputs)
    before = sorted(path.name for path in inputs.iterdir())
    completed = lipsync(
        "run", "--tiny", "--checkpoints", checkpoints, "--steps", "1", "--video", video, "--audio", audio,
        "--out", tmp_path / "out.mp4",
    )
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    errors = error_lines(completed.stderr)
    assert len(errors) == 1, completed.stderr[-3000:]
    assert re.search(message, errors[0]), errors[0]
    assert completed.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no output, no .part temp file
    assert sorted(path.name for path in inputs.iterdir()) == before


def test_without_the_model_packages_it_names_the_extra_to_install(tmp_path: Path) -> None:
    """A base install (no ``[model]`` extra), simulated by making ``whisper`` unimportable."""
    code = ("import sys; sys.modules['whisper'] = None\n"
            "from lipsync.cli import main\n"
            "sys.exit(main(['run', '--video', 'v.mp4', '--audio', 'a.wav', '--out', 'o.mp4']))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 1
    assert completed.stderr == (
        "error: lipsync run needs the model packages (whisper is not installed): pip install 'lipsync-serve[model]'\n"
    )


def test_every_flag_has_help() -> None:
    from gateway.cli import _parser as serve_parser
    from lipsync.cli import _parser as lipsync_parser

    for parser in (lipsync_parser(), serve_parser()):
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        for name, command in commands.choices.items():
            bare = [action.option_strings for action in command._actions if not action.help]
            assert bare == [], f"{parser.prog} {name}: flags without help: {bare}"


def test_missing_real_weights_say_how_to_get_them(inputs: Path, tmp_path: Path) -> None:
    empty = tmp_path / "checkpoints"
    empty.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    completed = lipsync(
        "run", "--checkpoints", empty, "--video", inputs / "clip.mp4", "--audio", inputs / "speech.wav",
        "--out", out_dir / "out.mp4",
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("error: LatentSync 1.5 weights are missing:")
    assert str(empty) in completed.stderr  # lists the missing files
    assert "scripts/download_weights.py --version 1.5" in completed.stderr
    assert "--tiny" in completed.stderr
    assert list(out_dir.iterdir()) == [] and list(empty.iterdir()) == []
