"""The gateway's request handling on its own: secret comparison, strict types (JSON and form), the
idempotency fingerprint, the per-key quota in the job table, rate limits. (Against the running
gateway: test_gateway_abuse.py and test_gateway_bad_input.py.)"""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from gateway.core.auth import ApiKeys, bearer_key, secure_equal
from gateway.core.errors import ApiError
from gateway.core.settings import GatewaySettings
from gateway.jobs.forms import OPTION_PARSERS, upload_parts
from gateway.jobs.idempotency import fingerprint
from gateway.jobs.quotas import Quotas
from gateway.jobs.schemas import SubmitOptions, JobRef, SubmitRequest
from gateway.jobs.validation import InvalidInput
from gateway.store import JobStore, new_job_id, sqlite_url

PARAMS = {"inference_steps": 1, "guidance_scale": 1.5, "seed": 1, "loop_mode": None, "version": None}


@pytest.fixture
def store(tmp_path) -> JobStore:
    store = JobStore(sqlite_url(tmp_path / "jobs.db"))
    yield store
    store.close()


@pytest.mark.parametrize(("given", "expected", "equal"), [
    ("é", "abc", False), ("\ud800", "abc", False), ("abc", "abc", True), ("tøken", "tøken", True), ("", "x", False),
])
def test_secrets_compare_as_bytes_whatever_the_client_sends(given, expected, equal) -> None:
    assert secure_equal(given, expected) is equal


def test_any_bearer_value_is_a_key_or_none_never_an_error() -> None:
    keys = ApiKeys.load("NO_SUCH_VARIABLE", None, extra=["good-key"])
    assert keys.owner(bearer_key("Bearer good-key")) is not None
    assert keys.owner(bearer_key("bearer  good-key ")) == keys.owner("good-key")
    for header in (None, "", "Bearer", "Bearer ", "Basic good-key", "good-key", "Bearer é\x00", "Bearer \udcff"):
        assert keys.owner(bearer_key(header)) is None


@pytest.mark.parametrize(("field", "value"), [
    ("inference_steps", "2"), ("inference_steps", 2.0), ("inference_steps", True), ("seed", 1.0), ("seed", "7"),
])
def test_json_integers_must_be_json_integers(field, value) -> None:
    with pytest.raises(ValidationError):
        SubmitOptions.model_validate({field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("guidance_scale", True), ("guidance_scale", "1.5"), ("seed", False), ("loop_mode", 1), ("version", 1.5),
    ("webhook_url", 42), ("video_source", 5), ("audio_source", ["AAAA"]),
])
def test_json_fields_take_only_their_own_type(field, value) -> None:
    with pytest.raises(ValidationError):
        SubmitRequest.model_validate({"video_source": "AAAA", "audio_source": "AAAA", field: value})


def test_numbers_of_the_right_type_pass_and_a_float_field_takes_an_integer() -> None:
    options = SubmitOptions.model_validate({"inference_steps": 2, "guidance_scale": 2, "seed": -(2**63)})
    assert (options.inference_steps, options.guidance_scale, options.seed) == (2, 2.0, -(2**63))
    with pytest.raises(ValidationError):
        JobRef.model_validate({"request_id": "0" * 32, "extra": 1})


def form(**fields: str | list[str]) -> FormData:
    items: list[tuple[str, str | UploadFile]] = [
        ("video", UploadFile(io.BytesIO(b"v"), filename="v")), ("audio", UploadFile(io.BytesIO(b"a"), filename="a")),
    ]
    for name, value in fields.items():
        items += [(name, one) for one in (value if isinstance(value, list) else [value])]
    return FormData(items)


