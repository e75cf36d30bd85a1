"""Small building blocks: DropPath, MLP, stem, downsample, global pooling.

Feature maps travel channel-last (B, H, W, C) between blocks; convolutions permute
to channel-first around themselves.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode


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


def _functorch_active(x: torch.Tensor) -> bool:
    """A torch.func transform (vmap, grad, ...) is running (older torch: x is one's wrapper)."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    if probe is not None:
        return probe()
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def eager_cpu(x: torch.Tensor) -> bool:
    """True when x is a plain CPU tensor in eager PyTorch: no CPU autocast, no graph capture
    (torch.compile / export, tracing), no dispatch mode (fake tensors, FlopCounterMode) and no
    torch.func transform. The CPU fast paths below run only then (Linear's oneDNN route; with
    autograd off too, map_tokens' chunks); everything else sees plain PyTorch ops."""
    # The flags first: under graph capture the sizes are symbolic, and looking at them would
    # add guards on them (torch.export with a dynamic batch would then bound the batch).
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.is_autocast_enabled("cpu") or _get_current_dispatch_mode() is not None
                or _functorch_active(x)
                or type(x) is not torch.Tensor or x.device.type != "cpu")


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """eager_cpu(x), with autograd not recording."""
    return not torch.is_grad_enabled() and eager_cpu(x)


INFERENCE_CHUNK_TOKENS = 8192
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
    takes about 10 % less time than whole; 8192 tokens a chunk measured 1-8 % faster than 2048
    once the Linears ran through oneDNN, README). Under CPU autocast the intermediates are half as large and
    the chunks' extra casts and calls cost more than they save (about 7 % slower measured),
    so fn runs whole there, as it does in training, with autograd, on CUDA, and under graph
    capture (torch.compile / export, tracing).
    """
    chunk = INFERENCE_CHUNK_TOKENS
    if chunk <= 0 or not eager_cpu_inference(x):
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


ONEDNN_LINEAR_ENV = "QUADMAMBA_ONEDNN_LINEAR"
"""Set to 0 to keep every Linear on F.linear (read once per process, by onednn_linear_works)."""


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   gelu: bool = False) -> torch.Tensor:
    """x W^T + b, or its exact GELU, through oneDNN's fused linear (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *(("gelu", [], "none") if gelu else ("none", [], "")))


def _onednn_linear_turned_off() -> bool:
    return os.environ.get(ONEDNN_LINEAR_ENV, "1").strip() == "0"


@functools.lru_cache(maxsize=None)
def onednn_linear_works() -> bool:
    """Whether Linear's oneDNN route is on: not turned off by QUADMAMBA_ONEDNN_LINEAR=0, and this
    torch build has oneDNN's fused linear (torch.ops.mkldnn._linear_pointwise, the op Inductor's
    CPU backend calls) computing GELU(x W^T + b) and x W^T as F.linear does; checked once on a
    small problem, so that a build without it, or with another signature, falls back to
    F.linear instead of failing."""
    if _onednn_linear_turned_off():
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 7), (16, 7), (16,)))
    try:
        with torch.no_grad():
            y = _onednn_linear(x, w, b, gelu=True)
            y0 = _onednn_linear(x, w)
    except (RuntimeError, TypeError):
        return False
    return (torch.allclose(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-6)
            and torch.allclose(y0, F.linear(x, w), rtol=1e-5, atol=1e-6))


