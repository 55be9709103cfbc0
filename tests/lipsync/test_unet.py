"""The UNet: official key set, parity with the official implementation, window batching."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file
from support.files import OFFICIAL_UNET_KEYS, REFERENCE_DIR, TINY_UNET_CONFIG

from lipsync import load_unet
from lipsync.config import CONFIG_DIR
from lipsync.models import build_unet
from lipsync.models.motion import TemporalSelfAttention


def _key_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


@pytest.mark.parametrize("config", ["stage2.yaml", "stage2_512.yaml"])
def test_full_size_model_has_exactly_the_official_keys_and_shapes(config: str) -> None:
    expected = {}
    for line in OFFICIAL_UNET_KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = tuple(int(dim) for dim in shape.strip("()").split(",") if dim.strip())
    ours = _key_shapes(build_unet(CONFIG_DIR / "unet" / config, device="meta"))
    assert sorted(ours.keys() - expected.keys()) == []
    assert sorted(expected.keys() - ours.keys()) == []
    assert {key: shape for key, shape in ours.items() if shape != expected[key]} == {}
    assert len(ours) == 1246


def test_tiny_model_has_the_official_tiny_key_set() -> None:
    metadata = json.loads((REFERENCE_DIR / "metadata.json").read_text())["unet"]
    listing = "\n".join(f"{key} {list(shape)}" for key, shape in sorted(_key_shapes(build_unet(TINY_UNET_CONFIG, "meta")).items()))
    assert hashlib.sha256(listing.encode()).hexdigest() == metadata["sorted_keys_shapes_sha256"]


@pytest.fixture(scope="module")
def tiny_unet(tiny_weights):
    return load_unet(tiny_weights.unet_config, tiny_weights.unet)


@pytest.mark.parametrize("case", ["unet_f16", "unet_f5"])
def test_forward_matches_official_implementation(tiny_unet, case: str) -> None:
    reference = load_file(REFERENCE_DIR / f"{case}.safetensors")
    with torch.no_grad():
        noise = tiny_unet(reference["sample"].float(), reference["timestep"], reference["encoder_hidden_states"].float())
    assert noise.shape == reference["out"].shape
    relative_error = (noise - reference["out"]).norm() / reference["out"].norm()
    assert relative_error <= 1e-4


def test_windows_in_one_batch_equal_windows_alone(tiny_unet) -> None:
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(3, 13, 6, 8, 8, generator=generator)
    audio = torch.randn(3 * 6, 50, 64, generator=generator)
    with torch.no_grad():
        together = tiny_unet(sample, 501, audio)
        alone = [tiny_unet(sample[index : index + 1], 501, audio[index * 6 : (index + 1) * 6]) for index in range(3)]
    alone = torch.cat(alone)
    assert (together - alone).norm() / alone.norm() <= 1e-5


def test_motion_attention_over_the_kernel_batch_limit_runs_in_slices_with_the_same_result(
    tiny_unet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention kernels take at most ``max_sequences`` spatial positions per call; more are sliced, unchanged."""
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 13, 4, 8, 8, generator=generator)  # 2 · 8 · 8 = 128 sequences at the shallowest level
    audio = torch.randn(2 * 4, 50, 64, generator=generator)
    sizes: list[int] = []  # the batch of every attention call
    attend = Attention.forward

    def recorded(self: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sizes.append(hidden_states.shape[0])
        return attend(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(Attention, "forward", recorded)
    with torch.no_grad():
        whole = tiny_unet(sample, 501, audio)
        largest = max(sizes)
        monkeypatch.setattr(TemporalSelfAttention, "max_sequences", 48)
        sizes.clear()
        sliced = tiny_unet(sample, 501, audio)
    assert largest == 128 and max(sizes) == 48
    assert torch.equal(sliced, whole)


def test_frames_of_a_window_interact(tiny_unet) -> None:
    """ResNet statistics and motion modules span the window: one frame's input moves another's output."""
    sample = torch.randn(1, 13, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    audio = torch.randn(4, 50, 64, generator=torch.Generator().manual_seed(5))
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(tiny_unet(sample, 1, audio)[:, :, 3], tiny_unet(changed, 1, audio)[:, :, 3])


def test_four_dimensional_audio_is_accepted(tiny_unet) -> None:
    sample = torch.randn(2, 13, 3, 8, 8)
    audio = torch.randn(2, 3, 50, 64)
    with torch.no_grad():
        torch.testing.assert_close(tiny_unet(sample, 1, audio), tiny_unet(sample, 1, audio.flatten(0, 1)))


def test_wrong_audio_rows_are_rejected(tiny_unet) -> None:
    with pytest.raises(ValueError, match="expected batch × frames = 6"):
        tiny_unet(torch.randn(2, 13, 3, 8, 8), 1, torch.randn(5, 50, 64))


def test_windows_longer_than_the_positional_table_are_rejected(tiny_unet) -> None:
    with pytest.raises(ValueError, match="at most 24"):
        tiny_unet(torch.randn(1, 13, 25, 8, 8), 1, torch.randn(25, 50, 64))
