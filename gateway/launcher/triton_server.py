"""Run the real Triton server bundled in the ``nvidia-pytriton`` wheel with our model repository.

No Docker: the wheel ships ``tritonserver`` 2.51, its Python backend and one backend stub per Python
version. What the server needs around it:

- a backend directory holding the Python backend and the stub built for *this* Python;
- ``LD_LIBRARY_PATH`` with the wheel's bundled libraries and this interpreter's ``libpython`` first
  (a distro libpython of another patch release breaks the stub);
- ``PATH`` starting with the environment the stub should run in: the stub takes ``sys.prefix`` from
  the first ``python3`` there, and that environment needs ``numpy<2`` and this package;
The model repository is rendered into the work folder from ``model_repository/``: only the
``lipsync`` model's instance kind, GPU list (one instance per GPU, or with ``split_jobs`` one instance
holding them all), weight parameters, when the UNet compiles, the kernel cache folder and the stage rates file
change, from configuration. The kernel cache (``workdir/inductor-cache``) keeps the compiled UNet's kernels
across restarts, the stage rates file (``workdir/stage-rates-<weights>-<device>.json``) what the ETA learned;
both travel as model parameters because the backend stubs do not see the server's environment variables.

One launcher serves from a work folder at a time (``triton.pid`` there is locked while it lives and
records its ``tritonserver``). Starting stops a Triton that a killed launcher left behind in the folder,
refuses ports that are taken, and keeps earlier logs as ``triton.log.1`` … ``.N``; the server gets
SIGTERM if its launcher dies.

Stopping first creates ``workdir/stopping`` (the ``lipsync`` model's ``stop_file``): running jobs, unary
ones included, end as cancelled within a denoising step, so Triton has no request to wait for and
unloads at once. Shared-memory regions of this server's stubs that remain after it exited are removed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx2
import psutil
from google.protobuf import text_format
from pydantic import AfterValidator, NonNegativeFloat, NonNegativeInt
from pydantic.dataclasses import dataclass as pydantic_dataclass
from tritonclient.grpc import model_config_pb2

from gateway.core.settings import SERVING_CONFIG
from gateway.launcher.logfiles import rotate
from gateway.launcher.pidfile import PidFile, WorkFolderInUse
from gateway.launcher.ports import Listener, listens, taken
from gateway.launcher.processes import ProcessRecord, die_with_parent, kill_and_wait
from gateway.launcher.shm import (
    record_regions,
    recorded_regions,
    remove_regions,
    stub_regions,
)
from gateway.launcher.triton_log import LogPump
from lipsync.config import SCHEMA, ConfigError, home_path, load_settings
from lipsync.weights import chosen_version

log = logging.getLogger(__name__)

MODEL_REPOSITORY = Path(str(files("gateway") / "model_repository"))
"""The Triton model repository shipped in the package (in a checkout, a link to the top-level ``model_repository/``)."""
PIPELINE_MODEL = "lipsync"
AUTO_JOB_PROCESSES = 4
"""Job processes of a GPU server by default: enough frame work in parallel to keep one GPU's generation busy."""
GENERATION_MODEL = "lipsync_generate"
"""Generates the windows of the ``lipsync`` model's jobs when those run in separate CPU processes."""
PID_FILE = "triton.pid"
"""In the work folder: the launcher and the ``tritonserver`` it started (:mod:`gateway.launcher.pidfile`)."""
REGIONS_FILE = "shm-regions"
"""In the work folder: the server's shared-memory regions, removed by the next launcher if this one is killed."""
STOP_FILE = "stopping"
"""In the work folder: created when the launcher stops the server; the ``lipsync`` model then cancels its jobs."""
STAGE_RATES_FILE = "stage-rates-{weights}-{device}.json"
"""In the work folder: the stage times the ``lipsync`` model's ETA learns, per served weight set and device kind."""


class TritonError(RuntimeError):
    """The server could not be found, started, or did not become ready."""


