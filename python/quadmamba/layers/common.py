"""Small building blocks: DropPath, MLP, stem, downsample, global pooling.

Feature maps travel channel-last (B, H, W, C) between blocks; convolutions permute
to channel-first around themselves.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero the branch with probability p, scale survivors by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth on a residual branch.

    Args:
        drop_prob: probability of dropping the branch of a sample (training only).
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


INFERENCE_CHUNK_TOKENS = 2048
"""Tokens per chunk of map_tokens in CPU inference (0: never chunk)."""


def map_tokens(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a map that treats every token (a vector along the last axis) on its own.

    fn takes (..., C) and returns (..., *out); x is (B, ..., C), contiguous or a permuted
    view. In CPU inference without autocast (autograd not recording, eager) the tokens go
    through fn INFERENCE_CHUNK_TOKENS at a time: the same numbers, but fn's intermediates
    are chunk-sized. On CPU an intermediate of tens of MB (QuadMamba-T at batch 16 has
    50176 tokens at stage 0, and its MLP hidden layer is 51 MB) is a fresh mapping every
    time it is allocated and costs a page fault per 4 KiB page; chunks stay in the
    allocator's cache and in the CPU caches (measured: a QuadMamba-T forward at batch 16
    takes about 10 % less time). Under CPU autocast the intermediates are half as large and
    the chunks' extra casts and calls cost more than they save (about 7 % slower measured),
    so fn runs whole there, as it does in training, with autograd, on CUDA, and under graph
    capture (torch.compile / export, tracing).
    """
    chunk = INFERENCE_CHUNK_TOKENS
    # The flags first: under graph capture the sizes are symbolic, and comparing them would
    # add a guard on them (torch.export with a dynamic batch would then bound the batch).
    if (chunk <= 0 or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or x.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return fn(x)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens <= chunk:
        return fn(x)
    if x.dim() == 2 or x.is_contiguous():              # chunks of the flattened tokens (views)
        parts = (x if x.dim() == 2 else x.view(tokens, x.shape[-1])).split(chunk)
    else:                                               # chunks of rows (dim 1) per image
        rows = max(1, chunk * x.shape[1] // (tokens // x.shape[0]))
        parts = [row for image in x for row in image.split(rows)]
    out = None
    start = 0
    for part in parts:
        y = fn(part)
        y = y.reshape((-1,) + y.shape[part.dim() - 1:])  # (tokens in part, *out)
        if out is None:                                 # dtype as fn decided (autocast)
            out = y.new_empty((tokens,) + y.shape[1:])
        out[start:start + y.shape[0]] = y
        start += y.shape[0]
    return out.view(x.shape[:-1] + out.shape[1:])


class Mlp(nn.Module):
    """Linear(C, hidden) -> GELU -> Linear(hidden, C), on the last axis.

    Args:
        dim: input and output width C.
        hidden_dim: hidden width (mlp_ratio * C).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Stem(nn.Module):
    """Conv3x3 s2 (in -> C/2) -> LN -> GELU -> Conv3x3 s2 (C/2 -> C) -> LN: stride 4.

    Args:
        in_chans: image channels.
        dim: output width C.

    Input (B, in_chans, H, W) channel-first; output (B, ceil(H/4), ceil(W/4), C) channel-last.
    """

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = map_tokens(self._norm_act, self.conv1(x).permute(0, 2, 3, 1))
        x = self.conv2(x.permute(0, 3, 1, 2))
        return self.norm2(x.permute(0, 2, 3, 1))

    def _norm_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm1(x))


class Downsample(nn.Module):
    """Conv3x3 s2 (C_in -> C_out, bias) -> LN, channel-last in and out.

    Args:
        dim: input width.
        out_dim: output width.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2))
        return self.norm(x.permute(0, 2, 3, 1))


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes of a channel-last map: (B, H, W, C) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))
