"""cross_scan / cross_merge: the 4 directions of a feature map (plain stages) and their
adjoint, fused CPU/CUDA kernels (spec: ``reference.cross_scan_ref`` /
``reference.cross_merge_ref``; kernel contract: cpp/include/quadmamba/cross_scan.h).

Each op is the other's backward. Dtypes as in quad_scan: outputs in the input's dtype;
on CPU float16/bfloat16 are computed in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quadmamba._backend import core, reject_forward_ad, stream, view
from quadmamba.ops.quad_scan import _check_size, _check_tensor, _kernel_data

__all__ = ["cross_scan", "cross_merge"]


@torch.library.custom_op("quadmamba::cross_scan", mutates_args=())
def _cross_scan(x: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    if x.numel() == 0:  # no images or no channels
        return x.new_zeros(batch, 4, channels, height * width)
    data = _kernel_data(x)
    out = data.new_empty(batch, 4, channels, height * width)
    core().cross_scan_fwd(view(data), view(out), stream(data))
    return out.to(x.dtype)


@_cross_scan.register_fake
def _(x):
    batch, channels, height, width = x.shape
    return x.new_empty(batch, 4, channels, height * width)


@torch.library.custom_op("quadmamba::cross_merge", mutates_args=())
def _cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    batch, _, channels, _ = ys.shape
    if ys.numel() == 0:  # no images or no channels
        return ys.new_zeros(batch, channels, height, width)
    data = _kernel_data(ys)
    y = data.new_empty(batch, channels, height, width)
    core().cross_merge_fwd(view(data), view(y), stream(data))
    return y.to(ys.dtype)


@_cross_merge.register_fake
def _(ys, height, width):
    batch, _, channels, _ = ys.shape
    return ys.new_empty(batch, channels, height, width)


def _cross_scan_setup(ctx, inputs, output):
    ctx.size = tuple(inputs[0].shape[2:])


def _cross_scan_backward(ctx, gout):
    return torch.ops.quadmamba.cross_merge(gout.contiguous(), *ctx.size)


def _cross_merge_setup(ctx, inputs, output):
    pass


def _cross_merge_backward(ctx, gy):
    return torch.ops.quadmamba.cross_scan(gy.contiguous()), None, None


_cross_scan.register_autograd(_cross_scan_backward, setup_context=_cross_scan_setup)
_cross_merge.register_autograd(_cross_merge_backward, setup_context=_cross_merge_setup)


def cross_scan(x: Tensor) -> Tensor:
    """The 4 directions of a feature map: row-major, column-major, and both reversed.

    Args:
        x: (B, D, H, W).

    Returns:
        (B, 4, D, H*W) in x's dtype.
    """
    _check_tensor(x, "x", 4, "(B, D, H, W)")
    _check_size(tuple(x.shape[2:]), "x's (H, W)")
    reject_forward_ad("cross_scan", x)
    return torch.ops.quadmamba.cross_scan(x.contiguous())


def cross_merge(ys: Tensor, size: tuple[int, int]) -> Tensor:
    """The adjoint of cross_scan: the 4 directions summed back on the (H, W) grid.

    Args:
        ys: (B, 4, D, H*W).
        size: (H, W).

    Returns:
        (B, D, H, W) in ys's dtype.
    """
    _check_tensor(ys, "ys", 4, "(B, 4, D, H*W)")
    height, width = _check_size(size)
    if ys.shape[1] != 4 or ys.shape[3] != height * width:
        raise ValueError(
            f"ys must have shape (B, 4, D, H*W) = (B, 4, D, {height * width}) for size {(height, width)}, "
            f"got {tuple(ys.shape)}"
        )
    reject_forward_ad("cross_merge", ys)
    return torch.ops.quadmamba.cross_merge(ys.contiguous(), height, width)
