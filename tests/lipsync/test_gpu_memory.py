"""release_failed_call: a call that ran out of memory gives its memory back while its error is still held."""

from __future__ import annotations

import gc
import traceback
import weakref

import pytest
import torch

from lipsync.gpu_memory import release_failed_call


class _Activations:
    """Stands in for a forward pass's tensors: something a frame holds that a weak reference can watch."""


def _forward(held: list[weakref.ref]) -> None:
    activations = _Activations()
    held.append(weakref.ref(activations))
    raise torch.OutOfMemoryError("CUDA out of memory (stand-in cap)")


def _call_that_fails(held: list[weakref.ref]) -> None:
    try:
        _forward(held)
    except torch.OutOfMemoryError as exc:
        raise RuntimeError("the group failed") from exc


@pytest.fixture
def no_collector():
    """Nothing is freed by a garbage collection while the test runs: only reference counts free it."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_failed_calls_locals_are_freed_while_its_error_is_kept(no_collector) -> None:
    held: list[weakref.ref] = []
    kept: list[BaseException] = []  # as a future keeps the error for the job's thread
    try:
        _forward(held)
    except torch.OutOfMemoryError as exc:
        kept.append(exc)
        assert held[0]() is not None  # the traceback keeps the failed frame's locals
        release_failed_call(exc)
    assert held[0]() is None
    lines = "".join(traceback.format_exception(kept[0]))
    assert "_forward" in lines and "out of memory" in lines  # it still reads the same


def test_the_errors_it_chains_are_released_too(no_collector) -> None:
    held: list[weakref.ref] = []
    kept: list[BaseException] = []
    try:
        _call_that_fails(held)
    except RuntimeError as exc:
        kept.append(exc)
        release_failed_call(exc)
    assert held[0]() is None
    assert isinstance(kept[0].__cause__, torch.OutOfMemoryError)
