"""The job contract (lipsync.contract): every place a job's options live is built from it or checked
against it, tensors survive encode → decode, and each error kind maps to one status, code and policy."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.backends.triton_client import JobRequest, TritonJobError
from gateway.core.errors import ApiError
from gateway.jobs.forms import OPTION_PARSERS
from gateway.jobs.schemas import SubmitOptions
from gateway.jobs.schemas import option_rules
from gateway.launcher.triton_server import MODEL_REPOSITORY
from lipsync import contract
from lipsync.config import CONFIG_DIR, ConfigError, read_yaml
from lipsync.errors import BadInput, ErrorKind, JobCancelled, LipSyncError
from lipsync.jobs import JobOptions
from lipsync.timeline import LoopMode


@pytest.mark.parametrize("model", ["lipsync", "lipsync_unary"])
def test_config_pbtxt_inputs_are_the_contracts(model: str) -> None:
    text = (MODEL_REPOSITORY / model / "config.pbtxt").read_text(encoding="utf-8")
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    declared = {
        tensor.name: (model_config_pb2.DataType.Name(tensor.data_type), list(tensor.dims), tensor.optional)
        for tensor in config.input
    }
    media_optional = model == "lipsync"  # without VIDEO and AUDIO the streaming model names its weights
    expected = {name: ("TYPE_STRING", [1], media_optional) for name in contract.MEDIA} | {
        option.tensor: (contract.DATATYPES[option.datatype][2], [1], True) for option in contract.OPTIONS
    }
    assert declared == expected


def test_every_surface_offers_exactly_the_contracts_options() -> None:
    names = [option.name for option in contract.OPTIONS]
    rest = [option.name for option in contract.OPTIONS if option.rest]
    assert [item.name for item in dataclasses.fields(JobOptions)] == names
    assert [item.name for item in dataclasses.fields(JobRequest)] == ["video", "audio", "job_id", *names]
    assert list(SubmitOptions.model_fields) == [*rest, "webhook_url"]
    assert list(OPTION_PARSERS) == [*rest, "webhook_url"]
    assert list(option_rules()) == rest


def test_choices_are_the_configs_data() -> None:
    assert contract.BY_NAME["mode"].choices == tuple(read_yaml(CONFIG_DIR / "sampling_modes.yaml", "modes"))
    assert contract.BY_NAME["loop_mode"].choices == ("pingpong", "loop", "cut")
    assert option_rules()["loop_mode"]["enum"] == [mode.value for mode in LoopMode]
    assert option_rules()["inference_steps"] == {"type": "integer", "minimum": 1, "maximum": 999}


def test_encode_then_decode_gives_the_options_back() -> None:
    values = {"inference_steps": 7, "guidance_scale": 2.5, "seed": -(2**63), "loop_mode": "cut", "mode": "fast", "version": "1.6",
              "devices": 2, "crf": 51, "face": "box", "face_box": "10.5,20,30,40"}
    arrays = contract.encode(values, b"video", b"audio")
    assert {name: array.dtype for name, array in arrays.items()} == {
        "VIDEO": np.object_, "AUDIO": np.object_, "STEPS": np.int32, "GUIDANCE": np.float32, "SEED": np.int64,
        "LOOP_MODE": np.object_, "MODE": np.object_, "VERSION": np.object_, "DEVICES": np.int32, "CRF": np.int32,
        "FACE": np.object_, "FACE_BOX": np.object_,
    }
    assert contract.decode(arrays.get) == values
    assert contract.decode({}.get) == contract.defaults()
    assert contract.decode({"DEVICES": np.array([0], np.int32)}.get)["devices"] is None


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"LOOP_MODE": np.array([b"sideways"], np.object_)}, "loop_mode must be one of"),
        ({"MODE": np.array([b"turbo"], np.object_)}, "mode must be one of"),
        ({"STEPS": np.array([0], np.int32)}, "inference_steps must be in 1..999"),
        ({"GUIDANCE": np.array([-2], np.float32)}, "guidance_scale must be in"),
        ({"GUIDANCE": np.array([np.nan], np.float32)}, "guidance_scale must be a finite number"),
        ({"GUIDANCE": np.array([np.inf], np.float32)}, "guidance_scale must be a finite number"),
        ({"GUIDANCE": np.array([-np.inf], np.float32)}, "guidance_scale must be a finite number"),
        ({"CRF": np.array([52], np.int32)}, "crf must be in 0..51"),
        ({"STEPS": np.array([1, 2], np.int32)}, "one value"),
        ({"MODE": np.array([b"\xff"], np.object_)}, "UTF-8"),
        ({"FACE": np.array([b"loudest"], np.object_)}, "face must be one of"),
        ({"FACE_BOX": np.array([b"10,20"], np.object_)}, "face_box is only taken with face=box"),
        ({"FACE": np.array([b"active_speaker"], np.object_), "FACE_BOX": np.array([b"10,20"], np.object_)},
         "face_box is only taken with face=box"),
        ({"FACE": np.array([b"box"], np.object_)}, "face=box needs face_box"),
        ({"FACE": np.array([b"box"], np.object_), "FACE_BOX": np.array([b"10,20,30"], np.object_)}, "'x,y' .* or 'x0,y0,x1,y1'"),
        ({"FACE": np.array([b"box"], np.object_), "FACE_BOX": np.array([b"30,20,10,40"], np.object_)}, "x0 < x1"),
        ({"FACE": np.array([b"box"], np.object_), "FACE_BOX": np.array([b"nan,2"], np.object_)}, "'x,y'"),
    ],
)
def test_decode_refuses_what_the_contract_does_not_allow(tensors: dict, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        contract.decode(tensors.get)


def test_job_options_and_requests_are_checked_against_the_contract() -> None:
    assert JobOptions(loop_mode=LoopMode.CUT).loop_mode is LoopMode.CUT
    with pytest.raises(BadInput, match="mode must be one of"):
        JobOptions(mode="turbo")
    with pytest.raises(BadInput, match="inference_steps"):
        JobRequest(b"v", b"a", inference_steps=1001).inputs()
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(BadInput, match="finite"):
            JobOptions(guidance_scale=value)
        with pytest.raises(BadInput, match="finite"):
            contract.check({"guidance_scale": value})
        with pytest.raises(BadInput, match="finite"):
            contract.encode({"guidance_scale": value})
    assert [tensor.name() for tensor in JobRequest(b"v", b"a", inference_steps=3, job_id="j").inputs()] == ["VIDEO", "AUDIO", "STEPS"]


def test_each_error_kind_maps_once() -> None:
    assert set(contract.FAILURES) == set(ErrorKind)
    assert [contract.FAILURES[kind].retry for kind in ErrorKind] == [False, False, False, True, False]
    for kind, failure in contract.FAILURES.items():
        assert contract.kind_for_code(failure.triton_code) is kind
        assert contract.kind_for_code(f"StatusCode.{failure.grpc_status}") is kind
        assert ApiError.of(LipSyncError("x", kind)).status_code == failure.http_status
        assert TritonJobError("x", kind).retry is failure.retry


def test_failures_travel_as_info_with_their_code() -> None:
    for error, code in [(BadInput("no face"), "INVALID_ARG"), (JobCancelled("stop"), "CANCELLED"),
                        (ConfigError("bad yaml"), "INTERNAL"), (RuntimeError("bug"), "INTERNAL")]:
        info = contract.failure_info(error)
        assert json.loads(info) == {"error": str(error), "code": code}
        assert contract.failure_from_info(info).kind is contract.kind_of(error)
    assert contract.failure_from_info('{"error": "?", "code": "SOMETHING_NEW"}').kind is ErrorKind.INTERNAL


def test_a_misconfiguration_is_not_the_callers_fault() -> None:
    assert contract.kind_of(ConfigError("configs/media.yaml is malformed")) is ErrorKind.INTERNAL
    assert not isinstance(ConfigError("x"), ValueError)


def test_importing_the_contract_does_not_import_torch() -> None:
    code = "import sys, lipsync.contract; print(sorted({'torch', 'av', 'diffusers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_the_served_configuration_alone_decides_the_defaults() -> None:
    """A submit's missing options stay unset up to the model; what it then gets (and ``/v1/info`` shows) is
    the served UNet config's ``run`` section, configs/media.yaml's crf and the contract's own defaults."""
    from gateway.backends.served import served_defaults
    from lipsync.config import load_config, run_defaults
    from lipsync.media import MediaSettings
    from lipsync.weights import load_weights_config

    tiny, media = load_weights_config().version("tiny"), MediaSettings.load()
    run = run_defaults(load_config(tiny.unet_config))
    contract = {"loop_mode": "pingpong", "mode": "exact", "face": "largest", "crf": media.crf}
    assert served_defaults(tiny.label, media) == run | contract
    assert served_defaults(None, media) == contract
    assert SubmitOptions().model_dump(exclude={"webhook_url"}) == dict.fromkeys(option_rules())
