"""Tiny random-weight models in the official file formats, for tests and the CPU demo."""

from __future__ import annotations

import zlib

import torch
from torch import nn

_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def random_parameters_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Overwrite every parameter of ``module`` with seeded random values, in place.

    Each tensor's values depend only on ``seed``, its state-dict name and its shape, so two
    implementations with the same key set (ours and the official one) get identical weights.
    Norm-layer weights are drawn around 1, everything else around 0; buffers (e.g. positional
    tables) are left untouched. Zero-initialised layers (``conv_in``, ``conv_out``, motion-module
    ``proj_out``) become non-zero, so tests exercise every path.
    """
    norm_weights = {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, child in module.named_modules()
        if isinstance(child, _NORM_TYPES) and getattr(child, "weight", None) is not None
    }
    for name, param in module.named_parameters():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        if name in norm_weights:
            values += 1.0
        param.copy_(values.to(param.dtype))
    return module
