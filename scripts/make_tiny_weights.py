"""Write the tiny random-weight checkpoint set (UNet, Whisper, VAE) in the official layout.

    python scripts/make_tiny_weights.py [--dest checkpoints/tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

from lipsync.tiny import write_tiny_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, help="output folder (default: the tiny root in configs/weights.yaml)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_weights(args.dest, args.seed)
    print(f"tiny weights written: unet {paths.unet}, whisper {paths.whisper}, vae {paths.vae_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
