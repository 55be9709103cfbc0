"""AnimateDiff-style motion module ("Vanilla" temporal transformer) of LatentSync 1.5/1.6.

Spatial positions are folded into the batch and each position attends over the frames of its
window; the whole temporal transformer runs in that ``(B·H·W, F, C)`` layout. Differences from diffusers' ``AnimateDiffTransformer3D`` that matter for exactness:
GroupNorm statistics are per frame here, and the sinusoidal positions are added to the attention
input (after each LayerNorm), never to the residual stream.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class SinusoidalPositions(nn.Module):
    """Adds interleaved sin/cos frame positions; the table is a persistent buffer ``pe``."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(1, max_len, dim)
        table[0, :, 0::2] = torch.sin(position * frequencies)
        table[0, :, 1::2] = torch.cos(position * frequencies)
        self.pe: torch.Tensor
        self.register_buffer("pe", table)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        num_frames = tokens.shape[1]
        if num_frames > self.pe.shape[1]:
            raise ValueError(f"a window has {num_frames} frames; the motion module supports at most {self.pe.shape[1]}")
        return tokens + self.pe[:, :num_frames].to(tokens.dtype)


class TemporalSelfAttention(Attention):
    """Self-attention across the frames of each spatial position (diffusers ``Attention``)."""

    max_sequences = 65535
    """Sequences one attention call takes at most. CUDA's flash and memory-efficient attention kernels put
    the batch on a grid axis of at most 2¹⁶ − 1 blocks and fail with an invalid launch beyond it; at 512 px
    (64 × 64 latents) 8 windows with guidance are 2 · 8 · 4096 = 65536 sequences. Longer batches are
    attended in slices: the sequences are independent, so the result is the same."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_frames: int) -> None:
        super().__init__(query_dim=dim, heads=heads, dim_head=head_dim, bias=False)
        self.pos_encoder = SinusoidalPositions(dim, max_frames)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """``sequences``: ``(B·H·W, F, C)``, the frames of one spatial position each → same shape."""
        positioned = self.pos_encoder(sequences)
        attend = super().forward
        if positioned.shape[0] <= self.max_sequences:
            return attend(positioned)
        return torch.cat([attend(part) for part in positioned.split(self.max_sequences)])


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions and a GEGLU feed-forward, each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, num_attention_blocks: int, max_frames: int) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalSelfAttention(dim, heads, head_dim, max_frames) for _ in range(num_attention_blocks)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_attention_blocks))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """``sequences``: ``(B·H·W, F, C)``; LayerNorms and the feed-forward act per token."""
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            sequences = attention(norm(sequences)) + sequences
        return self.ff(self.ff_norm(sequences)) + sequences


class TemporalTransformer(nn.Module):
    """Per-frame GroupNorm → linear in → temporal blocks → linear out, plus the input."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        num_blocks: int,
        num_attention_blocks: int,
        groups: int,
        max_frames: int,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(dim, heads, head_dim, num_attention_blocks, max_frames) for _ in range(num_blocks)
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``(B·F, C, H, W)`` → same shape.

        The temporal blocks work in one layout, ``(B·H·W, F, C)``: a single copy moves the normed
        input there, and the way back is fused into the residual addition.
        """
        frames_in_batch, channels, height, width = hidden_states.shape
        batch = frames_in_batch // num_frames
        normed = self.norm(hidden_states).view(batch, num_frames, channels, height * width)
        sequences = normed.permute(0, 3, 1, 2).reshape(batch * height * width, num_frames, channels)
        sequences = self.proj_in(sequences)
        for block in self.transformer_blocks:
            sequences = block(sequences)
        sequences = self.proj_out(sequences).view(batch, height * width, num_frames, channels).permute(0, 2, 3, 1)
        return (hidden_states.view(batch, num_frames, channels, height * width) + sequences).view(hidden_states.shape)


class MotionModule(nn.Module):
    """Wrapper that gives the official key prefix ``motion_modules.N.temporal_transformer``."""

    def __init__(self, dim: int, settings: dict, groups: int) -> None:
        super().__init__()
        block_types = settings["attention_block_types"]
        if any(kind != "Temporal_Self" for kind in block_types):
            raise ValueError(f"only Temporal_Self motion attention is supported, got {block_types}")
        if not settings.get("temporal_position_encoding", False):
            raise ValueError("motion modules without temporal_position_encoding are not supported")
        self.temporal_transformer = TemporalTransformer(
            dim=dim,
            heads=settings["num_attention_heads"],
            head_dim=dim // settings["num_attention_heads"] // settings.get("temporal_attention_dim_div", 1),
            num_blocks=settings["num_transformer_block"],
            num_attention_blocks=len(block_types),
            groups=groups,
            max_frames=settings["temporal_position_encoding_max_len"],
        )

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.temporal_transformer(hidden_states, num_frames)
