"""``GraphedUNet``: the UNet replayed from CUDA graphs, one graph per call shape.

At the call shapes of this pipeline the eager UNet is bound by kernel launches: the GPU waits for
Python to issue some thousand small kernels per call. A CUDA graph records those launches once and
replays them with one call, running the same kernels on the same data, so the result is bit-identical
to the wrapped model while the launch overhead disappears. Capturing a new shape takes a few calls of
the wrapped model (well under a second for the eager UNet). The wrapped model may also be a
:class:`~lipsync.models.compiled.CompiledUNet`: its fused kernels are then what the graphs replay.

Each distinct input signature (method, shapes, dtypes) gets its own graph, captured on first use
(``lipsync.lifecycle.warm_up`` captures the common ones before a server reports ready) and replayed
afterwards; inputs are copied into the graph's static tensors and outputs copied out. All graphs
draw from one memory pool, which is safe because replays never overlap (a lock serialises them) and
every output is copied before the next replay. They are also captured on one stream: the caching
allocator hands a freed block only to a request on the stream it was freed on, so only then does a
capture reuse the activations the earlier captures freed, and the pool grows to about the largest
shape's activations rather than their sum (:func:`lipsync.lifecycle.warm_up` captures the largest
shape first, so the smaller ones fit inside its blocks).

A capture holds :data:`~lipsync.gpu_guard.GPU_GUARD` exclusively, so no other thread's GPU work
(another job's VAE, a stage timer's device sync) can invalidate it; replays and the eager warm-up
calls hold it shared, like all other GPU work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lipsync.gpu_guard import GPU_GUARD, GpuGuard
from lipsync.gpu_memory import release_failed_call
from lipsync.models.compiled import CompiledUNet
from lipsync.models.unet import UNet3DConditionModel

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

_WARMUP_CALLS = 2
"""Eager calls before capture: cuDNN/cuBLAS pick their algorithms and allocate workspaces outside the graph."""

TensorFunction = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


class _CapturedCall:
    """One captured graph: its static inputs and outputs."""

    def __init__(
        self, function: TensorFunction, inputs: tuple[torch.Tensor, ...], pool: _POOL_HANDLE, side: torch.cuda.Stream
    ) -> None:
        with GPU_GUARD.shared():
            self.inputs = tuple(tensor.clone() for tensor in inputs)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_CALLS):
                    function(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with (
            GPU_GUARD.exclusive(),
            torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"),
        ):
            outputs = function(*self.inputs)
        self.outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        self.returns_tuple = isinstance(outputs, tuple)

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        with GPU_GUARD.shared():
            for static, tensor in zip(self.inputs, inputs, strict=True):
                static.copy_(tensor)
            self.graph.replay()
            outputs = tuple(output.clone() for output in self.outputs)
        return outputs if self.returns_tuple else outputs[0]


class CapturedCalls:
    """The captured calls of one UNet by input signature, and the locking around them.

    Replays share one memory pool, so a lock serialises them with each other and with captures. Every
    thread takes the GPU guard first and this lock second: a replay or an eager call holds the guard
    shared, a capture exclusively. Waiting for the exclusive guard while holding the lock would deadlock
    with a thread that holds the guard shared across a DDIM loop (the window batcher) and waits for the
    lock to make its next call; that is what a compilation capturing its graphs beside running jobs did.
    """

    def __init__(
        self,
        captures: Callable[[torch.Tensor], bool],
        capture: Callable[[TensorFunction, tuple[torch.Tensor, ...]], Callable[[tuple[torch.Tensor, ...]], Any]],
        guard: GpuGuard = GPU_GUARD,
    ) -> None:
        self._captures, self._capture, self._guard = captures, capture, guard
        self._calls: dict[tuple, Callable[[tuple[torch.Tensor, ...]], Any]] = {}
        self._too_large: set[tuple] = set()
        """Shapes whose capture ran out of memory (a ``gpu_memory_gib`` cap): they run eagerly."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._calls)

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    def run(self, key: tuple, function: TensorFunction, inputs: tuple[torch.Tensor, ...]) -> Any:
        """``function(*inputs)``: replayed when ``key`` has a graph, captured first when it may get one."""
        with self._guard.shared(), self._lock:
            call = self._calls.get(key)
            if call is not None:
                return call(inputs)
            if self._runs_eagerly(key, inputs[0]):
                return function(*inputs)
        with self._guard.exclusive(), self._lock:
            call = self._calls.get(key)  # another thread may have captured it meanwhile
            if call is None:
                if self._runs_eagerly(key, inputs[0]):
                    return function(*inputs)
                try:
                    call = self._calls[key] = self._capture(function, inputs)
                except torch.OutOfMemoryError as exc:  # over the process's memory cap: this shape runs uncaptured
                    release_failed_call(exc)  # the half-captured graph and its pool's blocks
                    self._too_large.add(key)
                    return function(*inputs)
            return call(inputs)

    def _runs_eagerly(self, key: tuple, sample: torch.Tensor) -> bool:
        """Whether a call of this shape, which has no graph, runs uncaptured (too large, or not to be captured)."""
        return key in self._too_large or not self._captures(sample)


