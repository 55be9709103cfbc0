"""ResNet pieces of the LatentSync UNet, on frames folded into the batch.

Every tensor between blocks has the layout ``(B·F, C, H, W)`` (frames of one sample next to each
other), so plain 2-D convolutions apply per frame without copies. What differs from diffusers'
``ResnetBlock2D`` is normalisation: the official model applies ``nn.GroupNorm`` to the 5-D
``(B, C, F, H, W)`` tensor, so ResNet statistics are pooled over all frames of a window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FramePooledGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover ``num_frames`` consecutive batch rows (one window).

    Equal to ``nn.GroupNorm`` on ``(B, C, F, H, W)`` while taking ``(B·F, C, H, W)``. It runs
    exactly that: one transposing copy puts the frames among the normalised dims, so a single
    ``F.group_norm`` kernel (fp32 statistics whatever the input dtype, affine fused) pools them.
    With ``fuse_silu`` the activation that always follows is applied before the copy back.
    """

    def forward(  # type: ignore[override]  # it needs the window length, which a plain GroupNorm does not
        self,
        hidden_states: torch.Tensor,
        num_frames: int,
        fuse_silu: bool = False,
    ) -> torch.Tensor:
        frames_in_batch, channels, height, width = hidden_states.shape
        windows = hidden_states.reshape(frames_in_batch // num_frames, num_frames, channels, height * width).transpose(
            1, 2
        )
        normalised = F.group_norm(windows, self.num_groups, self.weight, self.bias, self.eps)
        if fuse_silu:
            normalised = F.silu(normalised, inplace=True)
        return normalised.transpose(1, 2).reshape(frames_in_batch, channels, height, width)


class ResnetBlock3D(nn.Module):
    """Pre-activation residual block with a timestep bias and frame-pooled GroupNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = FramePooledGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = FramePooledGroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, hidden_states: torch.Tensor, frame_temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``frame_temb`` is the timestep embedding repeated per frame: ``(B·F, temb_channels)``."""
        residual = hidden_states
        hidden_states = self.conv1(self.norm1(hidden_states, num_frames, fuse_silu=True))
        hidden_states = hidden_states + self.time_emb_proj(F.silu(frame_temb))[:, :, None, None]
        hidden_states = self.conv2(self.norm2(hidden_states, num_frames, fuse_silu=True))
        if self.conv_shortcut is not None:
            residual = self.conv_shortcut(residual)
        return residual + hidden_states
