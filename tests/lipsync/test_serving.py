"""The Triton models' parts that need no Triton (:mod:`lipsync.serving`): their typed ``config.pbtxt``
parameters, their metrics (one lock around every update) and the jobs' cancel checks (closed before the
last response), with stand-ins for the Python backend's objects. The models themselves run in a real
Triton in tests/e2e/test_triton.py and test_triton_split.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from gateway.launcher.triton_server import TritonSettings, render_repository
from lipsync.config import ConfigError
from lipsync.serving import (
    GenerateParameters,
    InstanceMetrics,
    InstanceStopping,
    JobMetrics,
    LipSyncParameters,
    RequestCancelCheck,
    StreamReleases,
    text_tensor,
)

REPO = Path(__file__).resolve().parents[2]
REPOSITORY = REPO / "model_repository"
MODEL_CONFIG = REPOSITORY / "lipsync" / "config.pbtxt"


def model_config(path: Path) -> dict[str, Any]:
    """``config.pbtxt`` as the JSON Triton hands to ``initialize`` (``args["model_config"]``)."""
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True, including_default_value_fields=True)


def test_the_shipped_and_the_rendered_parameters_parse_to_their_types(tmp_path) -> None:
    shipped = LipSyncParameters.from_model_config(model_config(MODEL_CONFIG))
    assert shipped.max_concurrent_jobs == 8 and shipped.max_batch_delay_ms == 10.0
    assert shipped.compile_unet is None and shipped.compile_before_ready is False and shipped.devices == ""
    assert shipped.stage_rates_file is None  # learned in memory only
    generate = GenerateParameters.from_model_config(model_config(REPOSITORY / "lipsync_generate" / "config.pbtxt"))
    assert generate.vae_slots == 2 and generate.gpu_memory_gib == 0.0 and generate.compile_unet is None
    rendered = render_repository(TritonSettings.load(workdir=tmp_path, device="cpu", weights="tiny", job_processes=2))
    params = LipSyncParameters.from_model_config(model_config(rendered / "lipsync" / "config.pbtxt"))
    assert params.weights == "tiny" and params.stop_file == str(tmp_path / "stopping")
    assert params.generator == "lipsync_generate"
    assert params.stage_rates_file == tmp_path.resolve() / "stage-rates-tiny-cpu.json"
    generate = GenerateParameters.from_model_config(model_config(rendered / "lipsync_generate" / "config.pbtxt"))
    assert generate.weights == "tiny" and generate.stop_file == params.stop_file


def test_a_parameter_of_the_other_model_fails_the_load() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_jobs"):
        GenerateParameters.from_model_config(model_config(MODEL_CONFIG))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("max_concurrent_jobs", "0", "max_concurrent_jobs"),
        ("max_batch_delay_ms", "soon", "max_batch_delay_ms"),
        ("compile_unet", "yes", "compile_unet"),
        ("dtype", "fp64", "dtype"),
        ("max_batch_window", "8", "max_batch_window"),
        ("stage_rates_file", "rates.json", "stage_rates_file"),
    ],
)
def test_a_bad_or_unknown_parameter_fails_the_load_naming_it(key, value, named) -> None:
    config = model_config(MODEL_CONFIG)
    config["parameters"][key] = {"string_value": value}
    with pytest.raises(ConfigError, match=named):
        LipSyncParameters.from_model_config(config)


def test_a_missing_parameter_fails_the_load_naming_it() -> None:
    config = model_config(MODEL_CONFIG)
    del config["parameters"]["stop_file"]
    with pytest.raises(ConfigError, match="stop_file"):
        LipSyncParameters.from_model_config(config)


@dataclass
class StandInMetric:
    """A ``pb_utils.Metric``: records its updates and whether the instance's lock was free while it ran."""

    labels: dict[str, str]
    lock_free_during_update: list[bool]
    buckets: list[float] | None = None
    updates: list[tuple[str, float]] = field(default_factory=list)
    lock: Any = None
    """Returns the instance's metric lock (the instance exists by the time a metric updates)."""

    def _update(self, kind: str, value: float) -> None:
        probe: list[bool] = []
        other = threading.Thread(target=lambda: probe.append(self._try(self.lock())))
        other.start()
        other.join()
        self.lock_free_during_update.extend(probe)
        self.updates.append((kind, value))

    @staticmethod
    def _try(lock: Any) -> bool:
        if lock.acquire(blocking=False):
            lock.release()
            return True
        return False

    def increment(self, value: float) -> None:
        self._update("increment", value)

    def set(self, value: float) -> None:
        self._update("set", value)

    def observe(self, value: float) -> None:
        self._update("observe", value)