class GraphedUNet:
    """Drop-in :class:`~lipsync.sampling.NoisePredictor` over a CUDA ``UNet3DConditionModel`` or ``CompiledUNet``.

    ``max_graphs`` bounds how many shapes are kept (each holds its static tensors; activations
    share the pool), and ``batch_rows`` (when given) which batch sizes are captured at all. Other calls
    run eagerly rather than capture more, and so do new shapes while :attr:`capturing` is off (a capture waits for every other thread's GPU section to end, which must
    not be a compilation running for minutes).
    """

    def __init__(
        self, unet: UNet3DConditionModel | CompiledUNet, max_graphs: int = 64, batch_rows: frozenset[int] | None = None
    ) -> None:
        if unet.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the UNet on a CUDA device, not {unet.device}")
        self.unet = unet
        self.max_graphs = max_graphs
        self.batch_rows = batch_rows
        self._graphs = CapturedCalls(self._captures, self._capture)
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(unet.device)
        """Every capture's stream (see the module docstring: blocks are reused on their own stream only)."""
        self.capturing = True
        self.pool_budget: int | None = None
        """Bytes the captures may add to the device's reserved memory (under a process memory cap: what the
        cap leaves for graphs beside the weights and the eager work); new shapes past it run eagerly."""
        self._pool_bytes = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def captured(self) -> int:
        """How many call shapes have a graph."""
        return len(self._graphs)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor) -> torch.Tensor:
        return self._run("forward", self.unet, sample, self._timestep(timestep), audio)

    def forward_caching(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run("forward_caching", self.unet.forward_caching, sample, self._timestep(timestep), audio)

    def forward_shallow(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, audio: torch.Tensor, deep_features: torch.Tensor
    ) -> torch.Tensor:
        return self._run(
            "forward_shallow", self.unet.forward_shallow, sample, self._timestep(timestep), audio, deep_features
        )

    def release(self) -> None:
        """Drop every graph and capture no more: calls run eagerly from now on, and the graphs' pool goes
        back to the allocator (for a UNet no longer serving, once the compiled one has taken over)."""
        self.capturing = False
        self._graphs.clear()
        torch.cuda.empty_cache()

    def _captures(self, sample: torch.Tensor) -> bool:
        """Whether a call of this new shape gets a graph."""
        allowed = self.batch_rows is None or sample.shape[0] in self.batch_rows
        room = self.pool_budget is None or self._pool_bytes < self.pool_budget
        return self.capturing and allowed and room and len(self._graphs) < self.max_graphs

    def _capture(self, function: TensorFunction, inputs: tuple[torch.Tensor, ...]) -> _CapturedCall:
        """Capture one shape, counting what it adds to reserved memory (the pool's growth; the warm-up calls'
        cached blocks are returned first, so they do not count)."""
        if self.pool_budget is None:
            return _CapturedCall(function, inputs, self._pool, self._stream)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        captured = _CapturedCall(function, inputs, self._pool, self._stream)
        torch.cuda.empty_cache()
        self._pool_bytes += max(0, torch.cuda.memory_reserved(self.device) - before)
        return captured

    def _timestep(self, timestep: torch.Tensor | int) -> torch.Tensor:
        """A one-element tensor on the GPU, so a graph can read each step's value from its static copy."""
        return torch.as_tensor(timestep, device=self.device).reshape(1)

    @torch.no_grad()
    def _run(self, name: str, function: TensorFunction, *inputs: torch.Tensor) -> Any:  # what ``function`` returns
        key = (name, *((tuple(tensor.shape), tensor.dtype) for tensor in inputs))
        # The calling thread's current device may be another GPU (each thread starts on device 0):
        # streams, the capture and the replay must all be on the UNet's device.
        with torch.cuda.device(self.device):
            return self._graphs.run(key, function, inputs)
