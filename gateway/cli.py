"""``lipsync-serve``: run the service locally.

``up`` starts Triton, then the gateway in front of it (the README's main command); ``gateway`` runs the
gateway alone against a running Triton; ``triton`` runs Triton alone. ``up`` and ``triton`` exit with
status 1 when their Triton exits on its own (crash, kill), so a supervisor sees it and can restart them.
``up`` says which weights it serves and prints one ``ready at …`` line once the gateway answers, then one
line per job start and end (no HTTP access lines: the web page polls every second), and a last line once
everything has stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn

from gateway.core.auth import LOCAL_KEY_FILE, ApiKeys, local_key
from gateway.core.settings import GatewaySettings
from gateway.launcher.ports import Listener
from gateway.launcher.triton_server import (
    SERVING_CONFIG,
    TritonError,
    TritonServer,
    TritonSettings,
)
from lipsync.errors import WeightsError
from lipsync.weights import chosen_version, load_weights_config, present_weights


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync-serve", description="Serve LatentSync lip-sync (Triton + gateway).")
    commands = parser.add_subparsers(dest="command", required=True)
    triton = commands.add_parser("triton", help="run the Triton server with this model repository until SIGTERM/Ctrl-C")
    _triton_arguments(triton)
    triton.add_argument("--address", help="listen address (default 127.0.0.1)")
    gateway = commands.add_parser("gateway", help="run the REST gateway against a running Triton")
    _gateway_arguments(gateway)
    gateway.add_argument("--triton-grpc", help="host:port of Triton's gRPC (default: configs/serving.yaml)")
    gateway.add_argument(
        "--triton-urls", help="several Triton gRPC endpoints, comma-separated host:port (jobs spread by load)"
    )
    up = commands.add_parser(
        "up", help="start Triton and the gateway (CPU and tiny weights unless a GPU / real weights are here)"
    )
    _triton_arguments(up)
    _gateway_arguments(up)
    for command in (triton, gateway, up):
        command.add_argument(
            "--config", type=Path, default=SERVING_CONFIG, help="serving config (default configs/serving.yaml)"
        )
    return parser


def _triton_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the lipsync model runs and what it loads; defaults in configs/serving.yaml."""
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], help="where the lipsync model runs")
    parser.add_argument(
        "--gpus", type=lambda text: tuple(int(i) for i in text.split(",")), help="GPU ids, e.g. 0,1 (default: all)"
    )
    parser.add_argument(
        "--split-jobs",
        action=argparse.BooleanOptionalAction,
        help="one instance over all the GPUs, spreading long jobs over them (default: one instance per GPU)",
    )
    parser.add_argument(
        "--job-processes",
        type=lambda text: text if text == "auto" else int(text),
        help="CPU processes for the jobs' frame work, windows generated on each GPU by lipsync_generate; "
        "0 = one process per GPU does everything (default auto: 4 on GPU, 0 on CPU)",
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float, help="cap on each GPU's generation process in GiB (0 = none; default 20)"
    )
    parser.add_argument(
        "--weights", choices=["auto", "1.5", "1.6", "tiny"], help="weight set (auto: 1.5 if present, else tiny)"
    )
    parser.add_argument("--checkpoints", help="weights root")
    parser.add_argument(
        "--dtype", choices=["auto", "fp16", "bf16", "fp32"], help="model precision (auto: fp16 on GPU, fp32 on CPU)"
    )
    parser.add_argument(
        "--compile-before-ready",
        action=argparse.BooleanOptionalAction,
        help="compile the UNet before the server reports ready (default: serve at once, switch when compiled)",
    )
    parser.add_argument("--http-port", type=int, help="Triton's HTTP port")
    parser.add_argument("--grpc-port", type=int, help="Triton's gRPC port")
    parser.add_argument("--metrics-port", type=int, help="Triton's metrics port")
    parser.add_argument("--workdir", type=Path, help="Triton's rendered repository, backend folder and triton.log")


def _triton_settings(args: argparse.Namespace) -> TritonSettings:
    return TritonSettings.load(
        args.config,
        device=args.device,
        gpus=args.gpus,
        split_jobs=args.split_jobs,
        job_processes=args.job_processes,
        gpu_memory_gib=args.gpu_memory_gib,
        weights=args.weights,
        checkpoints=args.checkpoints,
        dtype=args.dtype,
        compile_before_ready=args.compile_before_ready,
        address=getattr(args, "address", None),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        workdir=args.workdir,
    )


def _gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", dest="gateway_address", help="gateway listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gateway port (default 8080)")
    parser.add_argument("--data-dir", type=Path, help="job table, inputs and results")
    parser.add_argument("--api-keys-file", help="file of API keys (one per line, or sha256:<hex>)")
    parser.add_argument("--concurrency", type=int, help="jobs streamed to Triton at once")
    parser.add_argument("--max-body-mb", type=float, help="request body cap")
    parser.add_argument("--public-url", help="base of result URLs sent in webhooks (default http://host:port)")
    parser.add_argument(
        "--webhook-allow", help="internal webhook receivers to allow: comma-separated IPs, CIDRs, host names"
    )
    parser.add_argument("--webhook-timeout-s", type=float, help="deadline of one whole webhook delivery attempt")


def _gateway_settings(args: argparse.Namespace, triton_grpc: str | None) -> GatewaySettings:
    return GatewaySettings.load(
        args.config,
        address=args.gateway_address,
        port=args.port,
        data_dir=args.data_dir,
        api_keys_file=args.api_keys_file,
        concurrency=args.concurrency,
        max_body_mb=args.max_body_mb,
        triton_grpc=triton_grpc,
        public_url=args.public_url,
        triton_urls=getattr(
            args, "triton_urls", ()
        ),  # `up` (no such flag): its own Triton only, whatever the environment says
        webhook_allow=args.webhook_allow,
        webhook_timeout_s=args.webhook_timeout_s,
    )


