"""Triton adapter for ``lipsync_unary``: forwards a request to the streaming ``lipsync`` model (BLS)
and answers with its final response only, for clients that call plain ``infer``."""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils

from lipsync import contract
from lipsync.serving import StreamReleases

_INPUTS = (*contract.MEDIA, *(option.tensor for option in contract.OPTIONS))
_OUTPUTS = ["VIDEO_OUT", "INFO"]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.releases = StreamReleases()

    def execute(self, requests):
        return [self._forward(request) for request in requests]

    def _forward(self, request: Any) -> pb_utils.InferenceResponse:
        inputs = [
            tensor for name in _INPUTS if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None
        ]
        job = pb_utils.InferenceRequest(
            model_name="lipsync",
            inputs=inputs,
            requested_output_names=[*_OUTPUTS, "STAGE"],
            request_id=request.request_id(),
            parameters={contract.NO_ERROR_RESPONSE: True},
        )
        final = failure = None
        try:
            # Read to the end (its final flag), past a failure, so the lipsync request is complete when this one answers.
            for response in self.releases.read(job.exec(decoupled=True)):
                stage = pb_utils.get_output_tensor_by_name(response, "STAGE")
                if stage is not None and stage.as_numpy()[0].decode() == contract.FAILED_STAGE:
                    # INFO {"error", "code"}: the code is the Triton error code of the failure's kind
                    failure = json.loads(pb_utils.get_output_tensor_by_name(response, "INFO").as_numpy()[0])
                elif pb_utils.get_output_tensor_by_name(response, "VIDEO_OUT") is not None:
                    final = response
        finally:
            # Nothing else asks ``request``, so its answer is a round trip through the stub's message thread.
            self.releases.ask(request.is_cancelled)
        if failure is not None:
            code = getattr(pb_utils.TritonError, failure["code"], pb_utils.TritonError.INTERNAL)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(failure["error"], code))
        if final is None:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError("lipsync ended without a video", pb_utils.TritonError.INTERNAL)
            )
        return pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(final, name) for name in _OUTPUTS])
