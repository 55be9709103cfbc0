"""Download and verify the LatentSync checkpoints of one version from the Hugging Face Hub.

    python scripts/download_weights.py --version 1.6 [--dest checkpoints] [--insightface]
    python scripts/download_weights.py --insightface [--dest checkpoints]   # the InsightFace models only

Set HF_ENDPOINT to download from a Hub mirror.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

from lipsync.config import ConfigError  # noqa: E402
from lipsync.weights import (  # noqa: E402
    DownloadError,
    WeightsError,
    download_auxiliary,
    download_weights,
    load_weights_config,
)


def main(argv: list[str] | None = None) -> int:
    config = load_weights_config()
    versions = [name for name, spec in config.versions.items() if spec.downloadable]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=versions, help="LatentSync version (required unless --insightface)")
    parser.add_argument(
        "--dest", type=Path, help="checkpoints folder (default: the version's root in configs/weights.yaml)"
    )
    parser.add_argument(
        "--insightface",
        action="store_true",
        help="also fetch the InsightFace models (det_10g.onnx, 2d106det.onnx) for `lipsync run --detector "
        "insightface`; the InsightFace pretrained models are for non-commercial research use only",
    )
    args = parser.parse_args(argv)
    if args.version is None and not args.insightface:
        parser.error("give --version, --insightface or both")
    try:
        paths = download_weights(args.version, args.dest, config=config) if args.version else None
        auxiliary = download_auxiliary(args.dest, config=config) if args.insightface else ()
    except DownloadError as exc:
        print(f"error: {' '.join(str(exc).split())} (set HF_ENDPOINT to use a Hub mirror)", file=sys.stderr)
        return 1
    except (WeightsError, ConfigError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if paths:
        print(f"LatentSync {args.version} ready: unet {paths.unet}, whisper {paths.whisper}, vae {paths.vae_dir}")
    if auxiliary:
        print(f"InsightFace models ready (non-commercial research use only): {', '.join(map(str, auxiliary))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
