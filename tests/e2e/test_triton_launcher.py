"""``lipsync-serve triton``: the rendered model repository, readiness and a clean SIGTERM shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway import cli
from gateway.launcher.ports import free_port
from gateway.launcher.triton_log import LogPump
from gateway.launcher.triton_server import (
    TritonError,
    TritonServer,
    TritonSettings,
    render_repository,
)
from lipsync.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _rendered_repository(tmp_path: Path, **overrides) -> Path:
    return render_repository(TritonSettings.load(workdir=tmp_path, **overrides))


def _rendered(tmp_path: Path, **overrides) -> model_config_pb2.ModelConfig:
    return _config(_rendered_repository(tmp_path, **overrides))


def _config(repository: Path, model: str = "lipsync") -> model_config_pb2.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_cpu_rendering_places_one_cpu_instance_with_the_chosen_weights(tmp_path: Path) -> None:
    config = _rendered(tmp_path, device="cpu", weights="tiny", checkpoints="/data/ckpt", dtype="fp32")
    assert [(group.kind, group.count) for group in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert config.parameters["weights"].string_value == "tiny"
    assert config.parameters["checkpoints"].string_value == "/data/ckpt"
    assert config.parameters["dtype"].string_value == "fp32"
    assert config.model_transaction_policy.decoupled
    assert (tmp_path / "model_repository" / "lipsync_unary" / "config.pbtxt").is_file()


def test_gpu_rendering_lists_the_configured_gpus(tmp_path: Path) -> None:
    config = _rendered(tmp_path, device="gpu", gpus=(0, 1), job_processes=0)
    [group] = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 1]
    assert not (tmp_path / "model_repository" / "lipsync_generate").exists()  # not loaded in this layout
    every_gpu = _rendered(tmp_path, device="gpu", job_processes=0)
    assert list(every_gpu.instance_group[0].gpus) == []  # Triton then places one instance per visible GPU
    assert every_gpu.parameters["devices"].string_value == ""  # each instance uses its own GPU


def test_up_with_gpus_renders_one_instance_per_listed_gpu(tmp_path: Path) -> None:
    args = cli._parser().parse_args(["up", "--device", "gpu", "--gpus", "0,1", "--job-processes", "0", "--workdir", str(tmp_path)])
    config = _config(render_repository(cli._triton_settings(args)))
    assert [(group.kind, group.count, list(group.gpus)) for group in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1, [0, 1])
    ]


def test_a_gpu_server_splits_jobs_into_cpu_processes_and_one_generation_model_per_gpu(tmp_path: Path) -> None:
    args = cli._parser().parse_args(["up", "--device", "gpu", "--gpus", "0,1", "--workdir", str(tmp_path)])
    repository = render_repository(cli._triton_settings(args))
    jobs, generation = _config(repository), _config(repository, "lipsync_generate")
    assert [(group.kind, group.count) for group in jobs.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 4)]
    assert jobs.parameters["generator"].string_value == "lipsync_generate"
    assert jobs.parameters["dtype"].string_value == "fp16"  # the generating VAE's, for the sampling noise
    assert [(group.kind, list(group.gpus)) for group in generation.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0, 1])
    ]
    assert generation.parameters["gpu_memory_gib"].string_value == "20.0"
    assert generation.parameters["compile_unet"].string_value == ""  # configs/pipeline.yaml's (auto: compiled)
    asked = _config(_rendered_repository(tmp_path, device="gpu", compile_unet=False), "lipsync_generate")
    assert asked.parameters["compile_unet"].string_value == "false"
    with pytest.raises(ConfigError, match="job_processes"):
        _rendered(tmp_path, device="gpu", split_jobs=True, job_processes=2)


def test_split_jobs_renders_one_instance_holding_every_listed_gpu(tmp_path: Path) -> None:
    args = cli._parser().parse_args(["up", "--device", "gpu", "--gpus", "2,3", "--split-jobs", "--workdir", str(tmp_path)])
    config = _config(render_repository(cli._triton_settings(args)))
    [group] = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1, [2])
    assert config.parameters["devices"].string_value == "2,3"
    every_gpu = _rendered(tmp_path, device="gpu", split_jobs=True)  # auto: no job processes with split_jobs
    assert list(every_gpu.instance_group[0].gpus) == [0] and every_gpu.parameters["devices"].string_value == "all"


def test_compose_reserves_the_gpus_named_in_lipsync_gpus() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    [devices] = compose["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices["device_ids"] == ["${LIPSYNC_GPUS:-all}"] and "count" not in devices


def test_compiled_kernels_are_cached_in_the_work_folder(tmp_path: Path) -> None:
    """The folder travels as a model parameter (absolute): backend stubs do not see the server's environment."""
    config = _rendered(tmp_path, device="cpu")
    assert config.parameters["kernel_cache_dir"].string_value == str((tmp_path / "inductor-cache").resolve())


