"""Shared paths and tiny-weight fixtures. Tiny checkpoints are written by the real writers and
loaded through the real loaders, exactly like downloaded weights."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.triton_server import TritonServer, TritonSettings
from gateway_process import LOAD_TEST_LIMITS, GatewayProcess
from postgres_server import PostgresServer, find_binary
from lipsync.config import CONFIG_DIR
from lipsync.tiny import write_tiny_weights
from lipsync.weights import WeightPaths

if TYPE_CHECKING:
    from local_gateway import LocalGateway

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REFERENCE_DIR = Path(__file__).resolve().parent / "fixtures" / "reference"
TINY_UNET_CONFIG = CONFIG_DIR / "unet" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> WeightPaths:
    """The full tiny weight set (UNet .pt, Whisper .pt, VAE folder), seed 0, official formats."""
    return write_tiny_weights(tmp_path_factory.mktemp("tiny-weights"), seed=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real ``tritonserver`` on loopback (CPU, tiny weights written by the model on first load), via our launcher."""
    root = tmp_path_factory.mktemp("triton")
    settings = TritonSettings.load(
        device="cpu", weights="tiny", checkpoints=str(root / "checkpoints"), workdir=root / "serve",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), startup_timeout_s=300,
    )
    with TritonServer(settings) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server in a temporary cluster (Debian's ``postgresql`` package; skips without it)."""
    if find_binary("initdb") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A ``lipsync-serve gateway`` process in front of the ``triton`` fixture: one job at a time, 5 MB body cap,
    the two keys of :data:`gateway_process.KEYS`, rates and job quota high enough for the load tests
    (:data:`gateway_process.LOAD_TEST_LIMITS`; the limits themselves are tested on a gateway of their own)."""
    process = GatewayProcess(tmp_path_factory.mktemp("gateway") / "data", triton.settings.grpc_url, free_port())
    process.configure(**LOAD_TEST_LIMITS).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    """The gateway app in this process on a stand-in backend (:mod:`local_gateway`), with the limits of ``gateway``."""
    from local_gateway import LocalGateway  # it imports this module's free_port

    with LocalGateway(tmp_path_factory.mktemp("local-gateway") / "data", **LOAD_TEST_LIMITS) as local:
        yield local