def _keys(settings: GatewaySettings, local: bool) -> tuple[ApiKeys, str]:
    """Configured keys; with none and ``local``, the data directory's local key (made on first use, printed).
    Also where the keys are, for the ready line."""
    keys = ApiKeys.load(settings.api_keys_env, settings.api_keys_file)
    if len(keys) or not local:
        return keys, " and ".join(
            [f"${settings.api_keys_env}"] + ([settings.api_keys_file] if settings.api_keys_file else [])
        )
    key_file = settings.data_dir / LOCAL_KEY_FILE
    key = local_key(key_file)
    print(
        f"no API key configured (${settings.api_keys_env} or api_keys_file): using the local key in {key_file}:\n"
        f"    {key}",
        file=sys.stderr,
    )
    return ApiKeys.load(settings.api_keys_env, None, extra=[key]), str(key_file)


def _weights_line(settings: TritonSettings) -> str:
    """What the ``lipsync`` model will load, chosen as the model chooses it (:func:`lipsync.server_weights.weights_for`).
    Raises :class:`WeightsError` when a named real version is missing."""
    root = settings.checkpoints or None
    version = chosen_version(settings.weights, root)
    if version == "tiny":
        real_root = Path(root) if root else load_weights_config().version("1.5").root
        return (
            f"weights: tiny demo weights (random weights: the mouth will be noise; put real LatentSync "
            f"checkpoints in {real_root}/ with scripts/download_weights.py, see README)"
        )
    return f"weights: LatentSync {version} from {present_weights(version, root).unet.parent}"


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_ready`` once it listens.

    A Ctrl-C or SIGTERM shuts it down gracefully and :meth:`run` returns. uvicorn would then raise the
    signal again for the caller, and asyncio's own SIGINT handler would turn that into a traceback of
    the already-finished app; the caller stops Triton next in either case, so the signal is not
    raised again."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _run_gateway(settings: GatewaySettings, keys: ApiKeys, key_source: str, triton: TritonServer | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C (0), or until ``triton`` exits on its own (1: the gateway stops with it)."""
    from gateway.api.app import (
        create_app,  # FastAPI and the media checks load only for the commands that serve
    )

    print(
        f"gateway: http://{settings.address}:{settings.port}/ (Triton gRPC {', '.join(settings.triton_endpoints)}, "
        f"data {settings.data_dir})",
        file=sys.stderr,
    )
    ready = f"ready at http://{settings.address}:{settings.port} (API key in {key_source})"
    config = uvicorn.Config(create_app(settings, keys), host=settings.address, port=settings.port, access_log=False)
    server = _Server(config, on_ready=lambda: print(ready, file=sys.stderr, flush=True))
    triton_exited = threading.Event()

    def stop_gateway(reason: str) -> None:
        print(f"error: {reason}\nstopping the gateway", file=sys.stderr)
        triton_exited.set()
        server.should_exit = True

    if triton is not None:
        triton.watch(stop_gateway)
    server.run()
    return 1 if triton_exited.is_set() else 0


def _serve_gateway(args: argparse.Namespace) -> int:
    settings = _gateway_settings(args, args.triton_grpc)
    keys, key_source = _keys(settings, local=False)
    if not len(keys):
        print(f"error: no API key configured: set ${settings.api_keys_env} or gateway.api_keys_file", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)  # uvicorn re-raises the signal once it has shut down
    try:
        return _run_gateway(settings, keys, key_source)
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopped: the gateway", file=sys.stderr)


def _serve_all(args: argparse.Namespace) -> int:
    triton_settings = _triton_settings(args)
    settings = _gateway_settings(args, triton_settings.grpc_url)
    try:
        weights = _weights_line(triton_settings)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    keys, key_source = _keys(settings, local=True)
    server = TritonServer(triton_settings)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start(other_listeners=[Listener("gateway", settings.address, settings.port)])
        print(weights, file=sys.stderr)
        print(f"starting Triton ({triton_settings.resolved_device()}); log: {server.log_path}", file=sys.stderr)
        server.wait_ready()
        return _run_gateway(settings, keys, key_source, server)
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        started = server.process is not None
        if started:
            print("stopping Triton", file=sys.stderr)
        server.stop()
        if started:
            print("stopped: Triton and the gateway", file=sys.stderr)


def _interrupt(*_: object) -> None:
    """SIGTERM takes the Ctrl-C path."""
    raise KeyboardInterrupt


def _serve_triton(args: argparse.Namespace) -> int:
    settings = _triton_settings(args)
    try:
        weights = _weights_line(settings)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    server = TritonServer(settings)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        print(weights, file=sys.stderr)
        print(f"starting Triton ({settings.resolved_device()}); log: {server.log_path}", file=sys.stderr)
        server.wait_ready()
        print(
            f"ready: HTTP {settings.http_url}  gRPC {settings.grpc_url}  metrics {settings.metrics_url}",
            file=sys.stderr,
        )
        server.wait()
        print(f"error: {server.exit_reason()}", file=sys.stderr)
        return 1
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping Triton", file=sys.stderr)
        return 0
    finally:
        started = server.process is not None
        server.stop()
        if started:
            print("stopped: Triton", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The gateway's own lines (a job started or ended, a Triton left behind) as plain lines beside ours.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("gateway").addHandler(handler)
    logging.getLogger("gateway").setLevel(logging.INFO)
    commands = {"triton": _serve_triton, "gateway": _serve_gateway, "up": _serve_all}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
