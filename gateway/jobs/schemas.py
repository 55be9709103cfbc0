"""The job API's bodies: requests, validated strictly, and the answers (what ``/openapi.json`` describes).

Requests: a number must be sent as a JSON number of its type.

Pydantic would by default turn ``"2"``, ``2.0`` or ``true`` into the integer 2; here an integer field
takes only a JSON integer, a float field a JSON number (an integer is fine, a bool or a string is not),
a string field only a string, and unknown fields are refused. Multipart form fields, which are text by
nature, are parsed into these types by :mod:`gateway.jobs.forms` first.

The job options are the REST ones of :data:`lipsync.contract.OPTIONS`: names, types, ranges and
choices come from there, so the API accepts exactly what the model does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictStr,
    create_model,
    model_validator,
)
from typing_extensions import TypedDict  # pydantic needs this TypedDict before Python 3.12

from lipsync.contract import OPTIONS, Option, check_face_options
from lipsync.errors import BadInput


def _annotation(option: Option) -> Any:
    if option.choices is not None:
        return Literal[option.choices]
    return Annotated[option.type, Strict(), Field(ge=option.minimum, le=option.maximum, description=option.help)]


class _OptionRules(BaseModel):
    """The rules between options that no single field states (:func:`lipsync.contract.check_face_options`)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _face_rules(self) -> _OptionRules:
        try:
            check_face_options(getattr(self, "face", None), getattr(self, "face_box", None))
        except BadInput as exc:
            raise ValueError(str(exc)) from None
        return self


if TYPE_CHECKING:

    class SubmitOptions(_OptionRules):
        """:data:`SubmitOptions` as type checkers see it: the contract's REST options and ``webhook_url``."""

        webhook_url: AnyHttpUrl | None = None

        def __getattr__(self, name: str) -> Any: ...
else:
    SubmitOptions = create_model(
        "SubmitOptions",
        __base__=_OptionRules,
        __doc__="Options shared by the JSON and the multipart submit; ``None``: the served configuration decides.",
        **{option.name: (_annotation(option) | None, None) for option in OPTIONS if option.rest},
        webhook_url=(AnyHttpUrl | None, None),
    )


class SubmitRequest(SubmitOptions):
    video_source: StrictStr = Field(min_length=1)
    audio_source: StrictStr = Field(min_length=1)

    def options(self) -> SubmitOptions:
        return SubmitOptions.model_validate(
            self.model_dump(exclude={"video_source", "audio_source"}, exclude_unset=True)
        )


class JobRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr


MAX_LISTED_JOBS = 100
MAX_CURSOR = 200


class JobListQuery(BaseModel):
    """``GET /v1/jobs``'s query: unknown parameters are refused (422 naming them)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=MAX_LISTED_JOBS)
    cursor: str | None = Field(None, min_length=1, max_length=MAX_CURSOR)
    """The ``next_cursor`` of the page before; none for the first (newest) page."""


_DESCRIBED = ("type", "enum", "minimum", "maximum")


class OptionRule(TypedDict):
    """A job option's JSON type and allowed values: ``enum`` for choices, else ``minimum``/``maximum``."""

    type: str
    enum: NotRequired[list[str]]
    minimum: NotRequired[int | float]
    maximum: NotRequired[int | float]


def option_rules() -> dict[str, OptionRule]:
    """Each job option's JSON type and allowed values (``enum`` or ``minimum``/``maximum``), from :class:`SubmitOptions`.

    What the web page builds its form from, so the form offers exactly what a submit accepts. The
    webhook URL is left out: the page polls.
    """
    rules: dict[str, OptionRule] = {}
    for name, schema in SubmitOptions.model_json_schema()["properties"].items():
        if name == "webhook_url":
            continue
        value = next(option for option in schema["anyOf"] if option["type"] != "null")
        rules[name] = OptionRule(**{key: value[key] for key in _DESCRIBED if key in value})  # type: ignore[typeddict-item]
    return rules


# Answers. Field order is the order of the JSON a client receives.

JobState = Literal["InQueue", "InProgress", "Succeed", "Failed", "Cancelled"]


class Submitted(BaseModel):
    """The answer to a submit or upload: the job's id (for a replayed ``Idempotency-Key``, the first job's)."""

    request_id: str


class VideoUrl(BaseModel):
    url: str = Field(description="the result's download URL, with its token; starts with the configured public URL")


class Timings(BaseModel):
    inference: float = Field(description="seconds the job ran on Triton")