class StandInPbUtils:
    """The part of ``triton_python_backend_utils`` the metrics use."""

    def __init__(self) -> None:
        self.metrics: list[StandInMetric] = []
        self.instance: InstanceMetrics | None = None
        self.lock_free_during_update: list[bool] = []
        api = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name: str, description: str, kind: str) -> None:
                self.name, self.kind = name, kind

            def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> StandInMetric:  # noqa: N802 - pb_utils' name
                metric = StandInMetric(
                    labels | {"family": self.name}, api.lock_free_during_update, buckets, lock=api.lock
                )
                api.metrics.append(metric)
                return metric

        self.MetricFamily = MetricFamily

    def lock(self) -> Any:
        assert self.instance is not None
        return self.instance._lock

    def named(self, family: str, **labels: str) -> StandInMetric:
        return next(metric for metric in self.metrics if metric.labels.items() >= ({"family": family} | labels).items())


@dataclass
class Result:
    frames: int
    seconds: dict[str, float]


def test_every_metric_update_holds_the_instances_one_lock() -> None:
    api = StandInPbUtils()
    metrics = api.instance = JobMetrics(api, {"model": "lipsync", "instance": "lipsync_0"})
    gauge = metrics.gpu_gauge("lipsync_gpu_utilization_ratio", "0")
    threads = [
        threading.Thread(target=work)
        for work in (
            lambda: metrics.active.increment(1),
            lambda: metrics.observe_batch(4, 2),
            lambda: gauge.set(0.5),
        )
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert api.lock_free_during_update and not any(api.lock_free_during_update)
    assert api.named("lipsync_unet_batch_windows").updates == [("observe", 4)]
    assert api.named("lipsync_gpu_utilization_ratio", gpu="0").updates == [("set", 0.5)]


def test_the_generation_models_metrics_are_the_batch_sizes_and_gpu_gauges_under_one_lock() -> None:
    api = StandInPbUtils()
    metrics = api.instance = InstanceMetrics(api, {"model": "lipsync_generate", "instance": "lipsync_generate_0"})
    metrics.gpu_gauge("lipsync_gpu_memory_used_bytes", "1").set(2.0)
    metrics.observe_batch(8, 3)
    assert not any(api.lock_free_during_update)
    assert {metric.labels["family"] for metric in api.metrics} == {
        "lipsync_unet_batch_windows",
        "lipsync_unet_batch_jobs",
        "lipsync_gpu_memory_used_bytes",
    }
    assert api.named("lipsync_unet_batch_jobs", model="lipsync_generate").updates == [("observe", 3)]
    assert api.named("lipsync_gpu_memory_used_bytes", gpu="1", instance="lipsync_generate_0").updates == [("set", 2.0)]


def test_finished_jobs_count_by_outcome_with_one_metric_per_label_set() -> None:
    api = StandInPbUtils()
    metrics = api.instance = JobMetrics(api, {"model": "lipsync", "instance": "lipsync_0"})
    metrics.finished("succeeded", Result(frames=50, seconds={"generate": 1.5, "encode": 0.2}))
    metrics.finished("succeeded", Result(frames=25, seconds={"generate": 1.0}))
    metrics.finished("rejected")
    jobs = [metric for metric in api.metrics if metric.labels["family"] == "lipsync_jobs_total"]
    assert sorted(metric.labels["outcome"] for metric in jobs) == ["rejected", "succeeded"]
    assert api.named("lipsync_jobs_total", outcome="succeeded").updates == [("increment", 1), ("increment", 1)]
    assert api.named("lipsync_frames_generated_total").updates == [("increment", 50), ("increment", 25)]
    assert api.named("lipsync_stage_seconds", stage="generate").updates == [("observe", 1.5), ("observe", 1.0)]
    assert all(metric.labels["instance"] == "lipsync_0" for metric in api.metrics)


def test_closed_metrics_let_go_of_the_backends_metrics_and_families() -> None:
    """``finalize`` closes them: freed at the interpreter's exit instead, they crash the stub as it ends."""
    api = StandInPbUtils()
    metrics = api.instance = JobMetrics(api, {"model": "lipsync", "instance": "lipsync_0"})
    metrics.finished("succeeded", Result(frames=50, seconds={"generate": 1.5}))
    gauge = metrics.gpu_gauge("lipsync_gpu_memory_used_bytes", "0")
    backend = [weakref.ref(metric) for metric in api.metrics] + [weakref.ref(f) for f in metrics.families.values()]
    api.metrics.clear()
    metrics.close()
    assert all(ref() is None for ref in backend)
    gauge.set(1.0)  # an update after close does nothing


class StandInRequest:
    """A decoupled request: asking it after its last response is what crashed the server."""

    def __init__(self) -> None:
        self.cancelled = False
        self.finished = False
        self.asked = 0

    def is_cancelled(self) -> bool:
        assert not self.finished, "is_cancelled() after the final response"
        self.asked += 1
        return self.cancelled


class StandInStream:
    """A finished BLS stream that notes when its last reference goes."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name, self.events = name, events

    def __del__(self) -> None:
        self.events.append(f"{self.name} released")


def test_a_cancel_check_asks_the_request_and_the_instance_until_it_is_closed(tmp_path) -> None:
    request, stopping = StandInRequest(), InstanceStopping(str(tmp_path / "stopping"))
    check = RequestCancelCheck(request, stopping, StreamReleases())
    assert not check()
    request.cancelled = True
    assert check()
    request.cancelled = False
    (tmp_path / "stopping").touch()
    assert check()
    check.close()
    request.finished = True
    assert not check()


def test_a_stream_is_let_go_of_after_the_next_answer_to_a_question_asked_after_it_was_kept() -> None:
    releases, events = StreamReleases(), []
    releases.keep(StandInStream("first", events))

    def question() -> bool:
        events.append("asked")
        releases.keep(StandInStream("second", events))  # kept by another thread while the question is out
        events.append("answered")
        return False

    assert releases.ask(question) is False
    assert events == ["asked", "answered", "first released"]
    assert len(releases) == 1
    releases.ask(lambda: True)
    assert events[-1] == "second released"
    assert len(releases) == 0


def test_a_cancel_check_lets_go_of_the_streams_kept_before_each_question_and_asks_once_more_when_closed() -> None:
    request, releases, events = StandInRequest(), StreamReleases(), []
    check = RequestCancelCheck(request, lambda: False, releases)
    releases.keep(StandInStream("group 1", events))
    assert not check()
    assert events == ["group 1 released"]
    releases.keep(StandInStream("group 2", events))
    check.close()  # before the job's last response: its last group's stream goes too
    assert (request.asked, events[-1], len(releases)) == (2, "group 2 released", 0)
    request.finished = True
    assert not check()


def test_a_cancelled_requests_streams_wait_for_another_jobs_question() -> None:
    """The stub answers a cancelled request from its cache, without a round trip: no proof for a stream."""
    releases, events = StreamReleases(), []
    cancelled_request, other_request = StandInRequest(), StandInRequest()
    cancelled_request.cancelled = True
    check = RequestCancelCheck(cancelled_request, lambda: False, releases)
    assert check()
    releases.keep(StandInStream("cancelled job's group", events))
    assert check()
    check.close()
    assert cancelled_request.asked == 1 and events == [] and len(releases) == 1
    assert not RequestCancelCheck(other_request, lambda: False, releases)()
    assert events == ["cancelled job's group released"]


def test_the_instance_stops_when_it_unloads_or_its_stop_file_appears(tmp_path) -> None:
    unloading, no_file = InstanceStopping(str(tmp_path / "stopping")), InstanceStopping("")
    assert not unloading() and not no_file()
    no_file.set()
    assert no_file()
    (tmp_path / "stopping").touch()
    assert unloading()


def test_a_text_output_is_one_utf8_element() -> None:
    class StandInTensors:
        @staticmethod
        def Tensor(name: str, array: Any) -> tuple[str, Any]:  # noqa: N802 - pb_utils' name
            return name, array

    for value in ("stage é", "stage é".encode()):
        name, array = text_tensor(StandInTensors, "STAGE", value)
        assert name == "STAGE" and array.dtype == object and list(array) == ["stage é".encode()]


def test_a_process_kept_off_the_gpus_sees_no_cuda_device_and_still_finds_faces() -> None:
    """The job processes' frame work runs as on a host without a GPU (MediaPipe without an EGL driver)."""
    script = (
        "import av, torch\n"
        "from lipsync.serving import GPU_HIDING_ENVIRONMENT, keep_off_gpus\n"
        "keep_off_gpus()\n"
        "import os\n"
        "assert all(os.environ[name] == value for name, value in GPU_HIDING_ENVIRONMENT.items())\n"
        "from lipsync.faces import MediaPipeFaceDetector\n"
        "with av.open('tests/fixtures/demo1_video.mp4') as clip:\n"
        "    frame = next(clip.decode(video=0)).to_ndarray(format='rgb24')\n"
        "print(torch.cuda.device_count(), MediaPipeFaceDetector().detect(frame) is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "True"]


def test_the_serving_helpers_import_no_torch() -> None:
    """``lipsync_unary``'s processes import only these and the job contract: each such stub starts about a second
    sooner without torch (a CPU Triton starts two)."""
    code = "import sys, lipsync.contract, lipsync.serving; print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "False"
