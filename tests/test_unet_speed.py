"""Speed-path pieces of the UNet: the frame-pooled GroupNorm and opt-in compilation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_UNET_CONFIG
from lipsync.models import build_unet
from lipsync.models.compiled import compile_unet
from lipsync.models.resnet import FramePooledGroupNorm


def _pooled_and_reference(dtype: torch.dtype, fuse_silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Our norm on ``(B·F, C, H, W)`` vs ``nn.GroupNorm`` on the official 5-D layout, in fp64."""
    windows, frames, channels, height, width = 3, 5, 64, 6, 7
    generator = torch.Generator().manual_seed(0)
    norm = FramePooledGroupNorm(8, channels, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=generator))
        norm.bias.copy_(torch.randn(channels, generator=generator))
    # An offset per channel makes the mean matter (pooling errors would show).
    folded = torch.randn(windows * frames, channels, height, width, generator=generator) * 2 + torch.randn(channels, 1, 1, generator=generator) * 3
    official = nn.GroupNorm(8, channels, eps=1e-5).double()
    official.load_state_dict(norm.state_dict())
    five_d = folded.double().view(windows, frames, channels, height, width).transpose(1, 2)
    reference = official(five_d).transpose(1, 2).reshape(folded.shape)
    if fuse_silu:
        reference = F.silu(reference)
    with torch.no_grad():
        ours = norm.to(dtype)(folded.to(dtype), frames, fuse_silu=fuse_silu)
    return ours, reference


@pytest.mark.parametrize("fuse_silu", [False, True])
def test_pooled_group_norm_equals_group_norm_on_the_five_dimensional_layout(fuse_silu: bool) -> None:
    ours, reference = _pooled_and_reference(torch.float32, fuse_silu)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert ((ours.double() - reference).norm() / reference.norm()).item() < 1e-6


def test_pooled_group_norm_keeps_bf16_within_its_rounding() -> None:
    ours, reference = _pooled_and_reference(torch.bfloat16, fuse_silu=True)
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - reference).norm() / reference.norm()).item() < 1e-2


def test_compile_off_returns_the_module_untouched() -> None:
    unet = build_unet(TINY_UNET_CONFIG)
    keys = list(unet.state_dict())
    assert compile_unet(unet, "off") is unet
    assert list(unet.state_dict()) == keys


def test_compile_is_in_place_and_keeps_the_state_dict_keys() -> None:
    unet = build_unet(TINY_UNET_CONFIG)
    keys = list(unet.state_dict())
    assert compile_unet(unet, "default") is unet
    assert list(unet.state_dict()) == keys


def test_unknown_compile_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="max-autotune"):
        compile_unet(build_unet(TINY_UNET_CONFIG), "max-autotune")  # type: ignore[arg-type]
