"""Audio decoding, Whisper encoder features and per-frame windows, on a tiny random Whisper."""

from __future__ import annotations

import json
import shutil
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.files import DEMO_AUDIO, DEMO_VIDEO, REFERENCE_DIR
from whisper.audio import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES_PER_TOKEN,
    SAMPLE_RATE,
    TOKENS_PER_SECOND,
)
from whisper.audio import load_audio as ffmpeg_cli_load_audio
from whisper.model import AudioEncoder

from lipsync.audio import (
    AudioError,
    AudioFeatureExtractor,
    AudioSettings,
    frame_windows,
    load_audio,
    load_whisper_encoder,
    window_count,
)
from lipsync.config import CONFIG_DIR, ConfigError, load_config
from lipsync.errors import WeightsError
from lipsync.tiny import TINY_WHISPER_DIMS, write_tiny_whisper

TINY_CONFIG = CONFIG_DIR / "unet" / "tiny.yaml"

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg CLI (official decoder) not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def extractor(checkpoint: Path) -> AudioFeatureExtractor:
    return AudioFeatureExtractor.from_checkpoint(checkpoint, TINY_CONFIG)


@pytest.fixture(scope="module")
def demo_waveform() -> np.ndarray:
    return load_audio(DEMO_AUDIO)


@pytest.fixture(scope="module")
def demo_features(extractor: AudioFeatureExtractor, demo_waveform: np.ndarray) -> torch.Tensor:
    return extractor(demo_waveform)


def _positions(num_samples: int) -> int:
    """Expected T: one position per two mel frames, mel frames = samples // hop, per 30 s window."""
    mel_frames = num_samples // HOP_LENGTH
    return sum(min(N_FRAMES, mel_frames - start) // 2 for start in range(0, mel_frames, N_FRAMES))


def _write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.astype(np.int16).tobytes())
    return path


def _rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference).norm() / reference.norm()).item()


# --- tiny checkpoint and loader ---------------------------------------------------------------------


def test_tiny_checkpoint_is_openai_format(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved) == {"dims", "model_state_dict"}
    assert saved["dims"] == json.loads(TINY_WHISPER_DIMS.read_text())
    keys = saved["model_state_dict"].keys()
    assert "encoder.positional_embedding" in keys and "encoder.ln_post.weight" in keys
    assert any(key.startswith("decoder.") for key in keys)


def test_loader_keeps_only_a_frozen_encoder(checkpoint: Path) -> None:
    encoder = load_whisper_encoder(checkpoint)
    dims = json.loads(TINY_WHISPER_DIMS.read_text())
    assert isinstance(encoder, AudioEncoder)
    assert len(encoder.blocks) == dims["n_audio_layer"] and encoder.conv1.out_channels == dims["n_audio_state"]
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    saved = torch.load(checkpoint, weights_only=True)["model_state_dict"]
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, saved[f"encoder.{name}"]), name


def test_tiny_whisper_is_seeded(tmp_path: Path) -> None:
    first = torch.load(write_tiny_whisper(tmp_path / "a.pt", seed=3), weights_only=True)["model_state_dict"]
    again = torch.load(write_tiny_whisper(tmp_path / "b.pt", seed=3), weights_only=True)["model_state_dict"]
    other = torch.load(write_tiny_whisper(tmp_path / "c.pt", seed=4), weights_only=True)["model_state_dict"]
    name = "encoder.conv1.weight"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


# --- settings from the UNet config ------------------------------------------------------------------


@pytest.mark.parametrize("config", ["tiny.yaml", "stage2.yaml", "stage2_512.yaml"])
def test_settings_from_unet_configs(config: str) -> None:
    settings = AudioSettings.from_config(CONFIG_DIR / "unet" / config)
    assert settings == AudioSettings(sample_rate=16000, video_fps=25, audio_feat_length=(2, 2))
    assert settings.positions_per_frame == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("audio_sample_rate", 22050, "mel filters are for 16000 Hz"),
        ("video_fps", 30, "must divide Whisper's 50"),
        ("audio_feat_length", [2], "two non-negative integers"),
        ("video_fps", None, "lacks video_fps"),
    ],
)
def test_bad_settings(field: str, value: object, message: str) -> None:
    config = load_config(TINY_CONFIG)
    if value is None:
        del config["data"][field]
    else:
        config["data"][field] = value
    with pytest.raises(ConfigError, match=message):
        AudioSettings.from_config(config)


