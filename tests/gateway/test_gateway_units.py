"""The gateway's parts on their own: data-dir paths, API keys, settings, base64 and content checks. (The job
table: test_store.py; jobs that run on Triton: test_gateway_api.py.)"""

from __future__ import annotations

import base64
import os

import pytest
from support.clips import demo_frames, speech, write_video, write_wav

from gateway.core.auth import ApiKeys, KeyConfigError, digest, local_key
from gateway.core.settings import GatewaySettings
from gateway.jobs.storage import DataDir, is_job_id
from gateway.jobs.validation import (
    InvalidInput,
    check_audio,
    check_video,
    decode_base64,
)
from gateway.store import new_job_id


@pytest.mark.parametrize("value", ["../x", "0" * 31, "0" * 33, "A" * 32, "0" * 31 + "/", "", "0" * 32 + "\n"])
def test_paths_are_built_only_from_ids_of_our_shape(tmp_path, value) -> None:
    assert not is_job_id(value)
    with pytest.raises(ValueError):
        DataDir(tmp_path).inputs(value)
    with pytest.raises(ValueError):
        DataDir(tmp_path).result(value)
    assert is_job_id(new_job_id())


def test_keys_come_from_the_environment_and_a_file_as_plain_keys_or_digests(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "alpha, beta")
    key_file = tmp_path / "keys"
    key_file.write_text(f"# comment\ngamma\nsha256:{digest('delta').hex()}\n\n")
    keys = ApiKeys.load("TEST_KEYS", key_file)
    owners = [keys.owner(key) for key in ("alpha", "beta", "gamma", "delta")]
    assert None not in owners and len(set(owners)) == 4
    assert "alpha" not in owners[0] and len(owners[0]) == 16
    assert keys.owner("alpha ") is None and keys.owner("") is None and keys.owner("ALPHA") is None
    assert ApiKeys.load("TEST_KEYS_UNSET", None).owner("alpha") is None


def test_a_malformed_digest_entry_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "sha256:abc")
    with pytest.raises(KeyConfigError):
        ApiKeys.load("TEST_KEYS", None)


def test_the_local_key_is_made_once_private_and_reused(tmp_path) -> None:
    path = tmp_path / "data" / "local_api_key"
    key = local_key(path)
    assert len(key) >= 40 and local_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600


def test_settings_come_from_serving_yaml_with_overrides(tmp_path) -> None:
    settings = GatewaySettings.load(port=9999, data_dir=tmp_path)
    assert settings.port == 9999 and settings.data_dir == tmp_path
    assert settings.max_body_bytes == 200 * 1024 * 1024
    assert settings.triton_grpc.endswith(":8001")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("aGVsbG8=", b"hello"), ("aGVs\nbG8=", b"hello"), ("data:video/mp4;base64,aGVsbG8=", b"hello")],
)
def test_base64_accepts_line_breaks_and_data_urls(text, expected) -> None:
    assert decode_base64(text, "video_source") == expected


@pytest.mark.parametrize("text", ["aGVsbG8", "aGVsbG8=!", "héllo", "", "====", "data:video/mp4;base64,"])
def test_malformed_or_empty_base64_is_invalid_input(text) -> None:
    with pytest.raises(InvalidInput, match="video_source"):
        decode_base64(text, "video_source")


def test_content_checks_use_the_bytes_not_the_name(tmp_path) -> None:
    video = write_video(tmp_path / "clip.mp4", demo_frames(5)).rename(tmp_path / "clip.wav")  # named like audio
    audio = write_wav(tmp_path / "speech.wav", speech(0.3)).rename(tmp_path / "speech.mp4")  # named like a video
    check_video(video, "video_source")
    check_audio(audio, "audio_source")
    with pytest.raises(InvalidInput, match="video_source"):
        check_video(audio, "video_source")
    with pytest.raises(InvalidInput, match="audio_source has no audio stream"):
        check_audio(video, "audio_source")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(InvalidInput) as raised:
        check_video(truncated, "video_source")
    assert str(tmp_path) not in str(raised.value)
    text = tmp_path / "notes.mp4"
    text.write_bytes(base64.b64encode(os.urandom(3000)))
    for check, field in ((check_video, "video_source"), (check_audio, "audio_source")):
        with pytest.raises(InvalidInput, match=field):
            check(text, field)


def test_durations_read_as_a_person_reads_them() -> None:
    from gateway.jobs.worker import human_duration

    assert [human_duration(s) for s in (0.42, 9.96, 12.4, 59.6, 408.076, 7500)] == [
        "0.4 s", "10.0 s", "12 s", "1 min 0 s", "6 min 48 s", "2 h 05 min",
    ]
