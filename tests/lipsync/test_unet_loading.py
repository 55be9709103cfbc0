"""Strict loading of official-format UNet checkpoints, and the errors bad files get."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from support.files import TINY_UNET_CONFIG

from lipsync import load_unet
from lipsync.config import ConfigError
from lipsync.errors import WeightsError


@pytest.fixture(scope="module")
def state_dict(tiny_weights) -> dict[str, torch.Tensor]:
    return torch.load(tiny_weights.unet, weights_only=True)["state_dict"]


def _save(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "latentsync_unet.pt"
    torch.save(payload, path)
    return path


def test_loads_in_the_requested_dtype_ready_for_inference(tiny_weights) -> None:
    unet = load_unet(tiny_weights.unet_config, tiny_weights.unet, dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16
    assert not unet.training
    assert not any(param.requires_grad for param in unet.parameters())
    assert not any(tensor.is_meta for tensor in unet.state_dict().values())


def test_bare_model_section_config_is_accepted(tiny_weights, tmp_path: Path) -> None:
    bare = tmp_path / "model.yaml"
    bare.write_text(yaml.safe_dump(yaml.safe_load(TINY_UNET_CONFIG.read_text())["model"]))
    whole = load_unet(TINY_UNET_CONFIG, tiny_weights.unet)
    section = load_unet(bare, tiny_weights.unet)
    for (key, expected), actual in zip(whole.state_dict().items(), section.state_dict().values()):
        assert torch.equal(expected, actual), key


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_unet(TINY_UNET_CONFIG, tmp_path / "absent.pt")


def test_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "latentsync_unet.pt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load_unet(TINY_UNET_CONFIG, path)


def test_bare_state_dict_is_named(tmp_path: Path, state_dict) -> None:
    with pytest.raises(WeightsError, match="bare state dict without a 'state_dict' entry"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, dict(state_dict)))


def test_missing_keys_are_named(tmp_path: Path, state_dict) -> None:
    partial = {key: value for key, value in state_dict.items() if ".attn2." not in key}
    with pytest.raises(WeightsError, match=r"missing: .*attn2\.to_k\.weight"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, {"state_dict": partial, "global_step": 1}))


def test_unexpected_keys_are_named(tmp_path: Path, state_dict) -> None:
    extra = dict(state_dict, **{"mid_block.motion_modules.0.extra.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"1 unexpected: mid_block\.motion_modules\.0\.extra\.weight"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, {"state_dict": extra}))


def test_wrong_shapes_are_named(tmp_path: Path, state_dict) -> None:
    wrong = dict(state_dict, **{"conv_in.weight": torch.zeros(32, 9, 3, 3)})
    with pytest.raises(WeightsError, match=r"conv_in\.weight: checkpoint \(32, 9, 3, 3\), model \(32, 13, 3, 3\)"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, {"state_dict": wrong}))


def test_full_size_checkpoint_against_tiny_config_fails_fast(tmp_path: Path, state_dict) -> None:
    scaled = {key: torch.zeros(*(2 * dim for dim in value.shape)) if key == "conv_out.weight" else value for key, value in state_dict.items()}
    with pytest.raises(WeightsError, match="1 with the wrong shape"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, {"state_dict": scaled}))


def test_latentsync_10_checkpoint_is_recognised(tmp_path: Path, state_dict) -> None:
    renamed = {
        key.replace(".attn2.", ".audio_cross_attn.attn.").replace(".norm2.", ".audio_cross_attn.norm."): value
        for key, value in state_dict.items()
        if "motion_modules" not in key
    }
    with pytest.raises(WeightsError, match="LatentSync 1.0 checkpoint"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, {"state_dict": renamed, "global_step": 1}))


def test_non_dict_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="holds a list"):
        load_unet(TINY_UNET_CONFIG, _save(tmp_path, [torch.zeros(1)]))


def test_missing_or_broken_config(tiny_weights, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_unet(tmp_path / "absent.yaml", tiny_weights.unet)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: {num_frames: 16}\n")
    with pytest.raises(ConfigError, match="neither a 'model' section"):
        load_unet(broken, tiny_weights.unet)
