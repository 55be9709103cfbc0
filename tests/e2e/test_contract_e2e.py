"""The job contract end to end: ``loop_mode: cut`` (and ``crf``) through the CLI, Triton and the REST
gateway, and the gateway's job id in the Triton model's log."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx2
import pytest
from support.clips import FPS, demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS

from gateway.backends.triton_client import JobRequest, stream_job
from lipsync.weights import WeightPaths, weight_paths

pytestmark = [
    pytest.mark.slow,
]

VIDEO_FRAMES = 20
AUDIO_SECONDS = 2.0
"""A 0.8 s video and 2 s of speech: cut ends the output after the video's 20 frames."""


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cut")
    return write_video(folder / "clip.mp4", demo_frames(VIDEO_FRAMES)), write_wav(folder / "speech.wav", speech(AUDIO_SECONDS))


def _check_cut(path: Path) -> None:
    """The video has the source's frames and the audio stops with it (AAC's last frame may run over by 64 ms)."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        samples = [(frame.samples, frame.sample_rate) for frame in container.decode(audio=0)]
    assert frames == VIDEO_FRAMES
    audio_s = sum(count for count, _ in samples) / samples[0][1]
    assert VIDEO_FRAMES / FPS - 0.1 <= audio_s <= VIDEO_FRAMES / FPS + 0.1, audio_s


def test_cli_loop_mode_cut(short_clip: tuple[Path, Path], tiny_weights: WeightPaths, tmp_path: Path) -> None:
    root = next(folder for folder in tiny_weights.unet.parents if weight_paths("tiny", folder) == tiny_weights)
    video, audio = short_clip
    out = tmp_path / "cut.mp4"
    completed = subprocess.run(
        [sys.executable, "-m", "lipsync.cli", "run", "--tiny", "--checkpoints", str(root), "--steps", "1",
         "--loop-mode", "cut", "--device", "cpu", "--no-compile-unet", "--video", str(video), "--audio", str(audio),
         "--crf", "30", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["frames"] == VIDEO_FRAMES
    _check_cut(out)
    assert b"crf=30.0" in out.read_bytes()  # x264 writes its settings into the stream


def test_triton_loop_mode_cut_logs_the_request_id(triton, short_clip: tuple[Path, Path], tmp_path: Path) -> None:
    video, audio = short_clip
    job = JobRequest(video.read_bytes(), audio.read_bytes(), job_id="contract-cut-triton", inference_steps=1, loop_mode="cut",
                     crf=40)
    result = stream_job(triton.settings.grpc_url, job)
    assert result.info["frames"] == VIDEO_FRAMES
    (tmp_path / "out.mp4").write_bytes(result.video)
    _check_cut(tmp_path / "out.mp4")
    assert b"crf=40.0" in result.video
    assert "job contract-cut-triton done" in triton.log_path.read_text(errors="replace")


def test_rest_loop_mode_cut_and_the_job_id_reaches_triton(gateway, triton, short_clip: tuple[Path, Path], tmp_path: Path) -> None:
    video, audio = short_clip
    http = httpx2.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=120)
    body = {"video_source": base64.b64encode(video.read_bytes()).decode(),
            "audio_source": base64.b64encode(audio.read_bytes()).decode(), "inference_steps": 1, "loop_mode": "cut", "crf": 45}
    submitted = http.post("/lipsync/submit", json=body)
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["request_id"]
    deadline = time.monotonic() + 300
    while (status := http.post("/lipsync/status", json={"request_id": job_id}).json())["status"] in ("InQueue", "InProgress"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "Succeed", status
    result = http.get(f"/lipsync/result/{job_id}")
    assert result.status_code == 200
    (tmp_path / "out.mp4").write_bytes(result.content)
    _check_cut(tmp_path / "out.mp4")
    assert b"crf=45.0" in result.content
    log = triton.log_path.read_text(errors="replace")
    assert f"job {job_id} started" in log and f"job {job_id} done" in log


def test_rest_refuses_an_option_outside_the_contract(gateway, short_clip: tuple[Path, Path]) -> None:
    video, audio = short_clip
    http = httpx2.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=120)
    body = {"video_source": base64.b64encode(video.read_bytes()).decode(),
            "audio_source": base64.b64encode(audio.read_bytes()).decode(), "loop_mode": "bounce"}
    refused = http.post("/lipsync/submit", json=body)
    assert refused.status_code == 422 and "loop_mode" in refused.json()["reason"]