def test_instances_compile_in_the_background_unless_told_to_compile_before_ready(tmp_path: Path) -> None:
    assert _rendered(tmp_path, device="gpu", job_processes=0).parameters["compile_before_ready"].string_value == "false"
    args = cli._parser().parse_args(["up", "--device", "gpu", "--job-processes", "0", "--compile-before-ready", "--workdir", str(tmp_path)])
    config = _config(render_repository(cli._triton_settings(args)))
    assert config.parameters["compile_before_ready"].string_value == "true"


def test_learned_stage_rates_are_kept_in_the_work_folder_per_weight_set_and_device_kind(tmp_path: Path) -> None:
    """Every job process of the server shares the file (absolute: the stubs run elsewhere); the speeds of one
    weight set or device kind say nothing about another's."""
    cpu = _rendered(tmp_path, device="cpu", weights="tiny").parameters["stage_rates_file"].string_value
    assert cpu == str((tmp_path / "stage-rates-tiny-cpu.json").resolve())
    gpu = _rendered(tmp_path, device="gpu", weights="1.6").parameters["stage_rates_file"].string_value
    assert gpu == str((tmp_path / "stage-rates-1.6-gpu.json").resolve())
    # auto: named after the weight set the model will load (no real checkpoints below this root: tiny)
    auto = _rendered(tmp_path, device="gpu", weights="auto", checkpoints=str(tmp_path / "none"))
    assert auto.parameters["stage_rates_file"].string_value == str((tmp_path / "stage-rates-tiny-gpu.json").resolve())


def test_the_stop_file_is_in_the_work_folder(tmp_path: Path) -> None:
    """The model cancels its jobs once the file exists; the launcher creates it when it stops the server."""
    config = _rendered(tmp_path, device="cpu")
    assert config.parameters["stop_file"].string_value == str((tmp_path / "stopping").resolve())


def test_the_log_leaves_out_only_the_configured_noise(tmp_path: Path) -> None:
    read, write = os.pipe()
    with os.fdopen(write, "wb") as server:
        pump = LogPump(os.fdopen(read, "rb"), tmp_path / "triton.log", drop=["CudaDriverHelper has not been initialized."])
        server.write(b'I1 server.cc] "starting"\nE1 server.cc:241] "CudaDriverHelper has not been initialized."\nE2 other error\n')
    pump.join()
    assert (tmp_path / "triton.log").read_text() == 'I1 server.cc] "starting"\nE2 other error\n'


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="device"):
        TritonSettings.load(device="tpu")


def test_a_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    port = free_port()
    settings = TritonSettings.load(device="cpu", weights="tiny", workdir=tmp_path, http_port=port, grpc_port=port, metrics_port=free_port())
    with pytest.raises(TritonError, match="exited while starting"):
        with TritonServer(settings):
            pass


@pytest.mark.slow
def test_cli_serves_until_sigterm_then_exits_cleanly(tmp_path: Path) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "triton", "--device", "cpu", "--weights", "tiny",
         "--checkpoints", str(tmp_path / "ckpt"), "--workdir", str(tmp_path / "serve"),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not _ready(http):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server not ready in 300 s"
            time.sleep(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not _ready(http)
    assert "successfully unloaded 'lipsync'" in (tmp_path / "serve" / "triton.log").read_text()


def _ready(port: int) -> bool:
    try:
        return httpx2.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False
