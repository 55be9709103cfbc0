"""The served OpenAPI document and docs page, and ``docs/gateway-api.md`` held to them: every endpoint the
page documents is served with its method and every served one is documented; the fields documented for
the submit, the status, the info and the error answers are those of the schemas, no more and no less."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from support.local_gateway import LocalGateway

DOC = (Path(__file__).resolve().parents[2] / "docs" / "gateway-api.md").read_text()
ENDPOINT = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)")
IDENTIFIER = re.compile(r"`([a-z_]+)`")


@pytest.fixture(scope="module")
def openapi(local_gateway: LocalGateway) -> dict[str, Any]:
    response = local_gateway.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


def section(title: str) -> str:
    """The text of the ``## title`` section of the page."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert match, f"no section {title!r} in docs/gateway-api.md"
    return match.group(1)


def properties(openapi: dict[str, Any], name: str) -> set[str]:
    return set(openapi["components"]["schemas"][name]["properties"])


def answer_schema(openapi: dict[str, Any], method: str, path: str) -> str:
    """The name of the schema a route's 200 answer has."""
    schema = openapi["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    return schema["$ref"].rsplit("/", 1)[-1]


def test_every_documented_endpoint_is_served_with_its_method_and_every_served_one_is_documented(openapi) -> None:
    documented = {(method.lower(), path) for method, path in ENDPOINT.findall(DOC)}
    served = {(method, path) for path, operations in openapi["paths"].items() for method in operations}
    assert documented == served | {("get", "/openapi.json"), ("get", "/docs")}


def test_the_documented_status_answer_has_exactly_the_schemas_fields(openapi) -> None:
    example = json.loads(re.search(r"```json\n(.*?)```", section("Status"), re.S).group(1))
    for path in ("/lipsync/status", "/lipsync/cancel"):
        assert answer_schema(openapi, "post", path) == "JobStatus"
    assert set(example) == properties(openapi, "JobStatus")
    assert set(example["results"]) == properties(openapi, "JobResults")
    assert set(example["results"]["video"][0]) == properties(openapi, "VideoUrl")
    assert set(example["results"]["timings"]) == properties(openapi, "Timings")
    states = set(re.search(r"- `status`: (.*?);", section("Status"), re.S).group(1).replace(" or ", ", ").split(", "))
    status = openapi["components"]["schemas"]["JobStatus"]["properties"]["status"]
    assert {state.strip("`") for state in states} == set(status["enum"])
    described = {name for name in IDENTIFIER.findall(section("Status").split("```json")[-1].split("```", 1)[1])
                 if name in properties(openapi, "JobStatus")}
    assert described == properties(openapi, "JobStatus") - {"request_id"}, "a status field is not explained"


def test_the_documented_submit_fields_are_the_request_schemas(openapi) -> None:
    table = re.findall(r"^\| `([a-z_]+)` \|", section("Submit"), re.M)
    assert set(table) == properties(openapi, "SubmitRequest")
    assert answer_schema(openapi, "post", "/lipsync/submit") == "Submitted"
    assert answer_schema(openapi, "post", "/lipsync/upload") == "Submitted"
    assert answer_schema(openapi, "get", "/v1/jobs") == "JobList"
    assert openapi["components"]["schemas"]["JobList"]["properties"]["jobs"]["items"]["$ref"].endswith("/JobStatus")
    listing = set(IDENTIFIER.findall(section("Recent jobs")))
    assert properties(openapi, "JobList") <= listing, "a field of the job list is not explained"


def test_the_documented_info_and_error_answers_have_exactly_the_schemas_fields(openapi) -> None:
    info = next(line for line in section("Operations").split("\n- ") if line.startswith("`GET /v1/info`"))
    assert properties(openapi, "Info") <= set(IDENTIFIER.findall(info)), "a field of the info answer is not explained"
    places = re.search(r"`api_keys` `\{(.*?)\}`", info).group(1)
    assert {name.strip(' "') for name in places.split(",")} == properties(openapi, "KeyPlaces")
    assert answer_schema(openapi, "get", "/v1/info") == "Info"
    error = json.loads(re.search(r"Every error is JSON `(\{.*?\})`", section("Errors")).group(1).replace("…", ""))
    assert set(error) == properties(openapi, "ErrorBody")
    codes = {int(code) for code in re.findall(r"^\| (\d{3}) \|", section("Errors"), re.M)}
    answered = {int(code) for operations in openapi["paths"].values() for operation in operations.values()
                for code in operation["responses"] if code.isdigit() and int(code) >= 400}
    assert answered <= codes | {503}
    assert codes <= answered


def test_no_answer_is_an_untyped_object(openapi) -> None:
    """Every JSON answer has a schema with its fields (no ``additionalProperties: true`` bag)."""
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema is not None:
                    assert "$ref" in schema, f"{method} {path} {code}: {schema}"
    for name, schema in openapi["components"]["schemas"].items():
        assert schema.get("additionalProperties") is not True, name


def test_the_docs_page_is_served(local_gateway: LocalGateway) -> None:
    response = local_gateway.client.get("/docs")
    assert response.status_code == 200
    assert "/openapi.json" in response.text
