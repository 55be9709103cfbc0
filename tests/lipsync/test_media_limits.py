"""Media limits (configs/media.yaml ``limits``): checked from headers before any frame is decoded, counted
while decoding where headers do not say, and decoders bounded by ``max_pixels``. Both the model side
(:class:`VideoReader`, :func:`load_audio`) and the gateway's submit check run these checks."""

from __future__ import annotations

import dataclasses
import re
import resource

import av
import pytest
from support.bombs import huge_frame_video, raw_h264, silent_flac, sparse_video
from support.clips import speech, write_wav

from gateway.jobs.validation import InvalidInput, check_audio, check_video
from lipsync.audio import load_audio
from lipsync.config import ConfigError
from lipsync.media import MediaSettings, VideoReader
from lipsync.media.errors import MediaLimitError
from lipsync.media.probe import open_media
from lipsync.media.settings import MEDIA_CONFIG

SETTINGS = MediaSettings.load()
LIMITS = SETTINGS.limits


def with_limits(**changes) -> MediaSettings:
    return dataclasses.replace(SETTINGS, limits=dataclasses.replace(LIMITS, **changes))


def test_the_limits_come_from_media_yaml(tmp_path) -> None:
    assert LIMITS.max_side >= 1920 and LIMITS.max_pixels >= 1920 * 1080
    assert LIMITS.max_video_s > 0 and LIMITS.max_frames > 0 and LIMITS.max_audio_s > 0
    broken = tmp_path / "media.yaml"
    broken.write_text(MEDIA_CONFIG.read_text().split("\nlimits:")[0])  # the file without its limits
    with pytest.raises(ConfigError, match="malformed"):
        MediaSettings.load(broken)


@pytest.mark.parametrize(
    ("size", "limit"), [((LIMITS.max_side + 8, 64), "max_side"), ((64, LIMITS.max_side + 8), "max_side"), ((4000, 4000), "max_pixels")],
)
def test_a_picture_over_the_limits_is_refused_by_the_reader_and_the_submit_check(tmp_path, size, limit) -> None:
    assert size[0] * size[1] > LIMITS.max_pixels or max(size) > LIMITS.max_side
    bomb = huge_frame_video(tmp_path / "bomb.mov", *size)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(MediaLimitError, match=rf"{size[0]}×{size[1]}.*\({limit}\)"):
        VideoReader(bomb)
    with pytest.raises(InvalidInput, match=rf"^video_source: .*\({limit}\)"):
        check_video(bomb, "video_source")


@pytest.mark.parametrize(("name", "size", "limit"), [
    ("bomb.avi", (4000, 4000), "max_pixels"),
    ("bomb.avi", (8192, 8192), "max_side"),
    ("bomb.mkv", (12000, 12000), "max_side"),
])
def test_a_picture_the_decoder_must_open_to_describe_is_refused_naming_the_limit(tmp_path, name, size, limit) -> None:
    """MJPEG's pixel format is only known once a frame is decoded, and the bounded decoder refuses the
    frame: the limit is still named (from the header), not a corrupt file."""
    bomb = huge_frame_video(tmp_path / name, *size)
    with pytest.raises(MediaLimitError, match=rf"{size[0]}×{size[1]}.*\({limit}\)"):
        VideoReader(bomb)
    with pytest.raises(InvalidInput, match=rf"^video_source: .*\({limit}\)"):
        check_video(bomb, "video_source")


@pytest.mark.parametrize("name", ["edge.mp4", "edge.avi"])
@pytest.mark.parametrize("size", [(LIMITS.max_pixels // LIMITS.max_side, LIMITS.max_side),
                                  (LIMITS.max_side, LIMITS.max_pixels // LIMITS.max_side)])
def test_a_picture_exactly_at_the_limits_is_accepted_and_decodes(tmp_path, name, size) -> None:
    """2160×4096: FFmpeg pads the width to 2176 before its own ``max_pixels`` check."""
    assert size[0] * size[1] == LIMITS.max_pixels and max(size) == LIMITS.max_side
    video = huge_frame_video(tmp_path / name, *size)
    check_video(video, "video_source")
    with VideoReader(video) as reader:
        assert (reader.info.width, reader.info.height) == size
        assert next(iter(reader)) is not None


def test_the_decoder_refuses_pictures_over_max_pixels_whatever_the_headers_say(tmp_path) -> None:
    video = huge_frame_video(tmp_path / "big.mp4", 640, 640)
    limits = with_limits(max_pixels=320 * 320).limits
    with open_media(video, limits) as container:  # what a lying header would let through to decoding
        with pytest.raises(av.FFmpegError):
            next(container.decode(container.streams.video[0]))


def test_a_declared_duration_over_the_limit_is_refused_before_decoding(tmp_path) -> None:
    video = sparse_video(tmp_path / "sparse.mp4", LIMITS.max_video_s + 100)
    assert video.stat().st_size < 10_000
    with pytest.raises(MediaLimitError, match=r"\(max_video_s\)"):
        VideoReader(video)
    with pytest.raises(InvalidInput, match=r"video_source: .*\(max_video_s\)"):
        check_video(video, "video_source")


def test_a_declared_frame_count_over_the_limit_is_refused(tmp_path) -> None:
    video = huge_frame_video(tmp_path / "many.mp4", 32, 32, frames=12)
    with pytest.raises(MediaLimitError, match=r"12 frames.*\(max_frames\)"):
        VideoReader(video, settings=with_limits(max_frames=10))


def test_frames_are_counted_while_decoding_when_no_header_says_how_many(tmp_path) -> None:
    stream = raw_h264(tmp_path / "clip.h264", 12)
    with VideoReader(stream, settings=with_limits(max_frames=12)) as reader:  # at the limit: fine
        assert len(list(reader)) >= 12
    with VideoReader(stream, settings=with_limits(max_frames=5)) as reader:  # the header check cannot see it
        with pytest.raises(MediaLimitError, match=r"\(max_frames\)"):
            list(reader)


def test_audio_over_the_limit_is_refused_from_its_header(tmp_path) -> None:
    bomb = silent_flac(tmp_path / "silence.flac", LIMITS.max_audio_s + 10)
    assert bomb.stat().st_size < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    with pytest.raises(MediaLimitError, match=r"\(max_audio_s\)"):
        load_audio(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_utime - before < 1  # not decoded first
    with pytest.raises(InvalidInput, match=r"audio_source: .*\(max_audio_s\)"):
        check_audio(bomb, "audio_source")


def test_audio_limits_are_configurable_and_within_them_nothing_changes(tmp_path) -> None:
    wav = write_wav(tmp_path / "speech.wav", speech(2.0))
    assert load_audio(wav, limits=with_limits(max_audio_s=2.5).limits).size == 32000
    with pytest.raises(MediaLimitError, match=re.escape("2.0 s; the limit is 1 s (max_audio_s)")):
        load_audio(wav, limits=with_limits(max_audio_s=1).limits)
    with pytest.raises(InvalidInput, match="max_audio_s"):
        check_audio(wav, "audio_source", with_limits(max_audio_s=1))
