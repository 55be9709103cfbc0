"""Run the *official* LatentSync UNet behind our call convention, for side-by-side baselines.

The official package is never part of this repository. Export it locally (ignored by git through
``.git/info/exclude``) with its package paths kept, e.g. ``.official/latentsync/models/unet.py``::

    G=$(git-dir of github.com/bytedance/LatentSync)
    for f in $(git --git-dir=$G ls-tree --name-only HEAD latentsync/models/) latentsync/utils/util.py; do
        mkdir -p .official/$(dirname $f); git --git-dir=$G show HEAD:$f > .official/$f
    done
    touch .official/latentsync/__init__.py .official/latentsync/{models,utils}/__init__.py

The official modules import ``einops`` (pure Python; ``.whl/einops-0.8.1-py3-none-any.whl``; the GPU
image already has it, our venv does not, so locally install the wheel with ``pip install --no-deps
--target .official/site``) besides torch and diffusers; no ``omegaconf`` or ``xformers`` is needed.
On the GPU machine carry ``.official`` (and ``.whl`` for diffusers) with the run.

:func:`load_official_unet` builds the official ``UNet3DConditionModel`` exactly as the official
``scripts/inference.py`` does (``from_config`` of the YAML ``model:`` section, then
``load_state_dict`` and a cast), but from a state dict in memory and strictly. :class:`OfficialUNet`
gives it our convention, ``unet(sample, timestep, audio) -> noise``, so ``lipsync.sampling.denoise``
and the benchmarks take it unchanged. :func:`compare_with_ours` checks both models agree on the
same weights and inputs::

    PYTHONPATH=.official/site python scripts/official_baseline.py --config configs/unet/tiny.yaml
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OFFICIAL_ROOT = REPO_ROOT / ".official"
OFFICIAL_PACKAGE = "latentsync"
OFFICIAL_UNET_MODULE = "latentsync.models.unet"
OFFICIAL_UTIL_MODULE = "latentsync.utils.util"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

if str(REPO_ROOT) not in sys.path:  # run as a script: make our ``lipsync`` importable
    sys.path.insert(0, str(REPO_ROOT))


def _install_util_shim() -> None:
    """Register a minimal stand-in for the official ``latentsync.utils.util`` module.

    The official ``unet.py`` imports one helper from it, ``zero_rank_log(logger, message)``, and
    calls it only in ``from_pretrained`` while reading a checkpoint file (never in ``__init__`` or
    ``forward``). The real module, however, imports the official data pipeline's video/plotting
    stack at import time (``decord``, ``cv2``, ``torchvision``, ``matplotlib``, ``imageio``):
    ``decord`` is on neither our venv nor the GPU machine, ``torchvision`` and ``imageio`` are not
    in our venv, and none of it matters for the UNet.
    The shim defines the same function with the same behaviour (log on rank 0 of an initialised
    process group, otherwise stay silent), so the UNet module imports unchanged and nothing of the
    video stack is needed. The official files themselves are never edited.
    """
    if OFFICIAL_UTIL_MODULE in sys.modules:
        return
    shim = types.ModuleType(OFFICIAL_UTIL_MODULE)
    shim.__doc__ = "Stand-in for the official latentsync.utils.util (scripts/official_baseline.py)."

    def zero_rank_log(logger: Any, message: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            logger.info(message)

    shim.zero_rank_log = zero_rank_log  # type: ignore[attr-defined]
    sys.modules[OFFICIAL_UTIL_MODULE] = shim


def import_official_unet_class(official_root: Path) -> type[nn.Module]:
    """Put ``official_root`` first on ``sys.path`` and import the official ``UNet3DConditionModel``.

    Raises ``FileNotFoundError`` when the export is missing, and ``ImportError`` when another
    ``latentsync`` package (not the one below ``official_root``) was imported already.

    Diffusers compatibility: with diffusers 0.42.1 every name the official model files import
    (``ModelMixin``, ``ConfigMixin``/``register_to_config``, ``BaseOutput``, ``logging``,
    ``TimestepEmbedding``/``Timesteps``, ``FeedForward``, ``AdaLayerNorm``) still exists, so no
    diffusers shim is installed; the only shim is :func:`_install_util_shim`.
    """
    root = Path(official_root).resolve()
    if not (root / OFFICIAL_PACKAGE / "models" / "unet.py").is_file():
        raise FileNotFoundError(f"no official LatentSync export below {root} (expected latentsync/models/unet.py)")
    loaded = sys.modules.get(OFFICIAL_PACKAGE)
    if loaded is not None:
        locations = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if root / OFFICIAL_PACKAGE not in locations:
            raise ImportError(f"a different '{OFFICIAL_PACKAGE}' package is already imported from {locations}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _install_util_shim()
    return importlib.import_module(OFFICIAL_UNET_MODULE).UNet3DConditionModel


def load_official_unet(
    official_root: Path,
    unet_config: Path,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Build the official UNet from our LatentSync YAML and load ``state_dict`` strictly.

    Mirrors the official inference path: ``UNet3DConditionModel.from_pretrained(model_config,
    ckpt_path)`` is ``cls.from_config(model_config)`` followed by the class's own
    ``load_state_dict(ckpt["state_dict"], strict=False)``, and ``scripts/inference.py`` then casts
    the module to the inference dtype. Here the state dict comes from memory (no checkpoint file,
    nothing downloaded) and loading is strict, so a missing or unexpected tensor is an error. The
    class's ``load_state_dict`` deletes mis-shaped ``conv_in``/``conv_out``/audio ``attn2`` tensors
    from the dict it is given, so it gets a shallow copy and the caller's dict stays intact.
    ``state_dict`` may also be an official checkpoint payload (``{"state_dict": ..., ...}``).

    Returns the module on ``device`` in ``dtype``, in eval mode, without gradients. Its forward is
    the official one (``forward(sample, timestep, encoder_hidden_states).sample``); wrap it in
    :class:`OfficialUNet` for ours.
    """
    from lipsync.config import load_config

    unet_class = import_official_unet_class(official_root)
    model_config = dict(load_config(unet_config)["model"])
    unet = unet_class.from_config(model_config)
    weights = state_dict.get("state_dict", state_dict)
    unet.load_state_dict(dict(weights), strict=True)
    # diffusers' ModelMixin.to() warns about fp32-only modules on any dtype cast; the official model
    # lists none (the warning names an empty list), so it is silenced for this one call.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        unet = unet.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return unet.eval().requires_grad_(False)