class FaceUsed(BaseModel):
    """Which face a job synced (``lipsync.faces.selection.FaceUsed``)."""

    choice: str = Field(description="the face option the job ran with")
    box: list[float] = Field(description="the chosen face's box [x0, y0, x1, y1] on its first frame, source pixels")
    confidence: float = Field(description="how sure the choice is, 0 to 1")


class JobResults(BaseModel):
    video: list[VideoUrl]
    timings: Timings
    face: FaceUsed | None = None


class JobStatus(BaseModel):
    """A job as ``/lipsync/status``, ``/lipsync/cancel``, ``/v1/jobs`` and its webhook show it."""

    request_id: str
    status: JobState
    reason: str | None = Field(description="why the job failed or was re-queued")
    queue_position: int = Field(description="1 = next to run; 0 once it runs")
    progress: float = Field(ge=0, le=1, description="fraction done; 1.0 only together with Succeed")
    stage: str | None = Field(description="audio, analyse, generate, encode, done, or waiting for Triton")
    eta_s: float | None = Field(description="while InProgress: seconds left, as Triton estimates them")
    weights: str | None = Field(description="the weight set that made the result, or that Triton serves")
    created_at: float = Field(description="Unix seconds of the submit")
    results: JobResults | None = Field(description="only for Succeed")


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    jobs: list[JobStatus]
    next_cursor: str | None = Field(description="the cursor of the next page; null on the last")


class BatchRequest(BaseModel):
    """``POST /v1/batches``: up to ``max_batch_items`` job requests, each a :class:`SubmitRequest`.

    Items are validated one by one (as :class:`SubmitRequest`, by the route), so that an invalid item is
    refused alone while the others are queued.
    """

    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(
        min_length=1,
        description="each item a /lipsync/submit body (video_source, audio_source, options)",
        json_schema_extra={"items": {"$ref": "#/components/schemas/SubmitRequest"}},
    )
    webhook_url: AnyHttpUrl | None = None
    """Called once, with the batch as ``GET /v1/batches/{id}`` shows it, when its last item ended."""


class BatchRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_id: StrictStr


class BatchItemAccepted(BaseModel):
    index: int
    request_id: str | None = Field(description="the item's job (status, cancel, result as any job); null if refused")
    error: str | None = Field(description="why the item was refused (nothing was created for it); null if queued")


class BatchAccepted(BaseModel):
    """The answer to a batch (202): its id and, per item in the order sent, its job or why it was refused."""

    batch_id: str
    items: list[BatchItemAccepted]


class BatchItemStatus(BatchItemAccepted):
    status: str | None = Field(description="the job's status (InQueue, InProgress, Succeed, Failed, Cancelled)")
    reason: str | None
    progress: float | None
    result_url: str | None = Field(description="the result video of a succeeded item (carries its download token)")


class BatchStatus(BaseModel):
    """A batch as ``GET /v1/batches/{id}``, its cancel and its webhook show it."""

    batch_id: str
    finished: bool = Field(description="true once no item is queued or running")
    counts: dict[str, int] = Field(description='items per job status, and refused items under "Refused"')
    created_at: float
    finished_at: float | None
    items: list[BatchItemStatus]


class EstimateRequest(SubmitOptions):
    """``POST /v1/estimate`` without the clip: its length and picture size, and the job options."""

    duration_s: float = Field(gt=0, strict=True, description="seconds of the output (the audio's length)")
    width: int = Field(ge=1, strict=True)
    height: int = Field(ge=1, strict=True)

    def options(self) -> SubmitOptions:
        return SubmitOptions.model_validate(
            self.model_dump(exclude={"duration_s", "width", "height"}, exclude_unset=True)
        )


class Estimate(BaseModel):
    """What a job would cost on this deployment, from the stage rates of its recent succeeded jobs."""

    frames: int = Field(description="output frames (25 per second of audio)")
    inference_steps: int | None = Field(
        description="the job's steps: the request's, else the served default; null before the served weights are known"
    )
    mode: str
    weights: str | None = Field(description="the weight set the estimate is for (the one served, or the version asked)")
    run_s: float | None = Field(
        description="expected seconds from the job's start to its result; null when basis is none"
    )
    gpu_s: float | None = Field(
        description="GPU-seconds the run holds (0 on a CPU deployment); null when basis is none"
    )
    start_in_s: float | None = Field(
        description="expected wait before it starts, from the queue now; null when not known"
    )
    queued_jobs: int
    running_jobs: int
    basis: Literal["same_options", "other_steps", "none"] = Field(
        description="same_options: recent jobs with these weights, mode and steps; other_steps: same weights and "
        "mode, other steps (generation scaled by steps); none: no such job ran yet, nothing to go by",
    )
    basis_jobs: int = Field(description="how many recent jobs the rates come from")
