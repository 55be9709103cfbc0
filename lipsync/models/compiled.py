"""``CompiledUNet``: the UNet's passes through ``torch.compile``, with a symbolic batch size.

Compilation keeps the math: Inductor fuses the GroupNorm/SiLU/residual elementwise work and the
motion module's layout copies around the same cuBLAS/cuDNN/attention kernels, so outputs stay within
the dtype's rounding of eager. The module is not touched (its parameters and state-dict keys stay
as loaded); the wrapper holds one compiled function per pass.

The batch dimension (windows per call × 2 for guidance) is compiled as a symbol, so the batcher's
varying call sizes share one compilation per pass instead of paying minutes for each size
(full-size UNet on an H100 with sizes fixed: ~21 s for the official 2×16-frame call, ~135 s for a
4-window call; docs/benchmarks.md). Frames, latent size and token count stay fixed. Calls the
compilation does not cover run the module eagerly rather than compile again in the middle of a job:
another frame count (the shorter last window of a clip) and a batch of one row (one window without
guidance: the compiler specialises sizes 0 and 1). The full pass is compiled once, as feature caching's
``forward_caching`` (the module's ``forward`` is that pass without its second output), so exact and fast
mode share it and fast mode adds only its small shallow pass. Wrap the result in
:class:`~lipsync.models.graphed.GraphedUNet` on CUDA: the compiled kernels are then replayed from one
CUDA graph per call shape, without the per-call launch and guard overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lipsync.models.unet import UNet3DConditionModel

COMPILE_MODE = "default"
"""Inductor without its own CUDA graphs (``GraphedUNet`` captures them) and without autotuning
(``max-autotune`` did not finish within a 10-minute device call)."""


class CompiledUNet:
    """:class:`~lipsync.sampling.NoisePredictor` running ``unet``'s passes as compiled functions.

    Each pass compiles on its first call (:func:`lipsync.lifecycle.compile_unet` makes those calls before the
    compiled UNet serves).
    """

    def __init__(self, unet: UNet3DConditionModel, frames: int, backend: str | Callable[..., Any] = "inductor") -> None:
        """``frames``: the window length compiled for (calls with other lengths run eagerly); ``backend``:
        ``torch.compile``'s; tests use ``"aot_eager"`` (the same graph capture, no code generation)."""
        self.unet = unet
        self.frames = frames
        mode = COMPILE_MODE if backend == "inductor" else None
        self._forward_caching = torch.compile(
            unet.forward_caching, backend=backend, fullgraph=True, dynamic=False, mode=mode
        )
        self._forward_shallow = torch.compile(
            unet.forward_shallow, backend=backend, fullgraph=True, dynamic=False, mode=mode
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def covers(self, sample: torch.Tensor) -> bool:
        """Whether a call with ``sample`` runs compiled (else eagerly)."""
        return sample.shape[2] == self.frames and sample.shape[0] > 1

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor) -> torch.Tensor:
        if not self.covers(sample):
            return self.unet(sample, timestep, audio)
        sample, audio = _batch_symbolic(sample, audio)
        return self._forward_caching(sample, timestep, audio)[0]

    def forward_caching(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.covers(sample):
            return self.unet.forward_caching(sample, timestep, audio)
        sample, audio = _batch_symbolic(sample, audio)
        return self._forward_caching(sample, timestep, audio)

    def forward_shallow(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor, deep_features: torch.Tensor
    ) -> torch.Tensor:
        if not self.covers(sample):
            return self.unet.forward_shallow(sample, timestep, audio, deep_features)
        sample, audio = _batch_symbolic(sample, audio)
        _mark_batch(deep_features)
        return self._forward_shallow(sample, timestep, audio, deep_features)


def _batch_symbolic(sample: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark the batch dimension of the inputs as a symbol for the compiler (no copy)."""
    _mark_batch(sample)
    _mark_batch(audio)
    return sample, audio


def _mark_batch(tensor: torch.Tensor) -> None:
    torch._dynamo.mark_dynamic(tensor, 0)