def linear_route() -> str:
    """How the fused models' float32 CPU Linears run in this process (``quadmamba info`` and the
    benchmarks print it)."""
    if onednn_linear_works():
        return (f"oneDNN (products of 2^{Linear.MIN_FUSED_MACS.bit_length() - 1} multiply-adds and more; "
                f"{ONEDNN_LINEAR_ENV}=0: F.linear)")
    if _onednn_linear_turned_off():
        return f"F.linear ({ONEDNN_LINEAR_ENV}=0)"
    return "F.linear (this torch build has no working oneDNN fused linear)"


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN, for training. Backward:
        dx = dy W        (oneDNN again: a linear with weight W^T)
        dW = dy^T x      (a linear of dy^T with weight x^T, whose reduction runs over the
                          tokens: oneDNN for 256 or more input features, where it measured
                          1.3-2.1x faster than torch.mm at the models' shapes; torch.mm for
                          narrower inputs, where oneDNN was up to 1.4x slower)
        db = sum over tokens of dy
    Under create_graph the backward is written in differentiable torch ops instead, so that
    double backward works as through F.linear."""

    MIN_ONEDNN_DW_INPUTS = 256

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_x:
            dx = (dy @ weight if torch.is_grad_enabled()
                  else _onednn_linear(dy, weight.t()))
        if need_w:
            x2 = x.reshape(-1, x.shape[-1])
            dw = (_onednn_linear(dy2.t(), x2.t())
                  if (x2.shape[1] >= _OneDNNLinear.MIN_ONEDNN_DW_INPUTS and x2.shape[0] > 0
                      and not torch.is_grad_enabled())
                  else dy2.t() @ x2)
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear (same parameters, init and state-dict keys), optionally with the exact GELU
    after it: y = x W^T + b, or GELU(y) with ``gelu=True``.

    With ``fused=True``, float32 CPU work in eager PyTorch (see eager_cpu) goes through
    oneDNN's fused linear: in inference with the GELU applied on the product's tiles while
    they are in cache, in training through _OneDNNLinear (then F.gelu). On AVX-512 CPUs where
    PyTorch's float32 matmul (MKL's sgemm) runs its AVX2 code, as on the AMD machine of the
    README, oneDNN's AVX-512 kernels take about half the time of F.linear at the models'
    shapes (README, Performance). The same numbers up to the order of summation. Layers with
    fewer than 16 outputs (the score predictor's last), products under 2^21 multiply-adds
    (tokens x in x out; oneDNN's per-call cost is larger, measured slower below about 1-2
    million) and everything else (autocast, CUDA, float64, graph capture, torch.func, a bias
    that is not a contiguous float32 tensor, oneDNN turned off with
    torch.backends.mkldnn.flags(enabled=False)) take F.linear.
    ``fused=False`` always takes F.linear (+ F.gelu): the plain-PyTorch model.
    """

    MIN_FUSED_OUTPUTS = 16
    MIN_FUSED_MACS = 1 << 21

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 gelu: bool = False, fused: bool = True):
        for name, value in (("gelu", gelu), ("fused", fused)):
            if not isinstance(value, bool):
                raise TypeError(f"Linear: {name} must be a bool, got {value!r}")
        super().__init__(in_features, out_features, bias=bias)
        self.gelu = gelu
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if (self.fused and self.out_features >= self.MIN_FUSED_OUTPUTS and eager_cpu(x)
                and x.numel() * self.out_features >= self.MIN_FUSED_MACS
                and x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu"
                # oneDNN misreads a strided bias (measured: wrong sums, no error)
                and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
                and torch.backends.mkldnn.enabled and onednn_linear_works()):
            if not torch.is_grad_enabled():
                return _onednn_linear(x, weight, bias, self.gelu)
            y = _OneDNNLinear.apply(x, weight, bias)
        else:
            y = F.linear(x, weight, bias)
        return F.gelu(y) if self.gelu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=True" if self.gelu else "") + ("" if self.fused else ", fused=False")


class Mlp(nn.Module):
    """Linear(C, hidden) -> GELU -> Linear(hidden, C), on the last axis (the GELU inside fc1).

    Args:
        dim: input and output width C.
        hidden_dim: hidden width (mlp_ratio * C).
        fused: the Linears' oneDNN route on the CPU (see Linear); False: plain PyTorch.
    """

    def __init__(self, dim: int, hidden_dim: int, *, fused: bool = True):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim, gelu=True, fused=fused)
        self.fc2 = Linear(hidden_dim, dim, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


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