@pydantic_dataclass(frozen=True, config=SCHEMA)
class TritonSettings:
    """Where the server listens and what the ``lipsync`` model loads; defaults in ``configs/serving.yaml``."""

    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    device: Literal["auto", "cpu", "gpu"] = "auto"
    gpus: tuple[NonNegativeInt, ...] = ()
    split_jobs: bool = False
    """One ``lipsync`` instance holding a replica on every GPU (long jobs spread over them) instead of one per GPU."""
    job_processes: NonNegativeInt | Literal["auto"] = "auto"
    """CPU processes (``lipsync`` instances) doing the jobs' frame work, their windows generated by one
    ``lipsync_generate`` instance per GPU; 0 = each ``lipsync`` instance generates its own (one per GPU, or the
    CPU). ``auto``: 4 on a GPU server (0 with ``split_jobs``), 0 on the CPU."""
    gpu_memory_gib: NonNegativeFloat = 20.0
    """Cap on each ``lipsync_generate`` instance's GPU memory (0 = none)."""
    weights: str = "auto"
    checkpoints: str = ""
    dtype: str = "auto"
    compile_unet: bool | None = None
    """Run the UNet through ``torch.compile`` (``True``) or not (``False``); ``None`` = ``configs/pipeline.yaml``'s
    ``compile_unet`` (auto: on GPUs)."""
    compile_before_ready: bool = False
    """Compile the UNet before the ``lipsync`` model reports ready, instead of on a thread while it serves."""
    workdir: Annotated[Path, AfterValidator(home_path)] = Path(".serve")
    """Relative paths in the config are taken from :data:`lipsync.config.HOME`."""
    startup_timeout_s: float = 600.0
    exit_timeout_s: int = 30
    log_files_kept: int = 5
    """Logs of earlier runs kept beside ``triton.log`` as ``triton.log.1`` (the last) … ``.N``."""
    cpu_log_noise: tuple[str, ...] = ()
    """Server output lines containing one of these are left out of the log on CPU (:mod:`gateway.launcher.triton_log`)."""
    python_env: Path = field(default_factory=lambda: Path(sys.prefix))
    """Environment the backend stub runs in (``numpy<2`` and this package installed)."""

    @classmethod
    def load(cls, path: Path = SERVING_CONFIG, **overrides: Any) -> TritonSettings:
        """Read section ``triton`` of ``path`` (once); ``None`` overrides are ignored."""
        return load_settings(cls, path, "serving config", section="triton", **overrides)

    def stop_file(self) -> Path:
        """Created when the launcher stops the server (absolute: the stubs run elsewhere)."""
        return (self.workdir / STOP_FILE).resolve()

    def kernel_cache_dir(self) -> Path:
        """Where the compiled UNet's kernels are kept across restarts (absolute: the stubs run elsewhere)."""
        return (self.workdir / "inductor-cache").resolve()

    def stage_rates_file(self) -> Path:
        """Where the ``lipsync`` instances keep the stage times their ETA learns, shared and across restarts
        (absolute: the stubs run elsewhere). One file per weight set the model will load (``auto`` resolved
        as the model resolves it) and device kind: the speeds of one say nothing about another."""
        weights = chosen_version(self.weights, self.checkpoints or None)
        name = STAGE_RATES_FILE.format(weights=weights, device=self.resolved_device())
        return (self.workdir / name).resolve()

    def resolved_job_processes(self) -> int:
        """How many separate job processes the server runs (0: jobs generate their own windows)."""
        if self.job_processes != "auto":
            return self.job_processes
        return AUTO_JOB_PROCESSES if self.resolved_device() == "gpu" and not self.split_jobs else 0

    def resolved_dtype(self) -> str:
        """The models' precision: ``auto`` is fp16 on a GPU (as official), fp32 on the CPU."""
        if self.dtype != "auto":
            return self.dtype
        return "fp16" if self.resolved_device() == "gpu" else "fp32"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"

    @property
    def http_address(self) -> str:
        """``host:port`` of the HTTP endpoint, as ``tritonclient.http`` takes it."""
        return f"{self.address}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    def listeners(self) -> list[Listener]:
        return [
            Listener("Triton HTTP", self.address, self.http_port),
            Listener("Triton gRPC", self.address, self.grpc_port),
            Listener("Triton metrics", self.address, self.metrics_port),
        ]


