"""Request bodies, validated strictly: a number must be sent as a JSON number of its type.

Pydantic would by default turn ``"2"``, ``2.0`` or ``true`` into the integer 2; here an integer field
takes only a JSON integer, a float field a JSON number (an integer is fine, a bool or a string is not),
a string field only a string, and unknown fields are refused. Multipart form fields, which are text by
nature, are parsed into these types by :mod:`gateway.jobs.forms` first.

The job options are the REST ones of :data:`lipsync.contract.OPTIONS`: names, types, ranges and
choices come from there, so the API accepts exactly what the model does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


JobOptions = create_model(
    "JobOptions",
    __base__=_OptionRules,
    __doc__="Options shared by the JSON and the multipart submit; ``None`` = the configured default.",
    **{option.rest_name: (_annotation(option) | None, None) for option in OPTIONS if option.rest},
    webhook_url=(AnyHttpUrl | None, None),
)


class SubmitRequest(JobOptions):  # type: ignore[misc,valid-type]
    video_source: StrictStr = Field(min_length=1)
    audio_source: StrictStr = Field(min_length=1)

    def options(self) -> JobOptions:
        return JobOptions.model_validate(self.model_dump(exclude={"video_source", "audio_source"}, exclude_unset=True))


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


def option_rules() -> dict[str, dict[str, Any]]:
    """Each job option's JSON type and allowed values (``enum`` or ``minimum``/``maximum``), from :class:`JobOptions`.

    What the web page builds its form from, so the form offers exactly what a submit accepts. The
    webhook URL is left out: the page polls.
    """
    rules = {}
    for name, schema in JobOptions.model_json_schema()["properties"].items():
        if name == "webhook_url":
            continue
        value = next(option for option in schema["anyOf"] if option["type"] != "null")
        rules[name] = {key: value[key] for key in _DESCRIBED if key in value}
    return rules