def test_form_fields_cover_every_option() -> None:
    assert set(OPTION_PARSERS) == set(SubmitOptions.model_fields)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"inference_steps": "2"}, {"inference_steps": 2}),
    ({"seed": "-7"}, {"seed": -7}),
    ({"guidance_scale": "2"}, {"guidance_scale": 2.0}),
    ({"guidance_scale": "1.5"}, {"guidance_scale": 1.5}),
    ({"guidance_scale": "1e-1"}, {"guidance_scale": 0.1}),
    ({"guidance_scale": "0.5"}, {"guidance_scale": 0.5}),
    ({"guidance_scale": "-0"}, {"guidance_scale": 0.0}),
    ({"inference_steps": "10"}, {"inference_steps": 10}),
    ({"seed": "0"}, {"seed": 0}),
    ({"inference_steps": "", "mode": ""}, {}),
    ({"loop_mode": "cut", "version": "1.6", "mode": "fast"}, {"loop_mode": "cut", "version": "1.6", "mode": "fast"}),
])
def test_form_numbers_are_read_strictly(fields, expected) -> None:
    options, files = upload_parts(form(**fields))
    assert options.model_dump(exclude_none=True) == expected
    assert set(files) == {"video", "audio"}


@pytest.mark.parametrize("fields", [
    {"inference_steps": "2.0"}, {"inference_steps": "true"}, {"inference_steps": " 2"}, {"inference_steps": "+2"},
    {"inference_steps": "2_0"}, {"inference_steps": "٢"}, {"inference_steps": "0x10"}, {"seed": "1e3"},
    {"guidance_scale": "nan"}, {"guidance_scale": "inf"}, {"guidance_scale": "true"}, {"guidance_scale": "1,5"},
    {"inference_steps": "01"}, {"seed": "-01"}, {"guidance_scale": "01"}, {"guidance_scale": ".5"},
    {"guidance_scale": "5."}, {"guidance_scale": "-.5"}, {"guidance_scale": "1.e2"}, {"guidance_scale": "1e999"},
    {"inference_steps": ["2", "3"]}, {"output_path": "/etc/passwd"}, {"video": "not a file"},
])
def test_loose_or_unknown_form_fields_are_refused(fields) -> None:
    with pytest.raises(InvalidInput):
        upload_parts(form(**fields))


def test_out_of_range_form_values_fail_validation() -> None:
    with pytest.raises(ValidationError):
        upload_parts(form(inference_steps="0"))
    with pytest.raises(ValidationError):
        upload_parts(form(loop_mode="sideways"))


def test_a_missing_file_part_is_refused() -> None:
    with pytest.raises(InvalidInput, match="audio"):
        upload_parts(FormData([("video", UploadFile(io.BytesIO(b"v"), filename="v"))]))


def test_the_fingerprint_covers_inputs_and_options() -> None:
    base = fingerprint(SubmitOptions(inference_steps=2), "a" * 64, "b" * 64)
    assert base == fingerprint(SubmitOptions.model_validate({"inference_steps": 2}), "a" * 64, "b" * 64)
    assert base != fingerprint(SubmitOptions(inference_steps=3), "a" * 64, "b" * 64)
    assert base != fingerprint(SubmitOptions(inference_steps=2), "c" * 64, "b" * 64)
    assert base != fingerprint(SubmitOptions(inference_steps=2), "a" * 64, "c" * 64)
    assert base != fingerprint(SubmitOptions(inference_steps=2, seed=1247), "a" * 64, "b" * 64)


def test_rates_answer_429_with_retry_after_per_key(store, tmp_path) -> None:
    settings = GatewaySettings.load(data_dir=tmp_path, rate_limit="3/minute", submit_rate_limit="2/minute",
                                    max_active_jobs=1, quota_retry_after_s=7)
    quotas = Quotas(settings, store)
    quotas.count_request("a", submit=True)
    quotas.count_request("a", submit=True)
    with pytest.raises(ApiError) as submits:
        quotas.count_request("a", submit=True)
    quotas.count_request("b", submit=True)  # another key has its own counters
    with pytest.raises(ApiError) as requests:
        quotas.count_request("a", submit=False)
    for refused, setting in ((submits.value, "submit_rate_limit"), (requests.value, "rate_limit")):
        assert refused.status_code == 429 and setting in refused.reason
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    quotas.check_active_jobs("a", None)
    store.create(new_job_id(), "a", PARAMS, idempotency_key="k")
    with pytest.raises(ApiError) as quota:
        quotas.check_active_jobs("a", None)
    assert quota.value.status_code == 429 and quota.value.headers == {"Retry-After": "7"}
    assert "max_active_jobs" in quota.value.reason
    quotas.check_active_jobs("a", "k")  # a replay of a key already used creates nothing: let through
