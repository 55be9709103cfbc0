"""The face options in the REST API: their choices in the OpenAPI document and the rule between them."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from gateway.api.main import api_router
from gateway.jobs.schemas import SubmitOptions, SubmitRequest


def test_the_openapi_document_lists_the_face_choices() -> None:
    app = FastAPI()
    app.include_router(api_router)
    schemas = app.openapi()["components"]["schemas"]
    face = next(option for option in schemas["SubmitRequest"]["properties"]["face"]["anyOf"] if "enum" in option)
    assert face["enum"] == ["largest", "box", "active_speaker"]
    assert "face_box" in schemas["SubmitRequest"]["properties"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"face_box": "10,10"}, "face_box is only taken with face=box"),
        ({"face": "largest", "face_box": "10,10"}, "face_box is only taken with face=box"),
        ({"face": "box"}, "face=box needs face_box"),
        ({"face": "box", "face_box": "10,10,5,5"}, "x0 < x1"),
        ({"face": "box", "face_box": "1e999,3"}, "'x,y'"),
    ],
)
def test_face_rules_hold_for_json_and_forms(options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SubmitOptions.model_validate(options)
    with pytest.raises(ValidationError, match=message):
        SubmitRequest.model_validate({"video_source": "v", "audio_source": "a"} | options)
    assert SubmitOptions.model_validate({"face": "box", "face_box": "10,10"}).face_box == "10,10"
