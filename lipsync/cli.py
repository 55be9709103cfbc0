"""``lipsync`` command line: ``lipsync run --video V --audio A --out O``.

It needs the ``model`` extra; without it, it says which one to install. MediaPipe's TFLite and absl
logging write straight to file descriptor 2 from C++ (no flag or variable silences them): while a job
runs, those lines are filtered out of that descriptor, and Python's own output goes around the filter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lipsync.contract import OPTIONS
from lipsync.errors import LipSyncError, WeightsError
from lipsync.weights import WeightPaths, auxiliary_paths, missing, weight_paths

try:
    import torch
    from tqdm import tqdm

    from lipsync.audio import AudioSettings
    from lipsync.faces import DetectorPool
    from lipsync.jobs import JobOptions, pipeline_arguments
    from lipsync.lifecycle import compile_unet, is_compiled
    from lipsync.pipeline import DTYPES, LipSyncPipeline, PipelineSettings, check_inputs
    from lipsync.tiny import write_tiny_weights
except ModuleNotFoundError as exc:  # a base install, without the model extra: main() says what to install
    if (exc.name or "").split(".")[0] == "lipsync":
        raise
    _MISSING: ModuleNotFoundError | None = exc
else:
    _MISSING = None

MODEL_EXTRA = "pip install 'lipsync-serve[model]'"
NATIVE_NOISE = re.compile(
    rb"^(?:[IW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] |INFO: Created TensorFlow Lite |"
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)"
)
"""Lines of C++ logging dropped while a job runs: absl/glog info and warnings (``W0000 00:00:… file.cc:114] …``)
and TFLite's delegate notice. Errors (``E…``, ``F…``) and anything else pass."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipsync", description="Lip-sync a talking-head video to a speech track (LatentSync)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="lip-sync one video")
    run.add_argument("--video", type=Path, required=True, help="input video (any common container/codec)")
    run.add_argument("--audio", type=Path, required=True, help="driving speech (audio file, or a video with sound)")
    run.add_argument("--out", type=Path, required=True, help="output mp4 (H.264 + AAC)")
    run.add_argument(
        "--version", choices=["1.5", "1.6"], default="1.5", help="LatentSync version (1.5: 256 px, 1.6: 512 px)"
    )
    run.add_argument(
        "--tiny",
        action="store_true",
        help="use tiny random demo weights (written on first use); output is not a real lip-sync",
    )
    run.add_argument("--checkpoints", type=Path, help="weights root (default: as in configs/weights.yaml)")
    for option in OPTIONS:  # the job options, as lipsync.contract describes them
        if option.flag is not None:
            run.add_argument(
                option.flag,
                dest=option.name,
                type=option.type,
                choices=option.choices,
                default=option.default,
                help=option.help,
            )
    run.add_argument(
        "--detector",
        choices=["mediapipe", "insightface"],
        default="mediapipe",
        help="face detector: mediapipe (Apache-2.0, default) or insightface (official LatentSync's; "
        "its pretrained models are for non-commercial research use only)",
    )
    run.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to run on: cpu, cuda, cuda:1, … (default: cuda when a GPU is visible, else cpu)",
    )
    run.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    run.add_argument(
        "--windows-per-call",
        type=int,
        help="16-frame windows per UNet call (memory vs speed), counted at 256 px faces: 1.6's 512 px count four each",
    )
    run.add_argument(
        "--compile-unet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the UNet through torch.compile (default: configs/pipeline.yaml, on CUDA); compiling takes minutes "
        "(kept in Inductor's cache for the next run), so --no-compile-unet suits one short clip",
    )
    return parser


def _weights(args: argparse.Namespace) -> WeightPaths:
    if args.tiny:
        paths = weight_paths("tiny", args.checkpoints)
        if missing(paths):
            print(f"writing tiny demo weights to {paths.unet.parent}", file=sys.stderr)
            paths = write_tiny_weights(args.checkpoints)
        return paths
    paths = weight_paths(args.version, args.checkpoints)
    absent = missing(paths)
    if absent:
        listed = "\n  ".join(str(path) for path in absent)
        raise SystemExit(
            f"error: LatentSync {args.version} weights are missing:\n  {listed}\n"
            f"Download them with: python scripts/download_weights.py --version {args.version}\n"
            "or run with --tiny to use random demo weights."
        )
    return paths


def _detectors(args: argparse.Namespace) -> DetectorPool | None:
    """The chosen face detector (``None``: the pipeline's MediaPipe default); checked before any heavy work."""
    if args.detector == "mediapipe":
        return None
    from lipsync.faces.insightface_backend import InsightFaceDetector  # opt-in backend

    models = auxiliary_paths(args.checkpoints)
    absent = [str(path) for path in models if not path.is_file()]
    if absent:
        dest = f" --dest {args.checkpoints}" if args.checkpoints else ""
        raise SystemExit(
            f"error: InsightFace models missing ({', '.join(absent)}); download them with "
            f"python scripts/download_weights.py --insightface{dest} "
            "(their licence allows non-commercial research use only)"
        )
    try:
        first = InsightFaceDetector(*models)
    except ImportError as exc:
        raise SystemExit(f"error: {exc}") from None
    return DetectorPool(lambda: InsightFaceDetector(*models), [first])


@contextmanager
def _native_noise_filtered() -> Iterator[None]:
    """Route file descriptor 2 through a thread that drops :data:`NATIVE_NOISE` lines; ``sys.stderr`` (the
    progress bar, errors) writes to the terminal directly, so a bar redrawn with carriage returns is not held
    back waiting for a line end."""
    terminal = os.dup(2)
    read, write = os.pipe()
    python_stderr = sys.stderr
    sys.stderr = open(os.dup(terminal), "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace")  # noqa: SIM115 - closed when the block ends

    def forward() -> None:
        with open(read, "rb") as lines:
            for line in lines:
                if not NATIVE_NOISE.match(line):
                    os.write(terminal, line)

    thread = threading.Thread(target=forward, name="native-stderr", daemon=True)
    thread.start()
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)  # the pipe's last writer is gone: the thread forwards what is left and ends
        thread.join(5)
        os.close(terminal)


def main(argv: list[str] | None = None) -> int:
    if _MISSING is not None:
        package = (_MISSING.name or "?").split(".")[0]
        print(
            f"error: lipsync run needs the model packages ({package} is not installed): {MODEL_EXTRA}", file=sys.stderr
        )
        return 1
    args = _parser().parse_args(argv)
    with _native_noise_filtered():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        options = JobOptions(**{option.name: getattr(args, option.name) for option in OPTIONS if option.flag})
        detectors = _detectors(args)
        paths = _weights(args)
        check_inputs(args.video, args.audio, AudioSettings.from_config(paths.unet_config).sample_rate)
        pipeline = LipSyncPipeline.from_weights(
            paths,
            args.device,
            DTYPES.get(args.dtype),
            detectors,
            windows_per_call=args.windows_per_call,
            settings=PipelineSettings.load(compile_unet=args.compile_unet),
        )
        if not is_compiled(pipeline):
            print("compiling the UNet (minutes on a cold kernel cache)", file=sys.stderr)
            compile_unet(pipeline, modes=[options.mode])
        with tqdm(total=100, unit="%", bar_format="{desc:<10} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:

            def progress(fraction: float, stage: str) -> None:
                bar.set_description_str(stage)
                bar.update(round(100 * fraction) - bar.n)

            result = pipeline.run(args.video, args.audio, args.out, **pipeline_arguments(options), progress=progress)
    except (LipSyncError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
