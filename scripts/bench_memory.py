"""Peak RSS of the media layer alone: streaming decode → encode of a 10 s and a 2-minute 1080p clip.

The 2-minute clip is the demo clip (1080×1920 HEVC, 10 s) looped 12 times by copying its
packets into a temporary MP4 (no re-encode). Each pass reads the clip with ``VideoReader`` and writes
every frame, with the demo audio looped to the same length, through ``VideoWriter``; it runs in a fresh
process so ``ru_maxrss`` (the process's peak resident memory) belongs to that pass alone. Streaming
means the two peaks should be about equal: memory must not grow with the clip's length.

    python scripts/bench_memory.py [--video tests/fixtures/demo1_video.mp4] [--loops 12]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

DEMO_VIDEO = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "demo1_video.mp4"


def loop_clip(source: Path, target: Path, loops: int) -> None:
    """Write ``source``'s video packets ``loops`` times back to back into ``target`` (stream copy)."""
    with av.open(str(source)) as reader, av.open(str(target), "w") as writer:
        video = reader.streams.video[0]
        stream = writer.add_stream_from_template(video)
        length = video.duration
        for loop in range(loops):
            reader.seek(0, stream=video)
            for packet in reader.demux(video):
                if packet.dts is None:
                    continue
                packet.pts += loop * length
                packet.dts += loop * length
                packet.stream = stream
                writer.mux(packet)


def peak_kib() -> int:
    """Peak resident set size of this process so far, in KiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_pass(video: Path, audio_source: Path) -> dict:
    """Decode ``video`` and encode it with looped audio; report frames, seconds and RSS figures."""
    import numpy as np

    from lipsync.audio import load_audio
    from lipsync.media import VideoReader, VideoWriter

    with tempfile.TemporaryDirectory() as out_dir, VideoReader(video) as reader:
        info = reader.info
        speech = load_audio(audio_source)
        samples = round(info.duration * 16000)
        audio = np.tile(speech, -(-samples // speech.size))[:samples]
        baseline = peak_kib()
        start = time.perf_counter()
        with VideoWriter(Path(out_dir) / "out.mp4", info.width, info.height, audio=audio) as writer:
            for frame in reader:
                writer.write(frame)
        seconds = time.perf_counter() - start
        frames = writer.frames_written
    return {
        "clip_seconds": info.duration,
        "frames": frames,
        "wall_seconds": round(seconds, 1),
        "fps": round(frames / seconds, 1),
        "baseline_mib": round(baseline / 1024),
        "peak_mib": round(peak_kib() / 1024),
    }


def measure(video: Path, audio_source: Path) -> dict:
    """Run one pass in a fresh interpreter and return its report."""
    completed = subprocess.run(
        [sys.executable, __file__, "--pass", str(video), "--audio", str(audio_source)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=DEMO_VIDEO, help="10 s source clip (default: the demo clip in tests/fixtures)")
    parser.add_argument("--audio", type=Path, help="audio source (default: the video's own track)")
    parser.add_argument("--loops", type=int, default=12, help="copies of the clip in the long pass (12 × 10 s)")
    parser.add_argument("--pass", dest="single", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    audio = args.audio or args.video
    if args.single:
        print(json.dumps(run_pass(args.single, audio)))
        return
    with tempfile.TemporaryDirectory() as temp:
        long_clip = Path(temp) / "long.mp4"
        loop_clip(args.video, long_clip, args.loops)
        rows = [("short", measure(args.video, audio)), ("long", measure(long_clip, audio))]
    print("| pass | clip s | frames | wall s | fps | RSS after imports MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows:
        print(
            f"| {name} | {row['clip_seconds']:.1f} | {row['frames']} | {row['wall_seconds']} | {row['fps']} "
            f"| {row['baseline_mib']} | {row['peak_mib']} |"
        )
    ratio = rows[1][1]["peak_mib"] / rows[0][1]["peak_mib"]
    print(f"\npeak RSS long / short: {ratio:.2f}")


if __name__ == "__main__":
    main()
