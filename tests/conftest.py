"""Fixture files, tiny-weight fixtures, the session's Triton and gateway, and the skip policy.

Tiny checkpoints are written by the real writers and loaded through the real loaders, exactly like
downloaded weights. The fixture files are part of the repository: a missing one fails the run. A
skipped test fails the run too unless its reason is in :data:`EXPECTED_SKIPS`; the summary counts them.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (it reads this once): idle OpenMP threads sleep instead of spinning. The suite
# runs two test files at a time beside the servers they start, each a torch process with a thread per core;
# spinning threads then take the cores the other processes' work is waiting for (many times slower on two
# cores). Subprocesses (Triton and its model stubs, the gateway, the CLI) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist the workers share the cores: each worker, and the servers and subprocesses it starts, gets
# its share of them as torch threads. Threads beyond that only contend (on two cores, two workers at two
# threads each run the tiny UNet about a quarter slower than at one thread each).
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))

from collections.abc import Iterator

import pytest
from support.files import DEMO_AUDIO, DEMO_VIDEO, OFFICIAL_UNET_KEYS, REFERENCE_DIR
from support.gateway_process import LOAD_TEST_LIMITS, GatewayProcess
from support.local_gateway import LocalGateway
from support.postgres_server import PostgresServer, find_binary

from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.tiny import write_tiny_weights
from lipsync.weights import WeightPaths

EXPECTED_SKIPS = ("insightface is installed",)
"""Skip reasons (prefixes) that are expected on some machines; any other skip fails the session."""


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [path for path in (DEMO_VIDEO, DEMO_AUDIO, OFFICIAL_UNET_KEYS, REFERENCE_DIR / "metadata.json")
               if not path.is_file()]
    if missing:
        pytest.exit(f"test fixtures missing (they are part of the repository): {', '.join(map(str, missing))}", returncode=1)


_skips: list[tuple[str, str]] = []
"""(test id, reason) of every test skipped in this session."""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def _unexpected() -> list[tuple[str, str]]:
    return [(test, reason) for test, reason in _skips if not reason.startswith(EXPECTED_SKIPS)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    unexpected = _unexpected()
    terminalreporter.write_line(f"skipped: {len(_skips)} ({len(_skips) - len(unexpected)} expected, {len(unexpected)} unexpected)")
    for test, reason in unexpected:
        terminalreporter.write_line(f"unexpected skip: {test}: {reason}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> WeightPaths:
    """The full tiny weight set (UNet .pt, Whisper .pt, VAE folder), seed 0, official formats."""
    return write_tiny_weights(tmp_path_factory.mktemp("tiny-weights"), seed=0)


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real ``tritonserver`` on loopback (CPU, tiny weights written by the model on first load), via our launcher."""
    root = tmp_path_factory.mktemp("triton")
    settings = TritonSettings.load(
        device="cpu", weights="tiny", checkpoints=str(root / "checkpoints"), workdir=root / "serve",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), startup_timeout_s=300,
        exit_timeout_s=5,  # at the end no job runs; Triton would wait out idle HTTP keep-alive clients instead
    )
    with TritonServer(settings) as server:
        yield server


@pytest.fixture(autouse=True)
def _session_triton_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that uses the session's Triton fails when the server dies during it, with how it ended
    (signal, end of its log); the server is started again so that the tests after it still run."""
    if "triton" not in request.fixturenames:
        yield
        return
    server: TritonServer = request.getfixturevalue("triton")
    yield
    if server.process is None or server.process.poll() is None:
        return
    reason = server.exit_reason()
    server.stop()  # reaps its stubs and frees the work folder
    server.start()
    server.wait_ready()
    pytest.fail(f"the session's Triton died during this test (started again for the next ones): {reason}", pytrace=False)


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
    the two keys of :data:`support.gateway_process.KEYS`, rates and job quota high enough for the load tests
    (:data:`support.gateway_process.LOAD_TEST_LIMITS`; the limits themselves are tested on a gateway of their own)."""
    process = GatewayProcess(tmp_path_factory.mktemp("gateway") / "data", triton.settings.grpc_url, free_port())
    process.configure(**LOAD_TEST_LIMITS).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    """The gateway app in this process on a stand-in backend (:mod:`support.local_gateway`), with the limits of ``gateway``."""
    with LocalGateway(tmp_path_factory.mktemp("local-gateway") / "data", **LOAD_TEST_LIMITS) as local:
        yield local
