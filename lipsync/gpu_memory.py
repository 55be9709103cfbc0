"""A process's GPU memory under a cap: setting the cap, and getting memory back from a call that ran over it.

Under a cap, running out of memory is an expected event that callers recover from (smaller calls, a
retry once another group ends). Recovering needs the failed call's memory back first, and an
exception keeps it: its traceback holds every frame the error passed through, with their locals (a
UNet forward's activations, a half-captured CUDA graph), for as long as the exception lives. That is
at least the handler's run, and longer where the exception is kept: a future handing it to another
thread, which also forms a reference cycle with the frame that caught it, so only a full garbage
collection would free it. :func:`release_failed_call` frees those locals at once.
"""

from __future__ import annotations

import traceback

import torch

GIB = 1 << 30


def limit_gpu_memory(device: torch.device, budget_gib: float, context_gib: float) -> int:
    """Cap this process's allocations on ``device`` so that they plus ``context_gib`` (what torch does not see:
    CUDA contexts, this process's and other processes' of the same server) stay within ``budget_gib``;
    returns the cap in bytes.

    An allocation over the cap raises ``torch.OutOfMemoryError`` instead of taking more of the card, so
    callers size their work (batch windows, VAE slots) to fit and let the rest wait.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    cap = int((budget_gib - context_gib) * GIB)
    if cap <= 0:
        raise ValueError(
            f"a GPU memory budget of {budget_gib} GiB leaves nothing beside the CUDA contexts ({context_gib} GiB)"
        )
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return min(cap, total)


def release_failed_call(error: BaseException) -> None:
    """Free what the frames of ``error`` and of the errors it chains still hold, then return the allocator's
    cached blocks to the device.

    Frames still running (the caller's own) keep their locals; the traceback keeps its lines, so the
    error still reads the same when it is raised again or logged.
    """
    seen: set[int] = set()
    chained: BaseException | None = error
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__
    torch.cuda.empty_cache()
