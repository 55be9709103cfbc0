"""Down, mid and up blocks of the LatentSync UNet.

One layer of a block is ResNet → spatial transformer (audio cross-attention) → motion module, the
later two optional. Spatial transformers and downsamplers are diffusers modules used as they are,
the upsampler a thin subclass (:class:`Upsample`): with frames folded into the batch they compute
exactly what the official inflated modules do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from lipsync.models.motion import MotionModule
from lipsync.models.resnet import ResnetBlock3D


@dataclass(frozen=True)
class BlockSettings:
    """What every block of one UNet shares."""

    temb_channels: int
    groups: int
    eps: float
    attention_heads: int
    cross_attention_dim: int
    motion_settings: dict[str, Any]


class Upsample(Upsample2D):
    """diffusers' ``Upsample2D`` with a convolution (nearest ×2, or to the skip's size, then a 3×3 conv),
    the same for every batch size.

    diffusers copies a batch of 64 frames or more to a contiguous layout before interpolating, and a
    compiled UNet guards on that branch, so calls below and above 64 frames would each need a
    compilation of their own. Here the copy is unconditional; on the contiguous activations of eager
    mode it is a no-op, so the output is the same. Parameters and keys are ``Upsample2D``'s.
    """

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states)


def spatial_transformer(channels: int, settings: BlockSettings) -> Transformer2DModel:
    """Per-frame transformer: GroupNorm, 1×1 conv in, self-attn, audio cross-attn, GEGLU, 1×1 conv out."""
    return Transformer2DModel(
        num_attention_heads=settings.attention_heads,
        attention_head_dim=channels // settings.attention_heads,
        in_channels=channels,
        norm_num_groups=settings.groups,
        cross_attention_dim=settings.cross_attention_dim,
        use_linear_projection=False,
    )


class _Layers(nn.Module):
    """Resnets with optional spatial transformers and motion modules, run layer by layer."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        settings: BlockSettings,
        with_attention: bool,
        with_motion: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, out_channels, settings.temb_channels, settings.groups, settings.eps)
            for channels in in_channels
        )
        if with_attention:
            self.attentions = nn.ModuleList(spatial_transformer(out_channels, settings) for _ in in_channels)
        if with_motion:
            self.motion_modules = nn.ModuleList(
                MotionModule(out_channels, settings.motion_settings, settings.groups) for _ in in_channels
            )

    def layer(
        self, index: int, hidden_states: torch.Tensor, frame_temb: torch.Tensor, audio: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        hidden_states = self.resnets[index](hidden_states, frame_temb, num_frames)
        if hasattr(self, "attentions"):
            hidden_states = self.attentions[index](hidden_states, encoder_hidden_states=audio, return_dict=False)[0]
        if hasattr(self, "motion_modules"):
            hidden_states = self.motion_modules[index](hidden_states, num_frames)
        return hidden_states


class DownBlock3D(_Layers):
    """``DownBlock3D`` / ``CrossAttnDownBlock3D``: returns its output and every skip tensor."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_downsample: bool,
        settings: BlockSettings,
        with_attention: bool,
        with_motion: bool,
    ) -> None:
        super().__init__(
            [in_channels] + [out_channels] * (num_layers - 1), out_channels, settings, with_attention, with_motion
        )
        if add_downsample:
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=1, name="op")]
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        frame_temb: torch.Tensor,
        audio: torch.Tensor,
        num_frames: int,
        downsample: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``downsample=False`` skips the downsampler (a shallow pass that never uses its output)."""
        skips = []
        for index in range(len(self.resnets)):
            hidden_states = self.layer(index, hidden_states, frame_temb, audio, num_frames)
            skips.append(hidden_states)
        if downsample and hasattr(self, "downsamplers"):
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class UpBlock3D(_Layers):
    """``UpBlock3D`` / ``CrossAttnUpBlock3D``: each layer first concatenates one skip tensor."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channels: int,
        num_layers: int,
        add_upsample: bool,
        settings: BlockSettings,
        with_attention: bool,
        with_motion: bool,
    ) -> None:
        resnet_inputs = [
            (prev_output_channels if index == 0 else out_channels)
            + (in_channels if index == num_layers - 1 else out_channels)
            for index in range(num_layers)
        ]
        super().__init__(resnet_inputs, out_channels, settings, with_attention, with_motion)
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: list[torch.Tensor],
        frame_temb: torch.Tensor,
        audio: torch.Tensor,
        num_frames: int,
        upsample_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        """``skips`` are consumed from the end (most recent first)."""
        for index in range(len(self.resnets)):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)
            hidden_states = self.layer(index, hidden_states, frame_temb, audio, num_frames)
        if hasattr(self, "upsamplers"):
            hidden_states = self.upsamplers[0](hidden_states, output_size=upsample_size)
        return hidden_states


class UNetMidBlock3DCrossAttn(_Layers):
    """ResNet → spatial transformer → ResNet at the lowest resolution (no motion module)."""

    def __init__(self, channels: int, settings: BlockSettings, with_motion: bool) -> None:
        super().__init__([channels, channels], channels, settings, with_attention=False, with_motion=with_motion)
        self.attentions = nn.ModuleList([spatial_transformer(channels, settings)])
        if with_motion:
            self.motion_modules = nn.ModuleList([MotionModule(channels, settings.motion_settings, settings.groups)])

    def forward(
        self, hidden_states: torch.Tensor, frame_temb: torch.Tensor, audio: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, frame_temb, num_frames)
        hidden_states = self.attentions[0](hidden_states, encoder_hidden_states=audio, return_dict=False)[0]
        if hasattr(self, "motion_modules"):
            hidden_states = self.motion_modules[0](hidden_states, num_frames)
        return self.resnets[1](hidden_states, frame_temb, num_frames)
