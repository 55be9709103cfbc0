"""Download and verify the LatentSync checkpoints of one version from the Hugging Face Hub.

    python scripts/download_weights.py --version 1.6 [--dest checkpoints]

Set HF_ENDPOINT to download from a Hub mirror.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

from lipsync.config import ConfigError  # noqa: E402
from lipsync.weights import DownloadError, WeightsError, download_weights, load_weights_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = load_weights_config()
    versions = [name for name, spec in config.versions.items() if spec.downloadable]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", required=True, choices=versions)
    parser.add_argument(
        "--dest", type=Path, help="checkpoints folder (default: the version's root in configs/weights.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        paths = download_weights(args.version, args.dest, config=config)
    except DownloadError as exc:
        print(f"error: {' '.join(str(exc).split())} (set HF_ENDPOINT to use a Hub mirror)", file=sys.stderr)
        return 1
    except (WeightsError, ConfigError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"LatentSync {args.version} ready: unet {paths.unet}, whisper {paths.whisper}, vae {paths.vae_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
