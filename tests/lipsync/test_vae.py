"""VAE loading and latent encode/decode, on a tiny random VAE written in the official folder format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lipsync.errors import WeightsError
from lipsync.tiny import TINY_VAE_CONFIG, write_tiny_vae
from lipsync.vae import decode_latents, encode_latents, load_vae
from lipsync.weights import load_weights_config

RES = 64


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "sd-vae-ft-mse", seed=0)


@pytest.fixture(scope="module")
def vae(vae_dir: Path):
    return load_vae(vae_dir)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(5, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _copy(vae_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(vae_dir, tmp_path / "vae"))


def test_folder_has_official_files(vae_dir: Path) -> None:
    names = {file.filename for file in load_weights_config().vae.files}
    assert names == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert all((vae_dir / name).is_file() for name in names)


def test_tiny_vae_follows_its_config(vae) -> None:
    tiny = json.loads(TINY_VAE_CONFIG.read_text())
    assert list(vae.config.block_out_channels) == tiny["block_out_channels"] == [16, 16, 32, 32]
    assert vae.config.latent_channels == 4 and len(vae.config.down_block_types) == 4


def test_scaling_comes_from_weights_config(vae) -> None:
    spec = load_weights_config().vae
    assert vae.config.scaling_factor == spec.scaling_factor == 0.18215
    assert vae.config.shift_factor == spec.shift_factor == 0.0
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_load_dtype(vae_dir: Path) -> None:
    assert load_vae(vae_dir, dtype=torch.float16).dtype == torch.float16


def test_encode_decode_shapes(vae, images: torch.Tensor) -> None:
    latents = encode_latents(vae, images, torch.Generator().manual_seed(0))
    assert latents.shape == (5, 4, RES // 8, RES // 8)
    decoded = decode_latents(vae, latents)
    assert decoded.shape == images.shape
    assert torch.isfinite(decoded).all()


def test_encode_matches_scaled_latent_dist_sample(vae, images: torch.Tensor) -> None:
    """Unchunked encode is exactly the official ``latent_dist.sample() * 0.18215``, seeded."""
    latents = encode_latents(vae, images, torch.Generator().manual_seed(3))
    expected = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(3)) * 0.18215
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_encode_is_deterministic_per_seed(vae, images: torch.Tensor) -> None:
    first = encode_latents(vae, images, torch.Generator().manual_seed(7))
    again = encode_latents(vae, images, torch.Generator().manual_seed(7))
    other = encode_latents(vae, images, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_chunked_equals_unchunked(vae, images: torch.Tensor) -> None:
    whole = encode_latents(vae, images, torch.Generator().manual_seed(0))
    chunked = encode_latents(vae, images, torch.Generator().manual_seed(0), chunk_size=2)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    decoded = decode_latents(vae, whole)
    torch.testing.assert_close(decode_latents(vae, whole, chunk_size=2), decoded, rtol=1e-4, atol=1e-4)


def test_decode_unscales(vae) -> None:
    latents = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    expected = vae.decode(latents / 0.18215).sample
    torch.testing.assert_close(decode_latents(vae, latents), expected, rtol=0, atol=0)


def test_bad_chunk_size(vae, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        encode_latents(vae, images, chunk_size=0)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="VAE folder not found"):
        load_vae(tmp_path / "nope")


def test_folder_without_weights(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="lacks diffusion_pytorch_model.safetensors"):
        load_vae(folder)


def test_corrupt_config(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(WeightsError, match="not a JSON object"):
        load_vae(folder)


def test_config_of_another_model(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(WeightsError, match="describes 'UNet2DModel'"):
        load_vae(folder)


def test_config_not_matching_weights(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 32, 64, 128]}))
    with pytest.raises(WeightsError, match=r"(?s)cannot load the VAE .*expected shape"):
        load_vae(folder)


def test_corrupt_weights(vae_dir: Path, tmp_path: Path) -> None:
    folder = _copy(vae_dir, tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(WeightsError, match="cannot load the VAE"):
        load_vae(folder)
