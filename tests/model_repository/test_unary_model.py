"""``lipsync_unary``'s adapter with a stand-in ``triton_python_backend_utils``: its answer, and when it lets go
of the ``lipsync`` stream it read.

The bundled Python backend's stub drops its own reference to a finished decoupled BLS stream on a thread
without the GIL; whichever reference goes last frees the stream's responses. The adapter must ask the
request ``is_cancelled()`` (handled on that thread, in order, after the stream's release) before it drops
its own, so that its reference, dropped with the GIL, is the last (``lipsync.serving.StreamReleases``).
The real race needs thousands of requests to show (docs/architecture.md), so these tests check the order.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lipsync import contract
from lipsync.errors import BadInput

MODEL = Path(__file__).resolve().parents[2] / "model_repository" / "lipsync_unary" / "1" / "model.py"


class Tensor:
    """A BYTES tensor, as the stub loads it: an object array of ``bytes``."""

    def __init__(self, name: str, value: bytes | str) -> None:
        self.name = name
        self._array = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)

    def as_numpy(self) -> np.ndarray:
        return self._array


class Response:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: Exception | None = None) -> None:
        self.tensors = {tensor.name: tensor for tensor in output_tensors or []}
        self.error = error


class Stream:
    """A decoupled BLS stream: its responses, then ``broken`` if set; notes when its last reference goes."""

    def __init__(self, responses: list[Response], events: list[str], broken: Exception | None) -> None:
        self._responses, self._events, self._broken = responses, events, broken

    def __iter__(self) -> Iterator[Response]:
        # No frame of the iteration refers to the stream (as with the stub's): a raised error does not keep it alive.
        return itertools.chain(self._responses, _raise(self._broken) if self._broken else ())

    def __del__(self) -> None:
        self._events.append("stream released")


def _raise(error: Exception) -> Iterator[Response]:
    raise error
    yield


class Request:
    def __init__(self, events: list[str]) -> None:
        self.inputs = {name: Tensor(name, b"media") for name in contract.MEDIA}
        self._events = events

    def request_id(self) -> str:
        return "job-1"

    def is_cancelled(self) -> bool:
        self._events.append("is_cancelled answered")
        return False


def stand_in_pb_utils(stream: list[Response], events: list[str], broken: Exception | None) -> types.ModuleType:
    """The part of ``triton_python_backend_utils`` the adapter uses; its BLS request streams ``stream``."""
    pb_utils = types.ModuleType("triton_python_backend_utils")

    class InferenceRequest:
        def __init__(self, model_name: str, inputs: list[Tensor], **options: Any) -> None:
            assert model_name == "lipsync"
            assert options["parameters"] == {contract.NO_ERROR_RESPONSE: True}

        def exec(self, decoupled: bool) -> Stream:
            assert decoupled
            return Stream(stream, events, broken)

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str) -> None:
            super().__init__(message)
            self.code = code

    pb_utils.InferenceRequest = InferenceRequest  # type: ignore[attr-defined]
    pb_utils.InferenceResponse = Response  # type: ignore[attr-defined]
    pb_utils.TritonError = TritonError  # type: ignore[attr-defined]
    pb_utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    pb_utils.get_output_tensor_by_name = lambda response, name: response.tensors.get(name)  # type: ignore[attr-defined]
    return pb_utils


def forward(
    monkeypatch: pytest.MonkeyPatch, stream: list[Response], events: list[str], broken: Exception | None = None
) -> Response:
    """Load the adapter against the stand-in and answer one request, noting in ``events`` what happened, in order."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in_pb_utils(stream, events, broken))
    spec = importlib.util.spec_from_file_location("lipsync_unary_model", MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({})
    [answer] = model.execute([Request(events)])
    assert not model.releases
    events.append("answered")
    return answer


def progress(stage: str) -> Response:
    return Response([Tensor("STAGE", stage)])


def test_the_final_video_is_answered_after_the_stub_let_go_of_the_stream(monkeypatch) -> None:
    final = Response([Tensor("VIDEO_OUT", b"mp4"), Tensor("STAGE", "done"), Tensor("INFO", '{"frames": 50}')])
    events: list[str] = []
    answer = forward(monkeypatch, [progress("decode"), progress("denoise"), final], events)
    assert answer.error is None
    assert answer.tensors["VIDEO_OUT"].as_numpy()[0] == b"mp4"
    assert json.loads(answer.tensors["INFO"].as_numpy()[0]) == {"frames": 50}
    assert events == ["is_cancelled answered", "stream released", "answered"]


def test_a_failed_job_is_answered_with_its_code_after_the_stub_let_go_of_the_stream(monkeypatch) -> None:
    failed = Response(
        [Tensor("STAGE", contract.FAILED_STAGE), Tensor("INFO", contract.failure_info(BadInput("no face")))]
    )
    events: list[str] = []
    answer = forward(monkeypatch, [progress("decode"), failed], events)
    assert str(answer.error) == "no face"
    assert answer.error.code == "INVALID_ARG"
    assert events == ["is_cancelled answered", "stream released", "answered"]


def test_a_broken_stream_is_let_go_of_in_the_same_order(monkeypatch) -> None:
    events: list[str] = []
    with pytest.raises(RuntimeError, match="stub gone"):
        forward(monkeypatch, [progress("decode")], events, broken=RuntimeError("stub gone"))
    assert events == ["is_cancelled answered", "stream released"]
