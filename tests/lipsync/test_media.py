"""Media I/O: streaming decode at 25 fps, the MP4 writer, and clear errors for unusable files."""

from __future__ import annotations

import gc
import math
import os
import weakref
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.stream import Disposition
from support.files import DEMO_VIDEO

from lipsync.audio import load_audio
from lipsync.config import ConfigError
from lipsync.media import MediaError, MediaSettings, VideoReader, VideoWriter

SIZE = (64, 48)
LEVEL_STEP = 4
"""Frame ``i`` of a generated clip is flat grey ``i * LEVEL_STEP``, so a decoded frame tells its source."""



def make_clip(
    path: Path,
    *,
    codec: str = "libx264",
    fps: Fraction | int = 25,
    frames: int = 25,
    size: tuple[int, int] = SIZE,
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    noise: bool = False,
) -> Path:
    """Write a clip whose frame ``i`` is grey ``i * LEVEL_STEP`` with a white top-left block (or noise)."""
    width, height = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        for index in range(frames):
            if noise:
                picture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                picture = np.full((height, width, 3), index * LEVEL_STEP, np.uint8)
                picture[: height // 3, : width // 3] = 255
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def source_index(frame: np.ndarray) -> int:
    """Which generated source frame a decoded frame shows (from the grey outside the white block)."""
    height, width = frame.shape[:2]
    return round(float(frame[height // 2 :, width // 2 :].mean()) / LEVEL_STEP)


def fps_filter_rule(source_fps: Fraction, count: int, fps: int = 25) -> list[int]:
    """The documented resampling rule: tick n shows the last source frame whose time rounds to ≤ n."""
    ticks = [math.floor(k * fps / source_fps + Fraction(1, 2)) for k in range(count)]
    end = math.floor(count * fps / source_fps + Fraction(1, 2))
    return [max(k for k, tick in enumerate(ticks) if tick <= n) for n in range(end)]


def read_all(path: Path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return list(reader)


def transcode(source: Path, out_dir: Path) -> None:
    """Decode → encode, as the pipeline does around its model."""
    with VideoReader(source) as reader:
        with VideoWriter(out_dir / "out.mp4", reader.info.width, reader.info.height) as writer:
            for frame in reader:
                writer.write(frame)


def write_clip(path: Path, frames: Iterator[np.ndarray] | list[np.ndarray], audio: np.ndarray | None = None) -> Path:
    frames = list(frames)
    height, width = frames[0].shape[:2]
    with VideoWriter(path, width, height, audio=audio) as writer:
        for frame in frames:
            writer.write(frame)
    return path


# --- decoding ------------------------------------------------------------------------------------


def test_demo_clip_streams_every_frame_with_metadata() -> None:
    with VideoReader(DEMO_VIDEO) as reader:
        info = reader.info
        frames = iter(reader)
        first = next(frames)
        count = 1 + sum(1 for frame in frames if frame.shape == (1920, 1080, 3) and frame.dtype == np.uint8)
    assert (info.codec, info.width, info.height, info.fps, info.rotation) == ("hevc", 1080, 1920, 25.0, 0)
    assert info.duration == pytest.approx(10.0) and info.frame_count == 250 and info.frames_at(25) == 250
    assert info.has_audio
    assert count == 250  # 25 fps source: every frame once
    with av.open(str(DEMO_VIDEO)) as container:
        direct = next(container.decode(video=0)).to_ndarray(format="rgb24")
    np.testing.assert_array_equal(first, direct)


@pytest.mark.parametrize(
    ("codec", "suffix"),
    [
        ("libx264", "mp4"),
        ("libx264", "mov"),
        ("libx264", "mkv"),
        ("libvpx-vp9", "webm"),
        ("libx265", "mp4"),
        ("libx264", "h264"),
    ],
)
def test_common_containers_and_codecs_decode(tmp_path: Path, codec: str, suffix: str) -> None:
    """Includes a raw H.264 stream (``.h264``), whose frames carry no timestamps at all."""
    clip = make_clip(tmp_path / f"clip.{suffix}", codec=codec, frames=10)
    with VideoReader(clip) as reader:
        assert (reader.info.width, reader.info.height) == SIZE
        frames = list(reader)
    assert [source_index(frame) for frame in frames] == list(range(10))
    assert frames[0].shape == (SIZE[1], SIZE[0], 3)


@pytest.mark.parametrize("source_fps", [Fraction(30), Fraction(24), Fraction(50), Fraction(30000, 1001), Fraction(15)])
def test_resampling_to_25_fps_follows_the_fps_filter_rule(tmp_path: Path, source_fps: Fraction) -> None:
    count = int(source_fps) + 2  # a little over a second: drops, repeats and the end all show
    clip = make_clip(tmp_path / "clip.mp4", fps=source_fps, frames=count)
    shown = [source_index(frame) for frame in read_all(clip)]
    assert shown == fps_filter_rule(source_fps, count)
    assert len(shown) == round(count / source_fps * 25)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path: Path, rotation: int) -> None:
    clip = make_clip(tmp_path / "phone.mp4", frames=3, rotation=rotation, pix_fmt="yuv444p")
    with VideoReader(clip) as reader:
        info = reader.info
        frame = next(iter(reader))
    stored = np.zeros((SIZE[1], SIZE[0]), bool)
    stored[: SIZE[1] // 3, : SIZE[0] // 3] = True
    upright = np.rot90(stored, k=rotation // 90)  # display rotation is counter-clockwise
    assert info.rotation == rotation and (info.height, info.width) == upright.shape == frame.shape[:2]
    assert ((frame[..., 0] > 128) == upright).mean() > 0.97


def test_odd_sized_video_decodes_at_its_size(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "odd.webm", codec="libvpx-vp9", frames=3, size=(63, 47))
    frames = read_all(clip)
    assert len(frames) == 3 and frames[0].shape == (47, 63, 3)


def test_frames_can_be_read_once(tmp_path: Path) -> None:
    with VideoReader(make_clip(tmp_path / "clip.mp4", frames=2)) as reader:
        assert len(list(reader)) == 2
        with pytest.raises(RuntimeError, match="read once"):
            list(reader)


def _decoder_threads() -> int:
    """Threads of this process that FFmpeg's decoders started (FFmpeg names them ``av:<codec>:…``)."""
    return sum(Path(f"/proc/self/task/{task}/comm").read_text().startswith("av:") for task in os.listdir("/proc/self/task"))


@pytest.mark.parametrize("read", ["all", "some", "none"])
def test_a_closed_reader_frees_its_decoder_without_the_garbage_collector(read: str) -> None:
    """A job process allocates few Python objects, so a full collection may not come for many jobs: a
    reader held only by a reference cycle would keep its decoder threads and frames that long."""
    before = _decoder_threads()
    gc.disable()
    try:
        with VideoReader(DEMO_VIDEO) as reader:
            assert _decoder_threads() > before  # the demo clip's decoder runs frame threads
            frames = iter(reader)
            if read != "none":
                for _ in range(240 if read == "all" else 3):
                    next(frames, None)
            del frames
        freed = weakref.ref(reader)
        del reader
        assert freed() is None
        assert _decoder_threads() == before
    finally:
        gc.enable()


# --- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("audio_seconds", "expected_audio_seconds"),
    [(1.0, 1.0), (1.5, 1.0), (0.5, 0.5)],
    ids=["audio-matches", "audio-longer-is-cut", "audio-shorter-not-padded"],
)
def test_writer_round_trip(tmp_path: Path, audio_seconds: float, expected_audio_seconds: float) -> None:
    colour = np.array([200, 60, 30], np.uint8)
    frames = [np.broadcast_to(colour, (SIZE[1], SIZE[0], 3)) for _ in range(25)]
    audio = 0.3 * np.sin(np.arange(round(audio_seconds * 16000)) * 2 * np.pi * 440 / 16000).astype(np.float32)
    out = write_clip(tmp_path / "out.mp4", frames, audio)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.mp4"]
    with av.open(str(out)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.width, video.height, video.pix_fmt) == ("h264", *SIZE, "yuv420p")
        assert video.average_rate == 25 and video.frames == 25
        assert (sound.codec_context.name, sound.rate, sound.channels) == ("aac", 16000, 1)
        assert container.duration / av.time_base == pytest.approx(1.0, abs=0.04)
    assert load_audio(out).size == pytest.approx(expected_audio_seconds * 16000, abs=640)  # ±1 frame

    decoded = read_all(out)
    assert len(decoded) == 25
    assert max(int(np.abs(frame.astype(int) - colour).max()) for frame in decoded) <= 3


def test_writer_keeps_input_resolution_and_moves_index_to_front(tmp_path: Path) -> None:
    with VideoReader(DEMO_VIDEO) as reader:
        frames = [frame for _, frame in zip(range(5), reader)]
    out = write_clip(tmp_path / "out.mp4", frames, load_audio(DEMO_VIDEO)[: 5 * 640])
    with VideoReader(out) as reader:
        assert (reader.info.width, reader.info.height, reader.info.fps) == (1080, 1920, 25.0)
        decoded = list(reader)
    assert len(decoded) == 5
    assert np.abs(decoded[2].astype(int) - frames[2]).mean() < 2  # crf 18: visually lossless
    boxes = top_level_boxes(out)
    assert boxes.index(b"moov") < boxes.index(b"mdat")  # +faststart


def top_level_boxes(path: Path) -> list[bytes]:
    data = path.read_bytes()
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes.append(data[offset + 4 : offset + 8])
        offset += size if size >= 8 else len(data)
    return boxes


def test_writer_crops_odd_sizes_to_even(tmp_path: Path) -> None:
    rows, columns = np.mgrid[:47, :63]
    gradient = np.stack([columns * 4, rows * 5, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    frames = [gradient] * 3
    with VideoWriter(tmp_path / "out.mp4", 63, 47) as writer:
        assert writer.output_size == (62, 46)
        for frame in frames:
            writer.write(frame)
    decoded = read_all(tmp_path / "out.mp4")
    assert decoded[0].shape == (46, 62, 3)
    assert np.abs(decoded[0].astype(int) - gradient[:46, :62]).mean() < 3  # cropped, not shifted or scaled


def test_writer_leaves_nothing_behind_on_errors(tmp_path: Path) -> None:
    frame = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "out.mp4", *SIZE) as writer:
            writer.write(frame)
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match=r"expected a \(48, 64, 3\) uint8"):
        with VideoWriter(tmp_path / "out.mp4", *SIZE) as writer:
            writer.write(frame[:, :-1])
    with pytest.raises(MediaError, match="no frames were written"):
        with VideoWriter(tmp_path / "out.mp4", *SIZE):
            pass
    abandoned = VideoWriter(tmp_path / "out.mp4", *SIZE)  # never closed: dropping it removes its temp file
    abandoned.write(frame)
    del abandoned
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MediaError, match="output folder does not exist"):
        VideoWriter(tmp_path / "missing" / "out.mp4", *SIZE)


# --- unusable inputs -----------------------------------------------------------------------------


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def half(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"half-{path.name}")
    cut.write_bytes(data[: len(data) // 2])
    path.unlink()
    return cut


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        write_silence(container, stream)
    return path


def audio_with_cover(path: Path) -> Path:
    """An MP3 with album art: a "video" stream that is only a cover image."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libmp3lame", rate=16000, layout="mono")
        cover = container.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 16, 16, "rgb24"
        cover.disposition = Disposition.attached_pic
        container.start_encoding()
        for packet in cover.encode(av.VideoFrame(16, 16, "rgb24")) + cover.encode(None):
            packet.pts = packet.dts = 0
            container.mux(packet)
        write_silence(container, stream)
    return path


def empty_video_track(path: Path) -> Path:
    """A Matroska file whose video track has no frames (only its audio track has data)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = *SIZE, "yuv420p"
        write_silence(container, container.add_stream("aac", rate=16000, layout="mono"))
    return path


def write_silence(container: av.container.OutputContainer, stream: av.AudioStream) -> None:
    frame = av.AudioFrame.from_ndarray(np.zeros((1, stream.rate), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = stream.rate, 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def evc_mp4(path: Path) -> Path:
    """An MP4 whose video is MPEG-5 EVC (``evc1``): FFmpeg knows the codec but this build has no decoder."""
    data = make_clip(path, frames=3).read_bytes()
    entry = data.index(b"avc1", data.index(b"stsd"))
    path.write_bytes(data[:entry] + b"evc1" + data[entry + 4 :])
    return path


BAD_INPUTS = {
    "missing-file": (lambda tmp: tmp / "nope.mp4", "not found"),
    "empty-file": (lambda tmp: written(tmp / "empty.mp4", b""), "is empty"),
    "random-bytes": (
        lambda tmp: written(tmp / "noise.mp4", np.random.default_rng(0).bytes(50_000)),
        "not a video file FFmpeg can read",
    ),
    "text-file": (lambda tmp: written(tmp / "notes.mov", b"hello\n" * 100), "not a video file"),
    "truncated-mp4-no-moov": (lambda tmp: half(make_clip(tmp / "cam.mp4", frames=50, noise=True)), "moov atom"),
    "truncated-mp4-faststart": (
        lambda tmp: half(faststart(make_clip(tmp / "web.mp4", frames=50, noise=True))),
        "truncated: its index points to",
    ),
    "truncated-mkv": (
        lambda tmp: half(make_clip(tmp / "cut.mkv", frames=50, noise=True)),
        "truncated: its video stops",
    ),
    "truncated-webm": (
        lambda tmp: half(make_clip(tmp / "cut.webm", codec="libvpx-vp9", frames=50, noise=True)),
        "truncated: its video stops",
    ),
    "audio-only": (lambda tmp: audio_only(tmp / "speech.m4a"), r"no video stream \(it holds audio\)"),
    "audio-with-cover-art": (lambda tmp: audio_with_cover(tmp / "song.mp3"), "holds audio and a cover image"),
    "zero-video-frames": (lambda tmp: empty_video_track(tmp / "blank.mkv"), "no frames"),
    "unsupported-codec": (lambda tmp: evc_mp4(tmp / "evc.mp4"), "codec is not supported"),
}


def faststart(path: Path) -> Path:
    """Rewrite ``path`` with its index (moov) in front, as web-ready MP4s are."""
    moved = path.with_name(f"fs-{path.name}")
    with av.open(str(path)) as source, av.open(str(moved), "w", options={"movflags": "+faststart"}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    path.unlink()
    return moved


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_unusable_input_is_a_clear_error_and_leaves_no_files(tmp_path: Path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    source = make(inputs)
    before = sorted(inputs.iterdir())
    with pytest.raises(MediaError, match=message) as raised:
        transcode(source, out_dir)
    assert str(source) in str(raised.value)
    assert sorted(inputs.iterdir()) == before and list(out_dir.iterdir()) == []


# --- settings ------------------------------------------------------------------------------------


def test_media_settings(tmp_path: Path) -> None:
    settings = MediaSettings.load()
    assert (settings.fps, settings.video_codec, settings.pix_fmt) == (25, "libx264", "yuv420p")
    assert settings.audio_codec == "aac"
    assert "+faststart" in settings.movflags
    broken = tmp_path / "media.yaml"
    broken.write_text("fps: 25\n")
    with pytest.raises(ConfigError, match="malformed"):
        MediaSettings.load(broken)


def test_output_file_gets_the_umask_permissions_not_private_temp_ones(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = tmp_path / "out.mp4"
        with VideoWriter(path, 32, 32) as writer:
            writer.write(np.zeros((32, 32, 3), np.uint8))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
