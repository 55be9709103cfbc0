"""Opt-in ``torch.compile`` of the UNet for fixed call shapes.

Compilation keeps the math (Inductor fuses the GroupNorm/SiLU/residual elementwise work and the
motion module's layout copies around the same cuBLAS/cuDNN/flash kernels), so outputs stay within
the dtype's rounding of eager. It is done in place (``nn.Module.compile``): the module, its
parameters and its state-dict keys stay the same object, so strict loading and the callers that
read ``unet.dtype`` are unaffected. ``dynamic=False`` specialises on each input shape: every new
windows-per-call count costs one compilation (full-size UNet on an H100: ~21 s for the
official 2×16-frame call, ~135 s for a 4-window 8×16 call; see docs/benchmarks.md, "UNet speed, exact mode").
"""

from __future__ import annotations

from typing import Literal

import torch

from lipsync.models.unet import UNet3DConditionModel

CompileMode = Literal["off", "default", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead")
# One compiled graph per distinct call shape: windows per call (1..N) with and without guidance.
RECOMPILE_LIMIT = 32


def compile_unet(unet: UNet3DConditionModel, mode: CompileMode = "default") -> UNet3DConditionModel:
    """Compile ``unet`` in place and return it; ``mode="off"`` returns it untouched.

    ``"reduce-overhead"`` adds CUDA graphs: a call's output is overwritten by the next call of the
    same shape, so callers must consume (copy) it first, as ``lipsync.sampling.denoise`` does.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {COMPILE_MODES}")
    if mode == "off":
        return unet
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    unet.compile(mode=mode, dynamic=False, fullgraph=True)
    return unet
