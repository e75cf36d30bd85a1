"""Parameter and FLOP counts in the authors' convention.

GFLOPs follow fvcore (used by the paper): 1 FLOP per multiply-add. Counted:
  - convolutions, linears, einsums/matmuls: multiply-adds (torch's FlopCounterMode counts
    2 per multiply-add; halved here);
  - each selective-scan call: 9*B*L*(K*D)*N + B*(K*D)*L (the authors' analytic formula;
    the second term is the D skip), counted from the call's shapes, plus B*(K*D)*L*R for the
    dt_proj projection the scan forms itself (a matmul in the authors' code);
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
from quadmamba.models.quadmamba import QuadMamba
from quadmamba.ops.selective_scan import selective_scan_flops


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _shape_only_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, delta_proj=None):
    return torch.empty_like(u)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of model whose parameters and buffers are empty meta tensors (deepcopy's memo
    maps each to its meta stand-in, so no real tensor is copied) and without module hooks."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        stand_in = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(stand_in, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
            else stand_in
    meta = copy.deepcopy(model, memo)
    for module in meta.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                      module._backward_pre_hooks):
            hooks.clear()
    return meta


def count_flops(model: nn.Module, img_size=224, batch_size: int = 1, in_chans: Optional[int] = None) -> float:
    """GFLOPs (multiply-adds, fvcore convention) of one forward pass at ``img_size``.

    The model is copied onto the meta device (its tensors are not copied, nothing is computed)
    without the hooks registered on it; the original is untouched. ``img_size`` is an int or
    (H, W). A QuadMamba without its classifier head (``prune_intermediate_layers``) is counted
    through ``forward_intermediates``.
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if in_chans is None:
        in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    meta = _meta_copy(model).eval()
    extra = []

    def on_scan(module, args, output):   # SelectiveScan(u, delta, A, B, C, D, delta_bias[, delta_proj])
        proj = args[7] if len(args) > 7 else None
        rank = 0 if proj is None else proj.shape[-1]
        extra.append(selective_scan_flops(*args[0].shape, args[2].shape[1], rank, with_skip=args[5] is not None))

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
    # a classifier whose head prune_intermediate_layers removed (a backbone runs its own forward)
    headless = isinstance(meta, QuadMamba) and meta.head is None and not meta.config.features_only
    try:
        with torch.no_grad(), counter:
            meta.forward_intermediates(x, intermediates_only=True) if headless else meta(x)
    finally:
        for handle in handles:
            handle.remove()
    dense = sum(v for op, v in counter.get_flop_counts().get("Global", {}).items()
                if "selective_scan" not in str(op))
    return (dense / 2 + sum(extra)) / 1e9
