"""LatentSync's audio-conditioned 3-D UNet (``UNet3DConditionModel``), built from its YAML config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from lipsync.models.blocks import (
    BlockSettings,
    DownBlock3D,
    UNetMidBlock3DCrossAttn,
    UpBlock3D,
)
from lipsync.models.resnet import FramePooledGroupNorm

_DOWN_TYPES = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
_UP_TYPES = {"CrossAttnUpBlock3D": True, "UpBlock3D": False}

_SUPPORTED = {
    "act_fn": "silu",
    "add_audio_layer": True,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "motion_module_type": "Vanilla",
}


class UNet3DConditionModel(nn.Module):
    """Noise predictor over ``(B, 13, F, h, w)`` latents, conditioned on per-frame audio tokens.

    Internally frames are folded into the batch (``(B·F, C, h, w)``); see ``lipsync.models.resnet``
    for the one place where frames of a window interact outside the motion modules.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        _check_supported(self.config)
        channels = list(config["block_out_channels"])
        temb_channels = channels[0] * 4
        use_motion = bool(config.get("use_motion_module", False))
        motion_resolutions = set(config.get("motion_module_resolutions", ()))
        decoder_only = bool(config.get("motion_module_decoder_only", False))
        settings = BlockSettings(
            temb_channels=temb_channels,
            groups=config["norm_num_groups"],
            eps=config["norm_eps"],
            attention_heads=config["attention_head_dim"],
            cross_attention_dim=config["cross_attention_dim"],
            motion_settings=dict(config.get("motion_module_kwargs") or {}),
        )
        layers = config["layers_per_block"]

        self.conv_in = nn.Conv2d(config["in_channels"], channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(channels[0], config["flip_sin_to_cos"], config["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        for index, block_type in enumerate(config["down_block_types"]):
            self.down_blocks.append(
                DownBlock3D(
                    in_channels=channels[max(index - 1, 0)],
                    out_channels=channels[index],
                    num_layers=layers,
                    add_downsample=index < len(channels) - 1,
                    settings=settings,
                    with_attention=_block_kind(_DOWN_TYPES, block_type),
                    with_motion=use_motion and not decoder_only and 2**index in motion_resolutions,
                )
            )
        self.mid_block = UNetMidBlock3DCrossAttn(
            channels[-1], settings, with_motion=use_motion and bool(config.get("motion_module_mid_block", False))
        )
        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        for index, block_type in enumerate(config["up_block_types"]):
            self.up_blocks.append(
                UpBlock3D(
                    in_channels=reversed_channels[min(index + 1, len(channels) - 1)],
                    out_channels=reversed_channels[index],
                    prev_output_channels=reversed_channels[max(index - 1, 0)],
                    num_layers=layers + 1,
                    add_upsample=index < len(channels) - 1,
                    settings=settings,
                    with_attention=_block_kind(_UP_TYPES, block_type),
                    with_motion=use_motion and 2 ** (len(channels) - 1 - index) in motion_resolutions,
                )
            )
        self.conv_norm_out = FramePooledGroupNorm(config["norm_num_groups"], channels[0], eps=config["norm_eps"])
        self.conv_out = nn.Conv2d(channels[0], config["out_channels"], kernel_size=3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """Predict the noise ε.

        Args:
            sample: ``(B, in_channels, F, h, w)`` — noisy latents, mask, masked-face and reference latents.
            timestep: a scalar or ``(B,)`` diffusion timestep.
            encoder_hidden_states: per-frame audio tokens ``(B·F, tokens, dim)`` in batch-major order
                (or ``(B, F, tokens, dim)``).
        Returns:
            ``(B, out_channels, F, h, w)``.
        """
        return self.forward_caching(sample, timestep, encoder_hidden_states)[0]

    def forward_caching(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full pass, also returning the *deep features*: the input of the last up block.

        Feature caching (DeepCache) keeps them for the next steps, which run only :meth:`forward_shallow`.
        """
        call, hidden_states, skips = self._shallow_down(sample, timestep, encoder_hidden_states, downsample=True)
        for block in self.down_blocks[1:]:
            hidden_states, block_skips = block(hidden_states, call.temb, call.audio, call.frames)
            skips.extend(block_skips)
        hidden_states = self.mid_block(hidden_states, call.temb, call.audio, call.frames)
        for block in self.up_blocks[:-1]:
            resnets = cast(nn.ModuleList, block.resnets)
            block_skips = skips[-len(resnets) :]
            del skips[-len(resnets) :]
            hidden_states = block(
                hidden_states, block_skips, call.temb, call.audio, call.frames, tuple(skips[-1].shape[-2:])
            )
        return self._shallow_up(call, hidden_states, skips), hidden_states

    def forward_shallow(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        deep_features: torch.Tensor,
    ) -> torch.Tensor:
        """DeepCache's cheap pass: the first down block and the last up block around cached deep features.

        ``deep_features`` come from :meth:`forward_caching` on a call of the same shape. The result
        approximates :meth:`forward` (the deeper blocks' output changes slowly between nearby steps).
        """
        call, _, skips = self._shallow_down(sample, timestep, encoder_hidden_states, downsample=False)
        return self._shallow_up(call, deep_features, skips)

    def _shallow_down(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor, downsample: bool
    ) -> tuple[_Call, torch.Tensor, list[torch.Tensor]]:
        batch, _, num_frames, height, width = sample.shape
        audio = encoder_hidden_states.flatten(0, 1) if encoder_hidden_states.ndim == 4 else encoder_hidden_states
        if audio.shape[0] != batch * num_frames:
            raise ValueError(
                f"encoder_hidden_states has {audio.shape[0]} rows; expected batch × frames = {batch * num_frames}"
            )
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        call = _Call(batch, num_frames, temb.repeat_interleave(num_frames, dim=0), audio)

        hidden_states = self.conv_in(sample.transpose(1, 2).reshape(batch * num_frames, -1, height, width))
        skips = [hidden_states]
        hidden_states, block_skips = self.down_blocks[0](hidden_states, call.temb, audio, num_frames, downsample)
        skips.extend(block_skips)
        return call, hidden_states, skips

    def _shallow_up(self, call: _Call, hidden_states: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The last up block over the first skips, then the output head; back to ``(B, C, F, h, w)``."""
        hidden_states = self.up_blocks[-1](hidden_states, skips, call.temb, call.audio, call.frames, None)
        hidden_states = self.conv_out(self.conv_norm_out(hidden_states, call.frames, fuse_silu=True))
        height, width = hidden_states.shape[-2:]
        return hidden_states.view(call.batch, call.frames, -1, height, width).transpose(1, 2)


@dataclass(frozen=True)
class _Call:
    """What every block of one UNet call shares."""

    batch: int
    frames: int
    temb: torch.Tensor
    """Timestep embedding per frame ``(B·F, temb_channels)``."""
    audio: torch.Tensor
    """Audio tokens per frame ``(B·F, tokens, dim)``."""


def _block_kind(types: dict[str, bool], block_type: str) -> bool:
    if block_type not in types:
        raise ValueError(f"unsupported UNet block type {block_type!r}; expected one of {sorted(types)}")
    return types[block_type]


def _check_supported(config: Mapping[str, Any]) -> None:
    for key, expected in _SUPPORTED.items():
        if key in config and config[key] != expected:
            raise ValueError(f"UNet config {key}={config[key]!r} is not supported (only {expected!r})")
    if len(config["down_block_types"]) != len(config["block_out_channels"]):
        raise ValueError("UNet config: down_block_types and block_out_channels differ in length")
