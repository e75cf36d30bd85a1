"""The table of scan ops a model runs on: the fused kernels or their plain-PyTorch references.

Both sets have identical signatures (see quadmamba.ops.reference):
    selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, out_dtype=None,
                   delta_proj=None)                                 -> (B, K*D, L)
    quad_scan(x, decision, shift=(0, 0), order="quadtree")          -> (B, 2, D, L)
    quad_merge(ys, decision, size, shift=(0, 0), order="quadtree")  -> (B, D, H, W)
    cross_scan(x)                                                   -> (B, 4, D, L)
    cross_merge(ys, size)                                           -> (B, D, H, W)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KERNELS = ("fused", "reference")
OP_NAMES = ("selective_scan", "quad_scan", "quad_merge", "cross_scan", "cross_merge")


@dataclass(frozen=True)
class ScanOps:
    """One implementation of every op the mixers call."""

    kernels: str
    selective_scan: Callable
    quad_scan: Callable
    quad_merge: Callable
    cross_scan: Callable
    cross_merge: Callable


def get_ops(kernels: str) -> ScanOps:
    """The op table for ``kernels`` ("fused": quadmamba.ops, "reference": quadmamba.ops.reference)."""
    if kernels == "reference":
        from quadmamba.ops import reference as ref

        return ScanOps(kernels, *(getattr(ref, f"{name}_ref") for name in OP_NAMES))
    if kernels == "fused":
        import quadmamba.ops as ops

        return ScanOps(kernels, *(getattr(ops, name) for name in OP_NAMES))
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
