"""The multipart upload's parts, parsed strictly into the JSON submit's types.

Form fields are text, so numbers arrive as strings; they are read with the grammar of a JSON number of
the field's type and nothing looser: an integer field takes ``"2"`` or ``"-3"`` (ASCII digits, an
optional minus, no leading zero) but not ``"2.0"``, ``"+2"``, ``" 2"``, ``"2_0"``, ``"02"`` or ``"true"``; a
float field takes ``"1.5"``, ``"2"`` or ``"1e-1"`` but not ``".5"``, ``"5."``, ``"01"``, ``"nan"``, ``"inf"``,
``"1e999"`` or ``"true"``. An empty field counts as
not given (browsers send empty inputs). The parts are exactly the ``video`` and ``audio`` files and
the option fields of :class:`gateway.jobs.schemas.SubmitOptions`, each at most once; anything else is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from starlette.datastructures import FormData, UploadFile

from gateway.jobs.schemas import SubmitOptions
from gateway.jobs.validation import InvalidInput
from lipsync.contract import OPTIONS

FILE_PARTS = ("video", "audio")

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)", re.ASCII)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)
"""RFC 8259's ``int`` and ``number``: what the JSON submit would accept for the field."""


def _integer(name: str, text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise InvalidInput(
            f"{name}: must be a JSON integer (digits, an optional minus, no leading zero), got {text[:40]!r}"
        )
    return int(text)


def _number(name: str, text: str) -> float:
    if not _NUMBER.fullmatch(text) or not math.isfinite(value := float(text)):
        raise InvalidInput(f"{name}: must be a finite JSON number (like 1.5, 2 or 1e-1), got {text[:40]!r}")
    return value


def _text(_: str, text: str) -> str:
    return text


_PARSERS: dict[type, Callable[[str, str], Any]] = {int: _integer, float: _number, str: _text}

OPTION_PARSERS: dict[str, Callable[[str, str], Any]] = {
    **{option.name: _PARSERS[option.type] for option in OPTIONS if option.rest},
    "webhook_url": _text,
}
"""How each option field's text becomes the value :class:`SubmitOptions` validates (one entry per option)."""

MAX_FIELDS = len(OPTION_PARSERS)
MAX_FILES = len(FILE_PARTS)


def upload_parts(form: FormData, optional: tuple[str, ...] = ()) -> tuple[SubmitOptions, dict[str, UploadFile]]:
    """The options and the ``video``/``audio`` files of an upload; :class:`InvalidInput` (or pydantic's
    ``ValidationError`` for values out of range) when the form is not exactly that. The files named in
    ``optional`` may be left out (then they are not in the answer)."""
    unknown = sorted(set(form.keys()) - set(OPTION_PARSERS) - set(FILE_PARTS))
    if unknown:
        raise InvalidInput(f"unknown form field(s): {', '.join(name[:40] for name in unknown[:5])}")
    files: dict[str, UploadFile] = {}
    for name in FILE_PARTS:
        parts = form.getlist(name)
        if not parts and name in optional:
            continue
        if len(parts) != 1 or not isinstance(parts[0], UploadFile):
            raise InvalidInput(f"{name}: exactly one file part named {name!r} is needed")
        files[name] = parts[0]
    values: dict[str, Any] = {}
    for name, parse in OPTION_PARSERS.items():
        given = form.getlist(name)
        if len(given) > 1:
            raise InvalidInput(f"{name}: given {len(given)} times")
        if not given or given[0] == "":
            continue
        if not isinstance(given[0], str):
            raise InvalidInput(f"{name}: must be a form field, not a file")
        values[name] = parse(name, given[0])
    return SubmitOptions.model_validate(values), files


ITEM_PREFIX = re.compile(r"items\.(0|[1-9][0-9]{0,3})\.(.+)", re.ASCII | re.DOTALL)
"""A batch upload's item part: ``items.<index>.<name>``, ``<name>`` a part of the single upload."""


def batch_items(form: FormData) -> tuple[list[FormData], str | None]:
    """A batch upload's items (each as the single upload's form) and its ``webhook_url`` field.

    Items are numbered from 0 without gaps; :class:`InvalidInput` for any other part or numbering."""
    grouped: dict[int, list[tuple[str, str | UploadFile]]] = {}
    webhook: list[str | UploadFile] = []
    for name, value in form.multi_items():
        if name == "webhook_url":
            webhook.append(value)
            continue
        match = ITEM_PREFIX.fullmatch(name)
        if match is None:
            raise InvalidInput(f"unknown form field {name[:40]!r}: item parts are named items.<index>.<part>")
        grouped.setdefault(int(match[1]), []).append((match[2], value))
    if len(webhook) > 1 or (webhook and not isinstance(webhook[0], str)):
        raise InvalidInput("webhook_url: at most one form field (not a file)")
    if sorted(grouped) != list(range(len(grouped))):
        raise InvalidInput("items must be numbered 0, 1, 2 … without gaps (items.<index>.<part>)")
    items = [FormData(grouped[index]) for index in range(len(grouped))]
    return items, (webhook[0] if webhook and webhook[0] else None)  # type: ignore[return-value]