# --- decoding -----------------------------------------------------------------------------------------


def test_load_audio_wav(demo_waveform: np.ndarray) -> None:
    assert demo_waveform.dtype == np.float32 and demo_waveform.ndim == 1
    assert len(demo_waveform) == 153_600  # 9.6 s at 16 kHz
    assert np.all(np.abs(demo_waveform) <= 1.0)


@needs_ffmpeg
def test_load_audio_matches_ffmpeg_cli() -> None:
    """Official decodes with the ffmpeg CLI to s16le: PCM must match exactly, AAC (stereo 44.1 kHz) to 1 LSB."""
    assert np.array_equal(load_audio(DEMO_AUDIO), ffmpeg_cli_load_audio(str(DEMO_AUDIO)))
    ours, cli = load_audio(DEMO_VIDEO), ffmpeg_cli_load_audio(str(DEMO_VIDEO))
    assert ours.shape == cli.shape
    assert np.abs(ours - cli).max() <= 1 / 32768


def test_load_audio_resamples(demo_waveform: np.ndarray) -> None:
    assert abs(len(load_audio(DEMO_AUDIO, sample_rate=8000)) - len(demo_waveform) / 2) <= 32


@pytest.mark.parametrize(("codec", "suffix"), [("aac", ".m4a"), ("libmp3lame", ".mp3")])
def test_load_audio_compressed(codec: str, suffix: str, demo_waveform: np.ndarray, tmp_path: Path) -> None:
    """Stereo 44.1 kHz m4a/mp3 written with PyAV come back as mono 16 kHz of the same length and level."""
    path = tmp_path / f"demo{suffix}"
    pcm = (demo_waveform * 32767).astype(np.int16).repeat(2)[None]  # the same signal on both channels
    source = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
    source.sample_rate = SAMPLE_RATE
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=44100, layout="stereo")
        resampler = av.AudioResampler(format=stream.format.name, layout="stereo", rate=44100)
        for frame in resampler.resample(source) + resampler.resample(None):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    decoded = load_audio(path)
    assert decoded.dtype == np.float32 and abs(len(decoded) - len(demo_waveform)) < 0.01 * len(demo_waveform)
    assert np.std(decoded) == pytest.approx(np.std(demo_waveform), rel=0.1)


def test_missing_audio_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="audio file not found"):
        load_audio(tmp_path / "nothing.wav")


def test_text_file_as_audio(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="cannot decode audio"):
        load_audio(text)


def test_video_without_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(AudioError, match="no audio stream \\(video\\)"):
        load_audio(path)


def test_a_0_byte_audio_file_is_empty_like_a_0_byte_video(tmp_path: Path) -> None:
    (tmp_path / "speech.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="speech.wav is empty$"):
        load_audio(tmp_path / "speech.wav")


def test_zero_length_audio(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="contains no audio samples"):
        load_audio(_write_wav(tmp_path / "empty.wav", np.zeros(0)))


def test_too_short_for_one_position(extractor: AudioFeatureExtractor) -> None:
    with pytest.raises(AudioError, match=f"needs at least {N_SAMPLES_PER_TOKEN}"):
        extractor(np.zeros(N_SAMPLES_PER_TOKEN - 1, np.float32))
    assert extractor(np.zeros(N_SAMPLES_PER_TOKEN, np.float32)).shape[0] == 1


def test_waveform_must_be_mono(extractor: AudioFeatureExtractor) -> None:
    with pytest.raises(AudioError, match="mono"):
        extractor(np.zeros((2, SAMPLE_RATE), np.float32))


# --- checkpoint errors --------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="Whisper checkpoint not found"):
        load_whisper_encoder(tmp_path / "tiny.pt")


def test_checkpoint_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint"):
        load_whisper_encoder(path)


def test_checkpoint_not_a_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="holds a list, not an OpenAI Whisper checkpoint"):
        load_whisper_encoder(tmp_path / "tiny.pt")