def bundled_triton() -> Path:
    """The folder holding ``pytriton/`` and ``nvidia_pytriton.libs/``: ``$TRITON_DIST`` or the installed wheel.

    Found without importing ``pytriton`` (its import pulls in its own Python-side server).
    """
    if os.environ.get("TRITON_DIST"):
        root = Path(os.environ["TRITON_DIST"])
    else:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise TritonError("the Triton server is not installed: pip install nvidia-pytriton==0.7.0")
        root = Path(spec.origin).parent.parent
    if not (root / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        raise TritonError(f"no tritonserver binary below {root}")
    return root


def render_repository(settings: TritonSettings, source: Path = MODEL_REPOSITORY) -> Path:
    """Copy ``source`` into ``workdir/model_repository``, placing the ``lipsync`` model (and, with separate job
    processes, ``lipsync_generate``) per ``settings``."""
    dest = settings.workdir / "model_repository"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    on_gpu = settings.resolved_device() == "gpu"
    processes = settings.resolved_job_processes()
    if processes and settings.split_jobs:
        raise ConfigError("split_jobs holds every GPU in one lipsync instance: set job_processes to 0 (or auto)")
    with _model_config(dest / PIPELINE_MODEL) as config:
        group = config.instance_group.add(count=1)
        if processes:
            group.kind, group.count = model_config_pb2.ModelInstanceGroup.KIND_CPU, processes
            config.parameters["generator"].string_value = GENERATION_MODEL
            config.parameters["dtype"].string_value = settings.resolved_dtype()
        else:
            _place(group, settings, on_gpu)
            if on_gpu and settings.split_jobs:
                config.parameters["devices"].string_value = ",".join(map(str, settings.gpus)) or "all"
            config.parameters["dtype"].string_value = settings.dtype
            config.parameters["kernel_cache_dir"].string_value = str(settings.kernel_cache_dir())
            _compilation(config, settings)
        _weights(config, settings)
        config.parameters["stage_rates_file"].string_value = str(settings.stage_rates_file())
    if not processes:
        shutil.rmtree(dest / GENERATION_MODEL)
        return dest
    with _model_config(dest / GENERATION_MODEL) as config:
        _place(config.instance_group.add(count=1), settings, on_gpu)
        _weights(config, settings)
        config.parameters["dtype"].string_value = settings.resolved_dtype()
        config.parameters["kernel_cache_dir"].string_value = str(settings.kernel_cache_dir())
        _compilation(config, settings)
        config.parameters["gpu_memory_gib"].string_value = str(settings.gpu_memory_gib)
    return dest


def _compilation(config: model_config_pb2.ModelConfig, settings: TritonSettings) -> None:
    """Whether and when a GPU instance compiles its UNet (``""``: the pipeline config decides)."""
    config.parameters["compile_before_ready"].string_value = str(settings.compile_before_ready).lower()
    if settings.compile_unet is not None:
        config.parameters["compile_unet"].string_value = str(settings.compile_unet).lower()


@contextmanager
def _model_config(folder: Path) -> Iterator[model_config_pb2.ModelConfig]:
    """A model's ``config.pbtxt`` to edit, instance groups cleared; written back when the block ends."""
    path = folder / "config.pbtxt"
    config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    del config.instance_group[:]
    yield config
    path.write_text(text_format.MessageToString(config), encoding="utf-8")


def _place(group: model_config_pb2.ModelInstanceGroup, settings: TritonSettings, on_gpu: bool) -> None:
    """One instance per listed GPU (all visible ones when none are listed; the first with ``split_jobs``), or the CPU."""
    if not on_gpu:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        return
    group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
    if settings.split_jobs:
        group.gpus.append(settings.gpus[0] if settings.gpus else 0)
    else:
        group.gpus.extend(settings.gpus)


def _weights(config: model_config_pb2.ModelConfig, settings: TritonSettings) -> None:
    config.parameters["weights"].string_value = settings.weights
    config.parameters["checkpoints"].string_value = str(settings.checkpoints)
    config.parameters["stop_file"].string_value = str(settings.stop_file())


class TritonServer:
    """``tritonserver`` as a child process: :meth:`start`, :meth:`wait_ready`, :meth:`watch`, :meth:`stop` (SIGTERM)."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = settings.workdir / "triton.log"
        self.pid_file: PidFile | None = None
        self._stopping = False
        self._log_pump: LogPump | None = None
        self._regions: set[str] = set()
        """Shared-memory regions of this server's stubs (:mod:`gateway.launcher.shm`)."""

    def command(self, repository: Path, backends: Path) -> list[str]:
        s = self.settings
        dist = bundled_triton() / "pytriton" / "tritonserver"
        command = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={dist / 'caches'}",
            f"--http-address={s.address}",
            f"--http-port={s.http_port}",
            f"--grpc-address={s.address}",
            f"--grpc-port={s.grpc_port}",
            f"--metrics-address={s.address}",
            f"--metrics-port={s.metrics_port}",
            f"--exit-timeout-secs={s.exit_timeout_s}",
        ]
        if s.resolved_device() == "cpu":  # no CUDA: skip pinned/CUDA pools and the DCGM GPU metrics
            command += [
                "--allow-gpu-metrics=false",
                "--pinned-memory-pool-byte-size=0",
                "--cuda-memory-pool-byte-size=0:0",
            ]
        return command

    def environment(self) -> dict[str, str]:
        root = bundled_triton()
        libraries = [str(root / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
        env["PATH"] = os.pathsep.join([str(self.settings.python_env / "bin"), env.get("PATH", "")])
        return env

    def backend_directory(self) -> Path:
        """The Python backend beside the stub built for this interpreter's X.Y."""
        dist = bundled_triton() / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonError(f"the bundled Triton has no Python backend stub for Python {version}")
        backend = self.settings.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        files = {
            name: dist / "backends" / "python" / name
            for name in ("libtriton_python.so", "triton_python_backend_utils.py")
        }
        files["triton_python_backend_stub"] = stub
        for name, source in files.items():  # copy, then rename: a stub of an earlier server may still be running
            temp = backend / f".{name}.new"
            shutil.copy2(source, temp)
            os.replace(temp, backend / name)
        return backend.parent

    def start(self, other_listeners: Sequence[Listener] = ()) -> None:
        """Claim the work folder, stop a Triton left behind in it, check that Triton's ports and
        ``other_listeners`` (what the caller opens once Triton is ready) are free, keep the last log, start
        ``tritonserver`` in a session of its own and record it. Call from the thread that will stop it: the
        server gets SIGTERM when that thread ends (:func:`gateway.launcher.processes.die_with_parent`)."""
        self._stopping = False
        self.settings.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.pid_file = PidFile.claim(self.settings.workdir / PID_FILE)
        except WorkFolderInUse as exc:
            raise TritonError(str(exc)) from None
        try:
            self._stop_left_behind(self.pid_file.previous.get("triton"))
            busy = taken([*self.settings.listeners(), *other_listeners])
            if busy:
                raise TritonError("\n".join(busy) + "\nstop that process or choose other ports")
            rotate(self.log_path, self.settings.log_files_kept)
            self.settings.stop_file().unlink(missing_ok=True)
            self._regions = set()
            command = self.command(render_repository(self.settings), self.backend_directory())
            self.log_path.write_bytes(b"")
            self.process = subprocess.Popen(
                command,
                env=self.environment(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_server_preexec(),  # noqa: PLW1509 - signal settings only, before exec
            )
            noise = self.settings.cpu_log_noise if self.settings.resolved_device() == "cpu" else ()
            assert self.process.stdout is not None  # stdout=PIPE
            self._log_pump = LogPump(self.process.stdout, self.log_path, noise)
            self.pid_file.record(
                launcher=ProcessRecord.of(os.getpid()), triton=ProcessRecord.of(self.process.pid, tuple(command))
            )
        except BaseException:
            self.stop()
            raise

    def _stop_left_behind(self, triton: ProcessRecord | None) -> None:
        """SIGKILL what a killed launcher left running from this work folder: the ``tritonserver`` of the
        PID file if that process still runs (same PID, start time and command line) with its process group,
        and any backend stub of this folder; then remove the shared-memory regions that run recorded or its
        stubs name (a killed server cannot remove them itself)."""
        server = triton.process() if triton is not None else None
        stubs = self._stubs()
        regions = recorded_regions(self.settings.workdir / REGIONS_FILE) | stub_regions(stubs)
        if triton is not None and server is not None:
            log.warning(
                "stopping the Triton left behind in %s by an earlier run (%s)", self.settings.workdir, triton.describe()
            )
            if os.getpgid(server.pid) == server.pid:  # its own session: the group is its stubs and their workers
                os.killpg(server.pid, signal.SIGKILL)
        left = kill_and_wait([*([server] if server is not None else []), *stubs])
        if left:
            raise TritonError(
                f"could not stop the Triton processes left in {self.settings.workdir}: "
                + ", ".join(str(process.pid) for process in left)
            )
        removed = remove_regions(regions)
        if removed:
            log.warning("removed %d shared-memory region(s) an earlier run left in /dev/shm", len(removed))
        (self.settings.workdir / REGIONS_FILE).unlink(missing_ok=True)

    def ready(self) -> bool:
        """Our server answers ready (it listens on the HTTP port itself: not another server there)."""
        if self.process is None or not listens(self.process.pid, self.settings.http_port):
            return False
        try:
            return httpx2.get(f"{self.settings.http_url}/v2/health/ready", timeout=2).status_code == 200
        except httpx2.HTTPError:
            return False

    def wait_ready(self) -> None:
        """Block until ``/v2/health/ready`` answers 200; raise with the log's tail if the server dies or times out."""
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                raise TritonError(f"tritonserver exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TritonError(
                    f"tritonserver not ready after {self.settings.startup_timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.5)
        self._regions |= stub_regions(self._stubs())
        record_regions(self.settings.workdir / REGIONS_FILE, self._regions)

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call ``on_exit`` with :meth:`exit_reason`, from a thread, if the server exits without :meth:`stop`
        or :meth:`kill` asking it to."""
        process = self._started()

        def wait() -> None:
            process.wait()
            if not self._stopping:
                on_exit(self.exit_reason())

        threading.Thread(target=wait, name="triton-watch", daemon=True).start()

    def exit_reason(self) -> str:
        """How the server ended (status or signal) and the end of its log."""
        process = self._started()
        code = process.returncode
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        return f"tritonserver (pid {process.pid}) {how}; the end of {self.log_path}:\n{self.log_tail(15)}"

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self._started().wait()

    def _started(self) -> subprocess.Popen[bytes]:
        """The server process; only after :meth:`start`."""
        if self.process is None:
            raise TritonError("the server has not been started")
        return self.process

    def stop(self) -> int | None:
        """Cancel running jobs (the stop file), SIGTERM (Triton unloads the models within ``exit_timeout_s``),
        then SIGKILL if it has not exited 30 s after that; the exit code. Releases the work folder."""
        self._stopping = True
        if self.process is None:
            self._release()
            return None
        if self.process.poll() is None:
            self._regions |= stub_regions(self._stubs())
            self.settings.stop_file().touch()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.settings.exit_timeout_s + 30)
            except subprocess.TimeoutExpired:
                return self.kill()
        self._reap_stubs()
        self._release()
        return self.process.returncode

    def kill(self) -> int:
        """SIGKILL the server and its backend stubs (a crash, or a server that will not stop); releases the work folder."""
        self._stopping = True
        self._regions |= stub_regions(self._stubs())
        process = self._started()
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
        self._reap_stubs()
        self._release()
        return code

    def _release(self) -> None:
        """After the server and its stubs are gone: finish the log, remove shared memory they left, free the folder."""
        if self._log_pump is not None:
            self._log_pump.join()
            self._log_pump = None
        left = remove_regions(self._regions)
        if left:
            log.warning("removed %d shared-memory region(s) the server left in /dev/shm", len(left))
        self._regions = set()
        (self.settings.workdir / REGIONS_FILE).unlink(missing_ok=True)
        self.settings.stop_file().unlink(missing_ok=True)
        if self.pid_file is not None:
            self.pid_file.release()
            self.pid_file = None

    def _stubs(self) -> list[psutil.Process]:
        """Backend stubs started from this work folder: their command line names its backend folder."""
        backends = f"{self.settings.workdir / 'backends'}{os.sep}"
        return [
            process
            for process in psutil.process_iter(["cmdline"])
            if backends in " ".join(process.info["cmdline"] or ())
        ]

    def _reap_stubs(self) -> None:
        """Kill backend stubs of this server that outlived it (seen after SIGKILL and after some SIGTERM shutdowns)."""
        kill_and_wait(self._stubs())

    def log_tail(self, lines: int = 40) -> str:
        if self._log_pump is not None and self.process is not None and self.process.poll() is not None:
            self._log_pump.join(2)  # the server has exited: its last lines may still be in the pipe
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _server_preexec() -> Callable[[], None]:
    """The server gets SIGTERM when its launcher dies, and ignores SIGPIPE: its log pipe closes with the
    launcher, and a write to it must not kill the server before it has unloaded its models."""
    parent_death = die_with_parent(signal.SIGTERM)

    def preexec() -> None:
        parent_death()
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    return preexec


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
