"""Strict loading of official ``latentsync_unet.pt`` checkpoints.

The official loader uses ``strict=False``, which silently left 1.0 checkpoints' audio attention
random under 1.5 code ("blurry mouths"). Here every missing, unexpected or mis-shaped tensor is an
error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lipsync.config import load_config
from lipsync.errors import WeightsError
from lipsync.models.unet import UNet3DConditionModel

_LISTED_KEYS = 8
_V10_MARKER = "audio_cross_attn"


def build_unet(config: str | Path, device: str | torch.device = "cpu") -> UNet3DConditionModel:
    """Construct an (untrained) UNet from a LatentSync YAML; ``device="meta"`` allocates nothing."""
    model_config = load_config(config)["model"]
    with torch.device(device):
        return UNet3DConditionModel(model_config)


def read_unet_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a ``{"state_dict", "global_step"}`` checkpoint, memory-mapped."""
    path = Path(checkpoint)
    if not path.is_file():
        raise WeightsError(f"UNet checkpoint not found: {path}")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the error type depends on the bytes (UnpicklingError, RuntimeError, EOFError...)
        raise WeightsError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise WeightsError(f"{path} holds a {type(payload).__name__}, not a LatentSync checkpoint dict")
    if "state_dict" not in payload:
        layout = (
            "a bare state dict" if payload and all(isinstance(v, torch.Tensor) for v in payload.values()) else "a dict"
        )
        raise WeightsError(
            f"{path} is {layout} without a 'state_dict' entry; LatentSync 1.5/1.6 checkpoints are "
            "{'state_dict': ..., 'global_step': ...}"
        )
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{path}: 'state_dict' is not a mapping of tensor names to tensors")
    return state_dict


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``WeightsError`` naming every missing, unexpected or mis-shaped tensor."""
    if any(_V10_MARKER in key for key in state_dict):
        raise WeightsError(
            f"{source} is a LatentSync 1.0 checkpoint ('{_V10_MARKER}' layers, no motion modules); "
            "this model needs 1.5 or 1.6 weights (scripts/download_weights.py --version 1.5)"
        )
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong_shape = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state_dict.keys())
        if state_dict[key].shape != expected[key].shape
    ]
    problems = [
        _describe(f"{len(missing)} missing", missing),
        _describe(f"{len(unexpected)} unexpected", unexpected),
        _describe(f"{len(wrong_shape)} with the wrong shape", wrong_shape),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise WeightsError(f"{source} does not fit the UNet config: " + "; ".join(problems))


def load_unet(
    config: str | Path,
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet3DConditionModel:
    """Build the UNet from a LatentSync YAML and load an official checkpoint strictly.

    The model is built on the meta device and takes the (memory-mapped) checkpoint tensors
    directly, so a 5 GB checkpoint is read once, then cast and moved. Returns an eval-mode
    module without gradients: ``unet(sample, timestep, encoder_hidden_states) -> noise``.
    """
    model = build_unet(config, device="meta")
    state_dict = read_unet_state_dict(checkpoint)
    check_state_dict(model, state_dict, str(checkpoint))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _describe(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_LISTED_KEYS])
    more = f", … ({len(items) - _LISTED_KEYS} more)" if len(items) > _LISTED_KEYS else ""
    return f"{label}: {shown}{more}"
