"""What the package promises as installed: a gateway without the model's dependencies, a wheel that runs anywhere."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support.clips import demo_frames, speech, write_video, write_wav
from whisper.audio import SAMPLE_RATE

from lipsync.media.settings import AUDIO_SAMPLE_RATE

REPO = Path(__file__).resolve().parents[2]
MODEL_ONLY = ("torch", "diffusers", "mediapipe", "whisper", "cv2")
"""Modules of the model extra that the gateway must not import."""
SOURCES = ("pyproject.toml", "README.md", "lipsync", "gateway", "configs", "model_repository")
"""What a wheel is built from."""


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_gateway_imports_none_of_the_model_dependencies() -> None:
    code = (
        "import sys, gateway.api.app, gateway.cli\n"
        f"loaded = [name for name in {MODEL_ONLY!r} if name in sys.modules]\n"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_audio_rate_without_whisper_is_whispers() -> None:
    assert AUDIO_SAMPLE_RATE == SAMPLE_RATE


@pytest.mark.slow
def test_a_regular_install_runs_the_cli_from_another_folder(tmp_path: Path) -> None:
    """``pip install .`` (not editable) into a fresh venv that sees this one's packages, then ``lipsync run --tiny``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True,
    ).stdout.strip()
    # This environment's packages (torch & co.) as plain paths: its editable install of this project stays inactive.
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "outer.pth").write_text("\n".join(sorted(ours)) + "\n")
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_clean_env(),
    )
    assert install.returncode == 0, install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    write_video(work / "clip.mp4", demo_frames(16))
    write_wav(work / "speech.wav", speech(0.64))
    where = subprocess.run(
        [python, "-c", "import lipsync.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
        cwd=work, capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.split()
    assert all(path.startswith(purelib) for path in where), where
    assert not Path(where[1]).is_symlink() and (Path(where[1]) / "weights.yaml").is_file()

    run = subprocess.run(
        [venv / "bin" / "lipsync", "run", "--tiny", "--video", "clip.mp4", "--audio", "speech.wav", "--out", "out.mp4",
         "--device", "cpu", "--steps", "2", "--no-compile-unet"],
        cwd=work, capture_output=True, text=True, timeout=300, env=_clean_env(),
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["frames"] > 0 and (work / "out.mp4").stat().st_size > 0
    assert (work / "checkpoints" / "tiny" / "latentsync_unet.pt").is_file()  # relative roots: the working folder
    assert "accelerate" not in run.stderr  # diffusers warns at every VAE load when it is missing
