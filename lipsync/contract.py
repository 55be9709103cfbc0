"""The job contract: what a lip-sync job takes, how it travels through Triton, and how it fails.

One table, :data:`OPTIONS`, names every job option with its type, range or choices, default, its
Triton input tensor and its command-line flag. An option has one name from the REST field to
``LipSyncPipeline.run``'s argument; only the Triton tensor (``STEPS``) and the flag (``--steps``) are
spelled their own way. The gateway's request model, the
Triton model's input parsing, :class:`lipsync.jobs.JobOptions` and ``lipsync run``'s flags are built
from it, and a test checks both ``config.pbtxt`` input lists against it. Choices that are data come
from ``configs/`` (sampling modes, weight versions). :func:`encode` turns options into the named
arrays a Triton client sends; :func:`decode` turns a request's tensors back into checked options.

A failed job ends with STAGE ``failed`` and INFO ``{"error", "code"}``; :data:`FAILURES` maps each
:class:`~lipsync.errors.ErrorKind` to that code (a Triton error code), an HTTP status and whether a
retry may help. Importing this module costs numpy and PyYAML, never torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from lipsync.config import CONFIG_DIR, read_yaml
from lipsync.errors import BadInput, ErrorKind, LipSyncError
from lipsync.timeline import LoopMode

_INT64 = 2**63

DATATYPES: dict[str, tuple[type, Any, str]] = {
    "BYTES": (str, np.object_, "TYPE_STRING"),
    "INT32": (int, np.int32, "TYPE_INT32"),
    "INT64": (int, np.int64, "TYPE_INT64"),
    "FP32": (float, np.float32, "TYPE_FP32"),
}
"""Triton datatype → (Python type of the option, numpy dtype of its tensor, ``config.pbtxt`` data type)."""


@dataclass(frozen=True)
class Option:
    """One job option. ``default`` ``None``: left to the served configuration (the served weights' UNet
    config's ``run`` section, ``configs/media.yaml``), which alone decides when a job sends none."""

    name: str
    """The REST field, :class:`lipsync.jobs.JobOptions` field and ``LipSyncPipeline.run`` argument."""
    tensor: str
    datatype: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None
    rest: bool = True
    """Offered by the gateway's REST API."""
    flag: str | None = None
    """``lipsync run``'s flag; ``None``: not on the command line."""

    @property
    def type(self) -> type:
        return DATATYPES[self.datatype][0]

    def check(self, value: Any) -> Any:
        """``value`` if it is of this option's type and within its range or choices, else :class:`BadInput`."""
        if value is None:
            return None
        kind: type[Any] = self.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadInput(f"{self.name} must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            # NaN compares false with both bounds, so the range check below would pass it.
            raise BadInput(f"{self.name} must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise BadInput(f"{self.name} must be one of {list(self.choices)}, got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise BadInput(f"{self.name} must be in {self.minimum:g}..{self.maximum:g}, got {value!r}")
        return value


class FaceChoice(str, Enum):
    """How a job picks the face it syncs in a clip with several people (:mod:`lipsync.faces.selection`)."""

    LARGEST = "largest"
    BOX = "box"
    ACTIVE_SPEAKER = "active_speaker"


FACE_BOX_RULE = "face_box is 'x,y' (a point) or 'x0,y0,x1,y1' (a box with x0 < x1, y0 < y1) in source pixels"


def parse_face_box(text: str) -> tuple[float, ...]:
    """The numbers of a ``face_box`` text; :class:`BadInput` naming the rule when it is not one."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"{FACE_BOX_RULE}, got {text[:60]!r}") from None
    if len(values) not in (2, 4) or not all(math.isfinite(value) for value in values):
        raise BadInput(f"{FACE_BOX_RULE}, got {text[:60]!r}")
    if len(values) == 4 and not (values[0] < values[2] and values[1] < values[3]):
        raise BadInput(f"{FACE_BOX_RULE}, got {text[:60]!r}")
    return values


def check_face_options(face: str | None, face_box: str | None) -> None:
    """The rules between the two options: ``face_box`` exactly when ``face`` is ``box``."""
    if face_box is not None and face != FaceChoice.BOX.value:
        raise BadInput("face_box is only taken with face=box")
    if face == FaceChoice.BOX.value and face_box is None:
        raise BadInput("face=box needs face_box (a point 'x,y' or a box 'x0,y0,x1,y1' on the first frame with a face)")
    if face_box is not None:
        parse_face_box(face_box)


def check_against_video(face: str | None, face_box: str | None, width: int, height: int, has_audio: bool) -> None:
    """What the video must offer the choice: ``face_box`` inside the frame, an audio track for ``active_speaker``."""
    if face == FaceChoice.ACTIVE_SPEAKER.value and not has_audio:
        raise BadInput("face=active_speaker needs the video's own audio track, and this video has none")
    if face_box is None:
        return
    values = parse_face_box(face_box)
    xs, ys = values[0::2], values[1::2]
    if min(xs) < 0 or min(ys) < 0 or max(xs) > width or max(ys) > height:
        raise BadInput(f"face_box {face_box[:60]} lies outside the {width}×{height} frame")


def _sampling_modes() -> tuple[str, ...]:
    return tuple(read_yaml(CONFIG_DIR / "sampling_modes.yaml", "sampling modes"))


def _weight_versions() -> tuple[str, ...]:
    return tuple(read_yaml(CONFIG_DIR / "weights.yaml", "weights config")["versions"])


OPTIONS: tuple[Option, ...] = (
    # At most 999: the scheduler offsets its timesteps by one (steps_offset), so 1000 steps over 1000
    # training timesteps would ask for timestep 1000, one past the last.
    Option(
        "inference_steps", "STEPS", "INT32", "DDIM steps (default: the served UNet config's)", 1, 999, flag="--steps"
    ),
    Option(
        "guidance_scale",
        "GUIDANCE",
        "FP32",
        "classifier-free guidance scale; 1 or less skips guidance (default: the served UNet config's)",
        0,
        20,
        flag="--guidance",
    ),
    Option(
        "seed",
        "SEED",
        "INT64",
        "seed of the starting noise (default: the served UNet config's)",
        -_INT64,
        _INT64 - 1,
        flag="--seed",
    ),
    Option(
        "loop_mode",
        "LOOP_MODE",
        "BYTES",
        "when the audio is longer than the video: pingpong (official) "
        "plays it forward and backward, loop restarts it, cut ends the output with the video and cuts the audio",
        choices=tuple(mode.value for mode in LoopMode),
        default=LoopMode.PINGPONG.value,
        flag="--loop-mode",
    ),
    Option(
        "mode",
        "MODE",
        "BYTES",
        "sampling mode of configs/sampling_modes.yaml: exact (official) runs the whole "
        "UNet every step; fast caches features, faster and slightly different (docs/benchmarks.md)",
        choices=_sampling_modes(),
        default="exact",
        flag="--mode",
    ),
    Option(
        "version",
        "VERSION",
        "BYTES",
        "the LatentSync version the job expects the server to serve (refused when it serves another)",
        choices=_weight_versions(),
    ),
    Option(
        "devices",
        "DEVICES",
        "INT32",
        "devices of a multi-GPU instance the job's windows are spread over, "
        "at most all (0 or absent: by the clip's length, split_min_seconds)",
        0,
        1024,
        rest=False,
    ),
    Option(
        "crf",
        "CRF",
        "INT32",
        "H.264 quality of the result, 0 (lossless) to 51 (worst); lower is larger (default: configs/media.yaml's crf)",
        0,
        51,
        flag="--crf",
    ),
    Option(
        "face",
        "FACE",
        "BYTES",
        "which face to sync when several show: largest (official) per frame; box, the "
        "face under face_box on the first frame with a face, followed through the clip; active_speaker, per shot "
        "the face whose mouth moves with the video's own audio track",
        choices=tuple(choice.value for choice in FaceChoice),
        default=FaceChoice.LARGEST.value,
        flag="--face",
    ),
    Option(
        "face_box",
        "FACE_BOX",
        "BYTES",
        "with face=box: 'x,y' (a point) or 'x0,y0,x1,y1' (a box) in source "
        "pixels on the first frame where a face appears",
        flag="--face-box",
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}

MEDIA = ("VIDEO", "AUDIO")
"""The job's files, as BYTES tensors: required by ``lipsync_unary``; ``lipsync`` without both describes itself."""


def defaults() -> dict[str, Any]:
    return {option.name: option.default for option in OPTIONS}


def check(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (option name → value) checked, unknown names refused, absent ones at their defaults."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise BadInput(f"unknown option(s): {', '.join(unknown)}")
    checked = defaults()
    for name, given in values.items():
        value = _plain(given)
        checked[name] = BY_NAME[name].default if value is None else BY_NAME[name].check(value)
    check_face_options(checked["face"], checked["face_box"])
    return checked


def _plain(value: Any) -> Any:
    """An enum member (:class:`LoopMode`, :class:`FaceChoice`) as its value; any other value as it is."""
    return value.value if isinstance(value, Enum) else value


def datatype(tensor: str) -> str:
    """The Triton datatype of input ``tensor``."""
    return "BYTES" if tensor in MEDIA else next(option.datatype for option in OPTIONS if option.tensor == tensor)


def encode(values: Mapping[str, Any], video: bytes | None = None, audio: bytes | None = None) -> dict[str, np.ndarray]:
    """Triton input name → ``[1]`` array for every given option and file; ``None`` leaves an input out."""
    arrays = {
        name: np.array([data], dtype=np.object_)
        for name, data in zip(MEDIA, (video, audio), strict=True)
        if data is not None
    }
    for name, given in values.items():
        option = BY_NAME[name]
        value = option.check(_plain(given))
        if value is not None:
            encoded = value.encode() if isinstance(value, str) else value
            arrays[option.tensor] = np.array([encoded], dtype=DATATYPES[option.datatype][1])
    return arrays


def decode(read: Callable[[str], np.ndarray | None]) -> dict[str, Any]:
    """Options from a request's tensors (``read(name)``: the input's array or ``None``), checked; a
    ``DEVICES`` of 0 counts as absent. Raises :class:`BadInput`."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        array = read(option.tensor)
        if array is None:
            continue
        raw = np.asarray(array).reshape(-1)
        if raw.size != 1:
            raise BadInput(f"input {option.tensor} must hold one value, got {raw.size}")
        value = raw[0]
        if option.type is str:
            try:
                value = bytes(value).decode() if isinstance(value, (bytes, np.bytes_)) else str(value)
            except UnicodeDecodeError:
                raise BadInput(f"input {option.tensor} is not UTF-8 text") from None
            value = value or None
        else:
            value = option.type(value.item())
        if option.name == "devices" and value == 0:
            value = None
        values[option.name] = value
    return check(values)


@dataclass(frozen=True)
class Failure:
    """What an :class:`ErrorKind` becomes on each side of the service."""

    http_status: int
    triton_code: str
    """The ``pb_utils.TritonError`` code name, sent as INFO's ``code``."""
    grpc_status: str
    """The gRPC status Triton answers a stream or ``infer`` call with for that code."""
    retry: bool
    """Whether the same request may succeed later (the gateway re-queues such a job)."""


FAILURES: dict[ErrorKind, Failure] = {
    ErrorKind.BAD_INPUT: Failure(422, "INVALID_ARG", "INVALID_ARGUMENT", retry=False),
    ErrorKind.NOT_FOUND: Failure(404, "NOT_FOUND", "NOT_FOUND", retry=False),
    ErrorKind.CANCELLED: Failure(409, "CANCELLED", "CANCELLED", retry=False),
    ErrorKind.UNAVAILABLE: Failure(503, "UNAVAILABLE", "UNAVAILABLE", retry=True),
    ErrorKind.INTERNAL: Failure(500, "INTERNAL", "INTERNAL", retry=False),
}

FAILED_STAGE = "failed"
"""STAGE of a failed job's last response, whose INFO is :func:`failure_info`."""

NO_ERROR_RESPONSE = "no_error_response"
"""Request parameter (bool) a BLS caller sets: its failed job ends with the STAGE "failed" response
alone, without the Triton error response that stream clients get next. Triton 2.51 never delivers a
decoupled model's error response to a BLS caller, and the undelivered response keeps the caller's
model from unloading (a stop then waits out the exit timeout)."""


def kind_of(error: BaseException) -> ErrorKind:
    return error.kind if isinstance(error, LipSyncError) else ErrorKind.INTERNAL


def failure_info(error: BaseException, message: str | None = None) -> str:
    """A failed job's INFO: ``{"error": message, "code": Triton code}`` as JSON."""
    return json.dumps({"error": message or str(error), "code": FAILURES[kind_of(error)].triton_code})


def failure_from_info(info: str | bytes) -> LipSyncError:
    """The error a failed job's INFO describes; an unknown code is ``internal``."""
    failure = json.loads(info)
    return LipSyncError(failure["error"], kind_for_code(failure.get("code", "")))


def kind_for_code(code: str) -> ErrorKind:
    """The kind of a Triton error code (``INVALID_ARG``) or gRPC status (``StatusCode.INVALID_ARGUMENT``)."""
    name = code.rsplit(".", 1)[-1]
    return next(
        (kind for kind, failure in FAILURES.items() if name in (failure.triton_code, failure.grpc_status)),
        ErrorKind.INTERNAL,
    )
