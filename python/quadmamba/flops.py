"""Parameter and FLOP counts in the authors' convention.

GFLOPs follow fvcore (used by the paper): 1 FLOP per multiply-add. Counted:
  - convolutions, linears, einsums/matmuls: multiply-adds (torch's FlopCounterMode counts
    2 per multiply-add; halved here);
  - each selective-scan call: 9*B*L*(K*D)*N + B*(K*D)*L (the authors' analytic formula;
    the second term is the D skip), counted from the call's shapes;
  - LayerNorm: 5 per input element (fvcore's estimate for an affine norm);
  - global average pooling: 1 per input element.
Not counted (as in fvcore): activations, softmax, Gumbel sampling, gathers/rolls, adds.
With these terms the variants give 0.821 / 2.071 / 5.518 / 9.376 GFLOPs at 224x224.
A FLOP formula registered for a fused scan op is ignored in favour of the formula above,
so the result does not depend on the kernels in use.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from quadmamba.layers.common import GlobalAvgPool
from quadmamba.layers.mixers import SelectiveScan


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def scan_flops(u: torch.Tensor, A: torch.Tensor, with_skip: bool = True) -> int:
    """Authors' count for one scan call: 9*B*L*(K*D)*N (+ B*(K*D)*L for the D skip)."""
    batch, channels, length = u.shape
    flops = 9 * batch * length * channels * A.shape[1]
    return flops + (batch * channels * length if with_skip else 0)


def _shape_only_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    return torch.empty_like(u)


def count_flops(model: nn.Module, img_size=224, batch_size: int = 1, in_chans: Optional[int] = None) -> float:
    """GFLOPs (multiply-adds, fvcore convention) of one forward pass at ``img_size``.

    The model is copied to the meta device (no memory, no compute); the original is untouched.
    ``img_size`` is an int or (H, W).
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if in_chans is None:
        in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    meta = copy.deepcopy(model).to("meta").eval()
    extra = []

    def on_scan(module, args, output):
        extra.append(scan_flops(args[0], args[2], with_skip=args[5] is not None))

    def on_norm(module, args, output):
        extra.append(5 * args[0].numel())

    def on_pool(module, args, output):
        extra.append(args[0].numel())

    handles = []
    for module in meta.modules():
        if isinstance(module, SelectiveScan):
            module.fn = _shape_only_scan   # the copy needs shapes only; counted by on_scan
            handles.append(module.register_forward_hook(on_scan))
        elif isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(on_norm))
        elif isinstance(module, GlobalAvgPool):
            handles.append(module.register_forward_hook(on_pool))
    counter = FlopCounterMode(display=False)
    param = next(meta.parameters(), None)   # the input in the model's dtype (a bf16 model takes bf16)
    x = torch.empty(batch_size, in_chans, height, width, device="meta",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    try:
        with torch.no_grad(), counter:
            meta(x)
    finally:
        for handle in handles:
            handle.remove()
    dense = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items()
                if "selective_scan" not in str(op))
    return (dense / 2 + sum(extra)) / 1e9
