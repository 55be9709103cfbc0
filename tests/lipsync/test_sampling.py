"""DDIM + classifier-free guidance: parity with the official loop, and faces end to end on tiny weights."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.files import DEMO_AUDIO, DEMO_VIDEO, REFERENCE_DIR, TINY_UNET_CONFIG

from lipsync import load_unet
from lipsync.audio import AudioFeatureExtractor
from lipsync.config import load_config
from lipsync.generation import FaceGenerator, Replica
from lipsync.sampling import (
    DirectDenoiser,
    SamplingSettings,
    denoise,
    initial_noise,
    load_scheduler,
)
from lipsync.vae import load_vae


@pytest.fixture(scope="module")
def tiny_unet(tiny_weights):
    return load_unet(tiny_weights.unet_config, tiny_weights.unet)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return {key: value.float() if value.is_floating_point() else value for key, value in load_file(REFERENCE_DIR / "ddim_cfg.safetensors").items()}


def _official_inputs(
    reference: dict[str, torch.Tensor], windows: int = 1, frames: int | None = None
) -> dict[str, torch.Tensor]:
    """The reference's DDIM inputs repeated for ``windows`` windows; ``frames`` keeps only a window's first frames
    (for tests that compare our own runs with each other, not with the reference's outputs)."""
    frames = frames or reference["mask_latents"].shape[2]
    return {
        "latents": reference["init_noise"].repeat(windows, 1, frames, 1, 1),
        "mask": reference["mask_latents"][:, :, :frames].repeat(windows, 1, 1, 1, 1),
        "masked_latents": reference["masked_image_latents"][:, :, :frames].repeat(windows, 1, 1, 1, 1),
        "reference_latents": reference["ref_latents"][:, :, :frames].repeat(windows, 1, 1, 1, 1),
        "audio": reference["audio_embeds"][:frames].repeat(windows, 1, 1),
    }


SHORT = 4
"""Frames of a short window (a quarter of the UNet's work per step): the shortened official windows of
:func:`_official_inputs`, and the windows of the face tests, whose grouping does not depend on window length."""


def test_scheduler_timesteps_match_official(reference) -> None:
    scheduler = load_scheduler()
    scheduler.set_timesteps(20)
    assert torch.equal(scheduler.timesteps, reference["timesteps"])


def test_ddim_cfg_loop_matches_official(tiny_unet, reference) -> None:
    latents = denoise(tiny_unet, load_scheduler(), **_official_inputs(reference), steps=20, guidance_scale=1.5)
    relative_error = (latents - reference["final_latents"]).norm() / reference["final_latents"].norm()
    assert relative_error <= 1e-4


def test_several_windows_per_call_equal_one_window(tiny_unet, reference) -> None:
    latents = denoise(tiny_unet, load_scheduler(), **_official_inputs(reference, windows=2), steps=20, guidance_scale=1.5)
    for window in latents:
        assert (window - reference["final_latents"][0]).norm() / reference["final_latents"].norm() <= 1e-4


def test_guidance_one_runs_the_conditional_branch_only(tiny_unet, reference) -> None:
    inputs = _official_inputs(reference, frames=SHORT)
    plain = denoise(tiny_unet, load_scheduler(), **inputs, steps=2, guidance_scale=1.0)
    guided = denoise(tiny_unet, load_scheduler(), **inputs, steps=2, guidance_scale=1.5)
    assert plain.shape == guided.shape
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize("overrides", [{"steps": 0}, {"guidance_scale": -1.0}, {"windows_per_call": 0}])
def test_bad_sampling_settings_are_rejected(overrides) -> None:
    with pytest.raises(ValueError):
        SamplingSettings.from_config(load_config(TINY_UNET_CONFIG), **overrides)


def _demo_faces(count: int, size: int) -> torch.Tensor:
    """Square centre crops of the demo clip's first frames, in [-1, 1] (stand-ins for aligned faces)."""
    with av.open(str(DEMO_VIDEO)) as container:
        frames = []
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="rgb24")
            top = (image.shape[0] - image.shape[1]) // 2
            square = av.VideoFrame.from_ndarray(image[top : top + image.shape[1]], format="rgb24")
            frames.append(square.reformat(width=size, height=size).to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_faces_end_to_end_with_real_audio(tiny_weights) -> None:
    config = load_config(TINY_UNET_CONFIG)
    size, frames = config["data"]["resolution"], SHORT + 2  # one full (short) window and a 2-frame tail
    audio_extractor = AudioFeatureExtractor.from_checkpoint(tiny_weights.whisper, config)
    audio = audio_extractor.frame_windows(audio_extractor.load(DEMO_AUDIO))[:frames]
    faces = _demo_faces(frames, size)
    mask = torch.ones(size, size)
    mask[size // 2 :, size // 8 : -size // 8] = 0
    settings = SamplingSettings.from_config(config, steps=3, windows_per_call=2, num_frames=SHORT)
    generate = FaceGenerator(
        [Replica(load_vae(tiny_weights.vae_dir), DirectDenoiser(load_unet(tiny_weights.unet_config, tiny_weights.unet), load_scheduler()))],
        settings,
    )
    progress = []

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate(faces, audio, mask, initial_noise(generator, size // 8), generator, on_window=lambda done, total: progress.append((done, total)))

    first, again, other = run(1247), run(1247), run(7)
    assert first.shape == (frames, 3, size, size)
    assert torch.isfinite(first).all() and first.abs().max() <= 1
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    keep = mask.bool()
    assert torch.equal(first[:, :, keep], faces[:, :, keep])
    assert not torch.allclose(first[:, :, ~keep], faces[:, :, ~keep])
    assert progress[:2] == [(1, 2), (2, 2)]


def _random_call(config: dict, batch: int = 2, frames: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    latent = config["data"]["resolution"] // 8
    sample = torch.randn(batch, config["model"]["in_channels"], frames, latent, latent, generator=generator)
    audio = torch.randn(batch * frames, 50, config["model"]["cross_attention_dim"], generator=generator)
    return sample, torch.tensor(500), audio


def test_shallow_pass_over_its_own_deep_features_is_the_full_pass(tiny_unet) -> None:
    sample, timestep, audio = _random_call(load_config(TINY_UNET_CONFIG))
    full = tiny_unet(sample, timestep, audio)
    cached, deep = tiny_unet.forward_caching(sample, timestep, audio)
    assert torch.equal(cached, full)
    assert torch.allclose(tiny_unet.forward_shallow(sample, timestep, audio, deep), full, atol=1e-6)


def test_feature_caching_approximates_exact_sampling(tiny_unet, reference) -> None:
    inputs = _official_inputs(reference, frames=SHORT)
    exact = denoise(tiny_unet, load_scheduler(), **inputs, steps=10, guidance_scale=1.5)
    again = denoise(tiny_unet, load_scheduler(), **inputs, steps=10, guidance_scale=1.5, cache_interval=1)
    cached = denoise(tiny_unet, load_scheduler(), **inputs, steps=10, guidance_scale=1.5, cache_interval=3)
    assert torch.equal(exact, again)
    assert not torch.equal(cached, exact)
    assert (cached - exact).norm() / exact.norm() < 0.5


def test_feature_caching_keeps_each_windows_cache_when_another_window_leaves(tiny_unet, reference) -> None:
    """A cancelled window leaves mid-loop; the remaining one goes on with its own cached rows."""
    solo = denoise(tiny_unet, load_scheduler(), **_official_inputs(reference, frames=SHORT), steps=8, guidance_scale=1.5, cache_interval=3)
    asked = []

    def active() -> list[bool]:
        asked.append(None)
        return [True, len(asked) <= 2]  # window 1 leaves before step 3 (a cached step)

    pair = _official_inputs(reference, windows=2, frames=SHORT)
    pair["latents"][1] += 1.0  # the second window differs, so mixing the rows up would show
    both = denoise(tiny_unet, load_scheduler(), **pair, steps=8, guidance_scale=1.5, cache_interval=3, active=active)
    assert (both[0] - solo[0]).norm() / solo[0].norm() < 1e-5


def test_sampling_modes_come_from_config() -> None:
    config = load_config(TINY_UNET_CONFIG)
    assert SamplingSettings.from_config(config).cache_interval == 1
    assert SamplingSettings.from_config(config, "fast").cache_interval == 3
    assert SamplingSettings.from_config(config, "fast", cache_interval=2).cache_interval == 2
    with pytest.raises(ValueError, match="mode must be one of"):
        SamplingSettings.from_config(config, "turbo")
    with pytest.raises(ValueError, match="cache_interval"):
        SamplingSettings.from_config(config, "fast", cache_interval=0)


def test_generated_faces_do_not_depend_on_windows_per_call(tiny_weights) -> None:
    """VAE sampling noise is drawn window by window (official order), whatever the call grouping."""
    config = load_config(TINY_UNET_CONFIG)
    size, frames = config["data"]["resolution"], 2 * SHORT + 1  # two full (short) windows and a 1-frame tail
    audio_extractor = AudioFeatureExtractor.from_checkpoint(tiny_weights.whisper, config)
    audio = audio_extractor.frame_windows(audio_extractor.load(DEMO_AUDIO))[:frames]
    faces = _demo_faces(frames, size)
    mask = torch.ones(size, size)
    mask[size // 2 :] = 0
    vae = load_vae(tiny_weights.vae_dir)
    unet = load_unet(tiny_weights.unet_config, tiny_weights.unet)
    results = []
    for windows in (1, 3):
        settings = SamplingSettings.from_config(config, steps=2, windows_per_call=windows, num_frames=SHORT)
        generator = torch.Generator().manual_seed(5)
        generate = FaceGenerator([Replica(vae, DirectDenoiser(unet, load_scheduler()))], settings)
        results.append(generate(faces, audio, mask, initial_noise(generator, size // 8), generator))
    assert (results[0] - results[1]).abs().max() < 1e-3  # batched fp32 convolutions round differently


def test_cuda_graphs_need_a_cuda_unet(tiny_unet) -> None:
    from lipsync.models.graphed import GraphedUNet

    with pytest.raises(ValueError, match="CUDA"):
        GraphedUNet(tiny_unet)


def test_the_contracts_most_steps_stay_within_the_schedulers_timesteps() -> None:
    """The largest step count the contract allows denoises; one more is refused before it reaches the scheduler."""
    from lipsync.contract import BY_NAME

    most = BY_NAME["inference_steps"].maximum
    scheduler = load_scheduler()
    scheduler.set_timesteps(most)
    assert int(scheduler.timesteps.max()) < scheduler.config.num_train_timesteps
    with pytest.raises(ValueError):
        BY_NAME["inference_steps"].check(most + 1)