def test_checkpoint_without_dims(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    torch.save({"model_state_dict": saved["model_state_dict"]}, tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="lacks 'dims'"):
        load_whisper_encoder(tmp_path / "tiny.pt")


def test_checkpoint_names_missing_and_unexpected_keys(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    state = saved["model_state_dict"]
    state["encoder.blocks.9.attn.query.weight"] = state.pop("encoder.blocks.1.attn.query.weight")
    torch.save(saved, tmp_path / "tiny.pt")
    with pytest.raises(WeightsError) as error:
        load_whisper_encoder(tmp_path / "tiny.pt")
    assert "encoder.blocks.1.attn.query.weight" in str(error.value)
    assert "encoder.blocks.9.attn.query.weight" in str(error.value)


def test_checkpoint_with_wrong_context(checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    saved["dims"]["n_audio_ctx"] = 750
    torch.save(saved, tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="n_audio_ctx is 750, but 30 s windows need 1500"):
        load_whisper_encoder(tmp_path / "tiny.pt")


# --- features -------------------------------------------------------------------------------------------


def test_demo_feature_shape(demo_features: torch.Tensor, demo_waveform: np.ndarray) -> None:
    dims = json.loads(TINY_WHISPER_DIMS.read_text())
    assert demo_features.shape == (480, dims["n_audio_layer"] + 1, dims["n_audio_state"])
    assert demo_features.shape[0] == _positions(len(demo_waveform))
    assert demo_features.shape[0] == len(demo_waveform) * TOKENS_PER_SECOND // SAMPLE_RATE  # 50 per second
    assert demo_features.dtype == torch.float32 and torch.isfinite(demo_features).all()


def test_file_and_waveform_agree(extractor: AudioFeatureExtractor, demo_features: torch.Tensor) -> None:
    assert torch.equal(extractor.load(DEMO_AUDIO), demo_features)


def test_deterministic(checkpoint: Path, demo_waveform: np.ndarray, demo_features: torch.Tensor) -> None:
    fresh = AudioFeatureExtractor.from_checkpoint(checkpoint, TINY_CONFIG)
    assert torch.equal(fresh(demo_waveform), demo_features)


def test_long_audio_is_continuous(extractor: AudioFeatureExtractor, demo_waveform: np.ndarray) -> None:
    """A 38.4 s clip spans two windows; T is the sum of each window's positions, with no gap or overlap."""
    long = np.tile(demo_waveform, 4)
    features = extractor(long)
    assert features.shape[0] == _positions(len(long)) == 1500 + 420
    assert torch.isfinite(features).all() and features[1500:].abs().sum(dim=(1, 2)).gt(0).all()
    assert extractor.frame_windows(features).shape[0] == 1920 // 2 + 2


def test_half_precision(checkpoint: Path, demo_waveform: np.ndarray, demo_features: torch.Tensor) -> None:
    """fp16 compute (official's choice on CUDA) keeps fp32 weights and stays close to fp32 features."""
    half = AudioFeatureExtractor.from_checkpoint(checkpoint, TINY_CONFIG, dtype=torch.float16)
    features = half(demo_waveform)
    assert features.dtype == torch.float16 and half.encoder.conv1.weight.dtype == torch.float32
    assert _rel_error(features, demo_features) < 1e-2


# --- per-frame windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 5])
def test_window_count_matches_official_loop(step: int) -> None:
    """N = 1 + min{i : floor(i * 50 / fps) > T}: official appends frame i, then stops once its centre passes T."""
    fps = TOKENS_PER_SECOND // step
    for total in range(1, 130):
        i = 0
        while int(Fraction(i * TOKENS_PER_SECOND, fps)) <= total:
            i += 1
        assert window_count(total, step) == i + 1, (total, step)


def test_demo_windows(extractor: AudioFeatureExtractor, demo_features: torch.Tensor) -> None:
    windows = extractor.frame_windows(demo_features)
    assert windows.shape == (480 // 2 + 2, 10 * 5, 64)
    assert torch.equal(windows[7].reshape(10, 5, 64), demo_features[14 - 4 : 14 + 6])


def _row_indices(windows: torch.Tensor, layers: int) -> torch.Tensor:
    """Feature rows used by each window, read back from features whose values are their row numbers."""
    return windows[:, ::layers, 0].long()


def test_windows_clamp_at_both_ends(extractor: AudioFeatureExtractor) -> None:
    total, layers = 480, 5
    rows = torch.arange(total, dtype=torch.float32)[:, None, None].expand(total, layers, 3)
    windows = extractor.frame_windows(rows)
    indices = _row_indices(windows, layers)
    assert indices[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert indices[1].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert indices[-1].tolist() == [478] + [479] * 9
    assert indices[-2].tolist() == [476, 477, 478] + [479] * 7
    # time-major: the layers of one row are contiguous
    assert torch.equal(windows[5, :layers, 0], torch.full((layers,), 6.0))


def test_windows_num_frames(extractor: AudioFeatureExtractor, demo_features: torch.Tensor) -> None:
    all_windows = extractor.frame_windows(demo_features)
    assert torch.equal(extractor.frame_windows(demo_features, num_frames=16), all_windows[:16])
    assert extractor.frame_windows(demo_features, num_frames=300)[-1].eq(demo_features[-1].repeat(10, 1)).all()


def test_windows_follow_audio_feat_length(demo_features: torch.Tensor) -> None:
    settings = AudioSettings(sample_rate=SAMPLE_RATE, video_fps=25, audio_feat_length=(1, 3))
    windows = frame_windows(demo_features, settings)
    assert windows.shape == (242, (1 + 3 + 1) * 2 * 5, 64)
    assert torch.equal(windows[10].reshape(10, 5, 64), demo_features[20 - 2 : 20 + 8])


def test_windows_need_features() -> None:
    settings = AudioSettings(sample_rate=SAMPLE_RATE, video_fps=25, audio_feat_length=(2, 2))
    with pytest.raises(AudioError, match="no audio features"):
        frame_windows(torch.zeros(0, 5, 64), settings)


# --- parity with the official implementation (tests/fixtures/reference/) --------------------------------


def test_parity_demo(extractor: AudioFeatureExtractor, demo_features: torch.Tensor) -> None:
    reference = load_file(str(REFERENCE_DIR / "audio_demo.safetensors"))
    assert demo_features.shape == reference["features"].shape
    assert _rel_error(demo_features, reference["features"]) <= 1e-4
    windows = extractor.frame_windows(demo_features)
    assert len(windows) == reference["num_chunks"].item()
    picked = reference["chunk_indices"]
    assert _rel_error(windows[picked], reference["chunks"]) <= 1e-4
    rows = torch.arange(len(demo_features), dtype=torch.float32)[:, None, None].expand(-1, 5, 1)
    assert torch.equal(_row_indices(extractor.frame_windows(rows)[picked], 5), reference["chunk_feature_rows"])


def test_parity_long(extractor: AudioFeatureExtractor, demo_waveform: np.ndarray) -> None:
    reference = load_file(str(REFERENCE_DIR / "audio_long.safetensors"))
    features = extractor(np.tile(demo_waveform, 7))
    assert features.shape[0] == reference["T"].item()
    last_start = reference["rows_last_20_start"].item()
    for name, start in [("rows_1480_1520", 1480), ("rows_2980_3020", 2980), ("rows_last_20", last_start)]:
        expected = reference[name]
        assert _rel_error(features[start : start + len(expected)], expected) <= 1e-4, name
    windows = extractor.frame_windows(features)
    assert len(windows) == reference["num_chunks"].item()
    assert _rel_error(windows[-1], reference["last_chunk"]) <= 1e-4


def test_windows_of_a_frame_range_equal_that_slice_of_all_windows() -> None:
    settings = AudioSettings.from_config(TINY_CONFIG)
    features = torch.randn(101, 5, 8, generator=torch.Generator().manual_seed(9))
    every = frame_windows(features, settings)
    torch.testing.assert_close(frame_windows(features, settings, 7, first_frame=20), every[20:27], rtol=0, atol=0)
    torch.testing.assert_close(frame_windows(features, settings, first_frame=40), every[40:], rtol=0, atol=0)