class OfficialUNet(nn.Module):
    """The official UNet behind our UNet's call convention (``lipsync.models.unet``).

    ``forward(sample (B, 13, F, h, w), timestep, audio) -> (B, 4, F, h, w)``, with ``audio`` either
    ``(B·F, tokens, dim)`` batch-major (what ``denoise`` passes) or ``(B, F, tokens, dim)``. The
    official model takes the batch-major ``(B·F, tokens, dim)`` layout itself (its pipeline stacks
    a window's frames, the unconditional window first), so the adapter only flattens a 4-D input,
    checks the row count and unwraps the ``UNet3DConditionOutput``. ``dtype``, ``device`` and
    ``conv_in`` are exposed like ours. DeepCache's ``forward_caching``/``forward_shallow`` are not
    provided: run ``denoise`` with ``cache_interval=1``.
    """

    def __init__(self, official: nn.Module) -> None:
        super().__init__()
        self.official = official

    @property
    def conv_in(self) -> nn.Module:
        return self.official.conv_in

    @property
    def dtype(self) -> torch.dtype:
        return self.official.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.official.conv_in.weight.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Predict the noise ε like ``lipsync.models.unet.UNet3DConditionModel.forward``."""
        batch, num_frames = sample.shape[0], sample.shape[2]
        audio = encoder_hidden_states.flatten(0, 1) if encoder_hidden_states.ndim == 4 else encoder_hidden_states
        if audio.shape[0] != batch * num_frames:
            raise ValueError(
                f"encoder_hidden_states has {audio.shape[0]} rows; expected batch × frames = {batch * num_frames}"
            )
        return self.official(sample, timestep, encoder_hidden_states=audio, return_dict=False)[0]


def audio_tokens(config: dict[str, Any], encoder_layers: int = 4) -> int:
    """Audio tokens per video frame, as our audio windows and the official ``Audio2Feature`` build them.

    ``audio_feat_length = (a, b)`` selects ``(a + b + 1) × 2`` Whisper positions (50 Hz features at
    25 fps), each carrying the embeddings of ``encoder_layers + 1`` layers (Whisper tiny: 4 blocks):
    50 tokens for ``[2, 2]``.
    """
    before, after = config.get("data", {}).get("audio_feat_length", [2, 2])
    return (before + after + 1) * 2 * (encoder_layers + 1)


def compare_with_ours(
    official_root: Path,
    unet_config: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    batch: int,
    frames: int,
    seed: int = 0,
) -> float:
    """Max relative error between the official UNet and ours on the same weights and inputs.

    Both are built from ``unet_config``; ours gets seeded random weights (``lipsync.tiny.random_parameters_``,
    so zero-initialised layers are non-zero too) and its state dict is loaded strictly into the
    official one. Inputs: random ``(batch, 13, frames, h, w)`` latents with ``h = w = resolution / 8``
    (``data.resolution`` of the config, 256 when absent), a random timestep in [0, 1000) per sample
    and random ``(batch·frames, tokens, cross_attention_dim)`` audio. Returns
    ``max|ours − official| / max|official|``; the norm-relative error and timings are printed.
    """
    from lipsync.config import load_config
    from lipsync.models.loading import build_unet
    from lipsync.tiny import random_parameters_

    config = load_config(unet_config)
    model = config["model"]
    size = int(config.get("data", {}).get("resolution", 256)) // 8
    tokens = audio_tokens(config)

    started = time.perf_counter()
    ours = random_parameters_(build_unet(unet_config), seed)
    ours = ours.to(device=device, dtype=dtype).eval().requires_grad_(False)
    official = OfficialUNet(load_official_unet(official_root, unet_config, ours.state_dict(), device, dtype))
    built = time.perf_counter() - started

    generator = torch.Generator().manual_seed(seed + 1)
    sample = torch.randn((batch, model["in_channels"], frames, size, size), generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    audio = torch.randn((batch * frames, tokens, model["cross_attention_dim"]), generator=generator)
    sample, timestep, audio = sample.to(device, dtype), timestep.to(device), audio.to(device, dtype)

    with torch.no_grad():
        started = time.perf_counter()
        mine = ours(sample, timestep, audio).float()
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = official(sample, timestep, audio).float()
        official_s = time.perf_counter() - started
    if mine.shape != theirs.shape:
        raise AssertionError(f"output shapes differ: ours {tuple(mine.shape)}, official {tuple(theirs.shape)}")
    max_relative = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    norm_relative = ((mine - theirs).norm() / theirs.norm()).item()
    print(
        f"{unet_config}: B={batch} F={frames} latent {size}x{size} audio {tokens}x{model['cross_attention_dim']} "
        f"{str(dtype).removeprefix('torch.')} on {device}: output {tuple(theirs.shape)}, max|official|="
        f"{theirs.abs().max().item():.4g}; max rel err {max_relative:.3e}, norm rel err {norm_relative:.3e}; "
        f"build {built:.1f}s, forward ours {ours_s:.2f}s, official {official_s:.2f}s",
        flush=True,
    )
    return max_relative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--official-root", type=Path, default=DEFAULT_OFFICIAL_ROOT)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "unet" / "tiny.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    compare_with_ours(args.official_root, args.config, args.device, DTYPES[args.dtype], args.batch, args.frames, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
