"""The gateway's describe request against a gRPC server that takes the stream and never answers (as Triton
does when the model instance that got the request died): it fails in its timeout instead of waiting forever."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc

from gateway.backends.triton_client import TritonJobError, served_info
from gateway.launcher.ports import free_port
from lipsync.errors import ErrorKind


class SilentStreams(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Takes each stream's requests and answers none of them: the stream stays open until the client cancels it."""

    def __init__(self) -> None:
        self.requests = 0
        self.cancelled = threading.Event()

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 - the service's method name
        context.add_callback(self.cancelled.set)  # runs when the call ends: here, only by the client's cancel
        for _ in request_iterator:
            self.requests += 1
        self.cancelled.wait()
        return iter(())


@pytest.fixture
def silent_server() -> Iterator[tuple[str, SilentStreams]]:
    servicer = SilentStreams()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_a_describe_request_nobody_answers_fails_in_its_timeout_and_cancels_the_stream(silent_server) -> None:
    url, servicer = silent_server
    raised: list[BaseException] = []

    def describe() -> None:
        try:
            served_info(url, timeout_s=1.0)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            raised.append(exc)

    caller = threading.Thread(target=describe, daemon=True)  # a caller that waits forever must not hold the run
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "served_info still waits after 30 s"
    [error] = raised
    assert isinstance(error, TritonJobError) and error.kind is ErrorKind.UNAVAILABLE
    assert "no answer from Triton in 1 s" in str(error)
    assert servicer.requests == 1 and servicer.cancelled.is_set()
