"""``lipsync-serve``: run the service locally. ``lipsync-serve triton`` starts the Triton server."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from gateway.triton_server import TritonError, TritonServer, TritonSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync-serve", description="Serve LatentSync lip-sync (Triton + gateway).")
    commands = parser.add_subparsers(dest="command", required=True)
    triton = commands.add_parser("triton", help="run the Triton server with this model repository until SIGTERM/Ctrl-C")
    triton.add_argument("--device", choices=["auto", "cpu", "gpu"], help="where the lipsync model runs (default: configs/serving.yaml)")
    triton.add_argument("--gpus", type=lambda text: tuple(int(i) for i in text.split(",")), help="GPU ids, e.g. 0,1 (default: all)")
    triton.add_argument("--weights", choices=["auto", "1.5", "1.6", "tiny"], help="weight set (auto: 1.5 if present, else tiny)")
    triton.add_argument("--checkpoints", help="weights root")
    triton.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], help="model precision (auto: fp16 on GPU, fp32 on CPU)")
    triton.add_argument("--address", help="listen address (default 127.0.0.1)")
    triton.add_argument("--http-port", type=int)
    triton.add_argument("--grpc-port", type=int)
    triton.add_argument("--metrics-port", type=int)
    triton.add_argument("--workdir", type=Path, help="rendered repository, backend folder and triton.log")
    return parser


def _serve_triton(args: argparse.Namespace) -> int:
    settings = TritonSettings.load(
        device=args.device, gpus=args.gpus, weights=args.weights, checkpoints=args.checkpoints, dtype=args.dtype, address=args.address,
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port, workdir=args.workdir,
    )
    server = TritonServer(settings)
    stop = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731 - turn SIGTERM into the Ctrl-C path
    signal.signal(signal.SIGTERM, stop)
    try:
        server.start()
        print(f"starting Triton ({settings.resolved_device()}, weights {settings.weights}); log: {server.log_path}", file=sys.stderr)
        server.wait_ready()
        print(f"ready: HTTP {settings.http_url}  gRPC {settings.grpc_url}  metrics {settings.metrics_url}", file=sys.stderr)
        return server.process.wait()
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping Triton", file=sys.stderr)
        return 0
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return _serve_triton(args)


if __name__ == "__main__":
    sys.exit(main())
