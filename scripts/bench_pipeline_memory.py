"""Peak RSS (and on a GPU peak VRAM) of the whole pipeline: a 10 s clip against a 2-minute 1080p clip.

Each pass runs ``LipSyncPipeline.from_weights(weights, device).run(...)`` — tiny weights on the CPU by
default, full-size random weights of ``--version`` (official formats) with ``--device cuda`` — decode, face detection and alignment,
audio features, VAE encode, denoise, VAE decode, paste-back, encode — in a fresh interpreter, so
``ru_maxrss`` (the child's peak resident memory, read inside it) belongs to that one job. The short pass
is the demo clip (1080×1920 HEVC, 10 s) with the demo speech (9.6 s); the long pass is the demo
clip looped 12× by packet copy (``scripts/bench_memory.py``'s ``loop_clip``, no re-encode) with the demo
speech tiled to the same 2 minutes, written as a 16 kHz WAV. The goal is long / short ≤ 1.5: memory must
not grow with the clip's length. On CUDA the peak VRAM is ``torch.cuda.max_memory_allocated`` after the
job (weights included), with the UNet replayed from CUDA graphs (uncompiled: memory does not depend on it).

    python scripts/bench_pipeline_memory.py [--steps 1] [--loops 12] [--json OUT.json]
    python scripts/bench_pipeline_memory.py --version 1.5 --device cuda --json OUT.json

On a 2-core CPU the long pass takes roughly ten minutes at ``--steps 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import DEMO_VIDEO, loop_clip  # noqa: E402  (sibling script, plain functions)

DEMO_AUDIO = DEMO_VIDEO.with_name("demo1_audio.wav")


def peak_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int = 16000) -> Path:
    """Mono float32 waveform in [-1, 1) → 16-bit PCM WAV."""
    samples = np.clip(np.round(waveform * 32768), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def run_pass(video: Path, audio: Path, checkpoints: Path, steps: int, version: str, device: str) -> dict:
    """One pipeline job in this process; frames, wall time, stage seconds, RSS and VRAM figures."""
    import torch

    from lipsync.pipeline import LipSyncPipeline
    from lipsync.weights import weight_paths

    pipeline = LipSyncPipeline.from_weights(weight_paths(version, checkpoints), device)
    loaded_peak, loaded_now = peak_mib(), current_mib()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        result = pipeline.run(video, audio, Path(out_dir) / "out.mp4", inference_steps=steps)
        wall = time.perf_counter() - start
    return {
        "frames": result.frames,
        "faceless_frames": result.faceless_frames,
        "wall_seconds": round(wall, 1),
        "stage_seconds": {name: round(value, 1) for name, value in result.seconds.items()},
        "rss_after_load_mib": round(loaded_now),
        "peak_after_load_mib": round(loaded_peak),
        "peak_mib": round(peak_mib()),
        "torch_threads": torch.get_num_threads(),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
    }


def measure(video: Path, audio: Path, checkpoints: Path, steps: int, version: str, device: str) -> dict:
    """Run one pass in a fresh interpreter and return its report (the child's own ru_maxrss)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--pass", str(video), "--audio", str(audio),
         "--checkpoints", str(checkpoints), "--steps", str(steps), "--version", version, "--device", device],
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise SystemExit(f"pass on {video} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=DEMO_VIDEO, help="10 s source clip (default: the demo clip in tests/fixtures)")
    parser.add_argument("--audio", type=Path, default=DEMO_AUDIO, help="speech for the short pass (default: demo)")
    parser.add_argument("--loops", type=int, default=12, help="copies of the clip in the long pass (12 × 10 s)")
    parser.add_argument("--steps", type=int, default=1, help="DDIM steps (memory does not depend on them)")
    parser.add_argument("--version", choices=["tiny", "1.5", "1.6"], default="tiny", help="weights (full size: random)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    parser.add_argument("--pass", dest="single", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_pass(args.single, args.audio, args.checkpoints, args.steps, args.version, args.device)))
        return

    from lipsync.audio import load_audio
    from lipsync.media import VideoReader
    from lipsync.testing import write_random_weights
    from lipsync.tiny import write_tiny_weights

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        if args.version == "tiny":
            write_tiny_weights(temp / "checkpoints", seed=0)
        else:
            write_random_weights(args.version, temp / "checkpoints")
        long_video = temp / "long.mp4"
        loop_clip(args.video, long_video, args.loops)
        with VideoReader(long_video) as reader:
            long_seconds = reader.info.duration
        speech = load_audio(args.audio)
        samples = round(long_seconds * 16000)
        long_audio = write_wav(temp / "long.wav", np.tile(speech, -(-samples // speech.size))[:samples])
        rows = []
        for name, video, audio in (("10 s", args.video, args.audio), (f"{long_seconds:.0f} s", long_video, long_audio)):
            report = measure(video, audio, temp / "checkpoints", args.steps, args.version, args.device)
            report |= {"pass": name, "audio_seconds": round(load_audio(audio).size / 16000, 2)}
            rows.append(report)
            print(json.dumps(report), file=sys.stderr, flush=True)

    print(f"device: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs, "
          f"{args.device}; weights {args.version}; steps {args.steps}; torch threads {rows[0]['torch_threads']}")
    print("| clip | audio s | frames | wall s | RSS after model load MiB | peak RSS MiB | peak VRAM GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pass']} | {row['audio_seconds']} | {row['frames']} | {row['wall_seconds']} "
              f"| {row['rss_after_load_mib']} | {row['peak_mib']} | {row['peak_vram_gib']} |")
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    print(f"\npeak RSS long / short: {ratio:.2f} (goal ≤ 1.5)")
    vram_ratio = rows[1]["peak_vram_gib"] / rows[0]["peak_vram_gib"] if rows[0]["peak_vram_gib"] else None
    if vram_ratio is not None:
        print(f"peak VRAM long / short: {vram_ratio:.2f}")
    for row in rows:
        print(f"stage seconds ({row['pass']}): {row['stage_seconds']}")
    if args.json:
        report = {"device": args.device, "version": args.version, "steps": args.steps, "rows": rows, "ratio": round(ratio, 3),
                  "vram_ratio": None if vram_ratio is None else round(vram_ratio, 3)}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
