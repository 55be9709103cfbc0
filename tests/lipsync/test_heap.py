"""A job gives the C heap's free pages back to the system when it ends.

Run in a fresh process so that its resident memory is this test's alone. Before the measured job the
process leaves 512 MiB of freed heap below a block still in use: glibc keeps such pages resident until
someone trims the heap (it only ever shortens a heap from its top), which is what a job's freed frames
look like after a job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.clips import demo_frames, speech, write_video, write_wav

from lipsync.weights import WeightPaths

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")

MIB = 1 << 20
FREED = 512 * MIB

SCRIPT = """
import ctypes, dataclasses, json, sys
from pathlib import Path
import psutil
from lipsync.jobs import JobOptions, run_job
from lipsync.pipeline import LipSyncPipeline
from lipsync.weights import WeightPaths

weights, video, audio, freed = json.loads(sys.argv[1])
pipeline = LipSyncPipeline.from_weights(
    WeightPaths(**{k: Path(v) if isinstance(v, str) else tuple(v) for k, v in weights.items()})
)
video, audio = Path(video).read_bytes(), Path(audio).read_bytes()
options = JobOptions(inference_steps=1)
run_job(pipeline, video, audio, options)  # the first job loads what every job shares

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = 64 << 10  # below glibc's mmap threshold: served from the heap
blocks = [libc.malloc(block) for _ in range(freed // block)]
for address in blocks:
    ctypes.memset(address, 1, block)  # resident
in_use_above = libc.malloc(block)
for address in blocks:
    libc.free(address)
before = psutil.Process().memory_info().rss
run_job(pipeline, video, audio, options)
after = psutil.Process().memory_info().rss
print(json.dumps({"before": before, "after": after}))
"""


def test_a_job_returns_the_freed_heap_to_the_system(tiny_weights: WeightPaths, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", demo_frames(16))
    audio = write_wav(tmp_path / "clip.wav", speech(0.64))
    weights = {name: value if isinstance(value, tuple) else str(value) for name, value in vars(tiny_weights).items()}
    argument = json.dumps([weights, str(video), str(audio), FREED])
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, argument], check=False, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    assert rss["after"] < rss["before"] - FREED // 2, {name: value / MIB for name, value in rss.items()}
