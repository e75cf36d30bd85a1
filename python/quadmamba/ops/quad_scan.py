"""quad_scan / quad_merge: the quadtree sequences of a feature map and their adjoint,
fused CPU/CUDA kernels (spec: ``reference.quad_scan_ref`` / ``reference.quad_merge_ref``;
kernel contract: cpp/include/quadmamba/quad_scan.h).

Shapes: x, y (B, D, H, W); sequences (B, 2, D, L = H*W) holding [seq, reverse(seq)];
decision (B, 4) over the quadrants TL, TR, BL, BR of the (rolled) grid.

H and W must be multiples of 4: the model pads the feature map bottom/right with zeros
before the scan and crops after the merge. The window shift (sy, sx) is the cyclic roll
``torch.roll(x, (sy, sx), dims=(2, 3))`` applied before ordering (undone by the merge);
it is folded into the kernels' index math, no rolled copy is made.

Dtypes: outputs come in the data's dtype. On CUDA float16/bfloat16/float32/float64 run
natively (fp16/bf16 math in float32). On CPU the kernels run in float32/float64;
float16/bfloat16 inputs are upcast to float32 and the results cast back. The decision
enters the kernels in float32 (float64 for float64 data); its gradient is returned in
decision's dtype.

Gradients flow to the data and to the decision (the straight-through path of the hard
Gumbel-softmax); double backward is not supported.

The public functions check that the decision is one-hot (0/1 values, one 1 per row);
that check reads the values (a device synchronisation on CUDA) and is skipped while
torch.compile traces. The custom ops ``torch.ops.quadmamba.quad_scan`` /
``quad_merge`` take any decision values and compute the formula (gradcheck uses that).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from quadmamba._backend import core, reject_forward_ad, stream, view
from quadmamba.ops.reference import QUAD_ORDERS

__all__ = ["quad_scan", "quad_merge"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Argument checks shared with cross_scan.py
# ---------------------------------------------------------------------------
def _check_tensor(t, name: str, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda", "meta"):  # meta: shape-only runs (FLOP counting)
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def _is_int(v) -> bool:
    """An int, a numpy int, or a symbolic int (torch.compile / torch.export with dynamic sizes)."""
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)


def _as_int(v):
    return v if isinstance(v, torch.SymInt) else int(v)   # int() would specialise a symbolic size


def _check_size(size, name: str = "size") -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(v) for v in size):
        raise TypeError(f"{name} must be a pair of ints (H, W), got {size!r}")
    height, width = _as_int(size[0]), _as_int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {(height, width)}")
    return height, width


def _check_quad_grid(height: int, width: int, name: str) -> None:
    if height <= 0 or width <= 0 or height % 4 or width % 4:
        raise ValueError(
            f"{name}: H and W must be positive multiples of 4 for the quadtree scan (pad the feature map "
            f"bottom/right and crop after the merge), got H={height}, W={width}"
        )


def _check_decision(decision, batch: int, device: torch.device) -> None:
    if not isinstance(decision, Tensor):
        raise TypeError(f"decision must be a torch.Tensor of shape (B, 4), got {type(decision).__name__}")
    if not decision.is_floating_point():
        raise TypeError(f"decision must be a floating tensor (one-hot over 4 quadrants), got {decision.dtype}")
    if tuple(decision.shape) != (batch, 4):
        raise ValueError(f"decision must have shape (B, 4) = ({batch}, 4), got {tuple(decision.shape)}")
    if decision.device != device:
        raise ValueError(f"decision must be on the data's device {device}, got {decision.device}")
    if torch.compiler.is_compiling() or decision.device.type == "meta":
        return  # a value check would break the graph (or has no values); callers own their inputs
    d = decision.detach()
    try:
        if d.device.type == "cpu" and d.numel() <= 1024:  # the values in Python: one call instead of ~8 ops
            one_hot = all(sum(row) == 1 and all(v == 0 or v == 1 for v in row) for row in d.tolist())
        else:
            one_hot = bool((((d == 0) | (d == 1)).all(dim=1) & (d.sum(dim=1) == 1)).all())
    except RuntimeError:   # no values to read: a transform such as torch.func.vmap maps over decision
        raise NotImplementedError(
            "decision: its values cannot be read to check that it is one-hot (as under torch.func.vmap "
            "over decision); map over the data only") from None
    if not one_hot:
        raise ValueError(
            "decision must be one-hot in the forward: values 0/1 with exactly one 1 per row "
            f"(the straight-through Gumbel sample), got {d.tolist() if d.numel() <= 16 else 'other values'}"
        )


def _check_shift(shift, height: int, width: int) -> tuple[int, int]:
    if not isinstance(shift, (tuple, list)) or len(shift) != 2 or not all(_is_int(v) for v in shift):
        raise TypeError(f"shift must be a pair of ints (sy, sx), got {shift!r}")
    sy, sx = _as_int(shift[0]), _as_int(shift[1])
    if abs(sy) >= height or abs(sx) >= width:
        raise ValueError(f"shift must satisfy |sy| < H and |sx| < W, got {(sy, sx)} for H={height}, W={width}")
    return sy, sx


def _check_order(order) -> None:
    if order not in QUAD_ORDERS:
        raise ValueError(f"order must be one of {QUAD_ORDERS}, got {order!r}")


def _kernel_data(t: Tensor) -> Tensor:
    """t as the kernels take it: contiguous; float16/bfloat16 upcast to float32 on CPU."""
    if t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cpu":
        t = t.float()
    return t.contiguous()


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _kernel_decision(decision: Tensor, data: Tensor) -> Tensor:
    acc = torch.float64 if data.dtype == torch.float64 else torch.float32
    return _as_dtype(decision, acc).contiguous()


# ---------------------------------------------------------------------------
# Custom ops (the kernels); the public functions below validate and call these.
# ---------------------------------------------------------------------------
@torch.library.custom_op("quadmamba::quad_scan", mutates_args=())
def _quad_scan(x: Tensor, decision: Tensor, sy: int, sx: int, order: str) -> Tensor:
    batch, channels, height, width = x.shape
    if x.numel() == 0:  # no images or no channels: nothing to order
        return x.new_zeros(batch, 2, channels, height * width)
    data = _kernel_data(x)
    dec = _kernel_decision(decision, data)  # kept alive: the core reads its pointer
    out = data.new_empty(batch, 2, channels, height * width)
    core().quad_scan_fwd(view(data), view(dec), view(out), height, width, sy, sx, order, stream(data))
    return _as_dtype(out, x.dtype)


@_quad_scan.register_fake
def _(x, decision, sy, sx, order):
    batch, channels, height, width = x.shape
    return x.new_empty(batch, 2, channels, height * width)


@torch.library.custom_op("quadmamba::quad_merge", mutates_args=())
def _quad_merge(ys: Tensor, decision: Tensor, height: int, width: int, sy: int, sx: int, order: str) -> Tensor:
    batch, _, channels, _ = ys.shape
    if ys.numel() == 0:  # no images or no channels
        return ys.new_zeros(batch, channels, height, width)
    data = _kernel_data(ys)
    dec = _kernel_decision(decision, data)  # kept alive: the core reads its pointer
    y = data.new_empty(batch, channels, height, width)
    core().quad_merge_fwd(view(data), view(dec), view(y), height, width, sy, sx, order, stream(data))
    return _as_dtype(y, ys.dtype)


@_quad_merge.register_fake
def _(ys, decision, height, width, sy, sx, order):
    batch, _, channels, _ = ys.shape
    return ys.new_empty(batch, channels, height, width)


def _fused_backward(kernel, grad: Tensor, saved: Tensor, raster_shape, decision: Tensor,
                    sy: int, sx: int, order: str) -> tuple[Tensor, Tensor]:
    """Runs one fused backward kernel (quad_scan_bwd or quad_merge_bwd): the gradient of `saved`
    (the op's data input) from `grad`, and of the decision. raster_shape is (B, D, H, W)."""
    batch, channels, height, width = raster_shape
    if saved.numel() == 0:  # no images or no channels: nothing reaches the decision either
        return torch.zeros_like(saved, memory_format=torch.contiguous_format), torch.zeros_like(decision)
    data, g = _kernel_data(saved), _kernel_data(_as_dtype(grad, saved.dtype))
    dec = _kernel_decision(decision, data)
    dsaved = torch.empty_like(data)
    ddecision = torch.empty_like(dec)
    workspace = dec.new_empty(batch, channels, 4)
    kernel(view(data), view(dec), view(g), view(dsaved), view(ddecision), view(workspace),
           height, width, sy, sx, order, stream(data))
    return _as_dtype(dsaved, saved.dtype), _as_dtype(ddecision, decision.dtype)


@torch.library.custom_op("quadmamba::quad_scan_bwd", mutates_args=())
def _quad_scan_bwd(
    gout: Tensor, x: Tensor, decision: Tensor, sy: int, sx: int, order: str
) -> tuple[Tensor, Tensor]:
    """(dx, ddecision) of quad_scan: dx = quad_merge(gout), fused with the decision gradient."""
    return _fused_backward(core().quad_scan_bwd, gout, x, x.shape, decision, sy, sx, order)


@_quad_scan_bwd.register_fake
def _(gout, x, decision, sy, sx, order):
    return torch.empty_like(x), torch.empty_like(decision)


@torch.library.custom_op("quadmamba::quad_merge_bwd", mutates_args=())
def _quad_merge_bwd(
    gy: Tensor, ys: Tensor, decision: Tensor, sy: int, sx: int, order: str
) -> tuple[Tensor, Tensor]:
    """(dys, ddecision) of quad_merge: dys = quad_scan(gy), fused with the decision gradient."""
    return _fused_backward(core().quad_merge_bwd, gy, ys, gy.shape, decision, sy, sx, order)


@_quad_merge_bwd.register_fake
def _(gy, ys, decision, sy, sx, order):
    return torch.empty_like(ys), torch.empty_like(decision)


def _quad_scan_setup(ctx, inputs, output):
    x, decision, sy, sx, order = inputs
    ctx.geometry = (x.shape[2], x.shape[3], sy, sx, order)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, decision)


def _quad_scan_backward(ctx, gout):
    x, decision = ctx.saved_tensors
    height, width, sy, sx, order = ctx.geometry
    if ctx.needs_input_grad[1]:
        dx, ddecision = torch.ops.quadmamba.quad_scan_bwd(gout, x, decision, sy, sx, order)
    else:  # the data gradient alone is the merge
        dx, ddecision = torch.ops.quadmamba.quad_merge(gout.contiguous(), decision, height, width, sy, sx, order), None
    return dx, ddecision, None, None, None


_quad_scan.register_autograd(_quad_scan_backward, setup_context=_quad_scan_setup)


def _quad_merge_setup(ctx, inputs, output):
    ys, decision, height, width, sy, sx, order = inputs
    ctx.geometry = (sy, sx, order)
    ctx.save_for_backward(ys if ctx.needs_input_grad[1] else None, decision)


def _quad_merge_backward(ctx, gy):
    ys, decision = ctx.saved_tensors
    sy, sx, order = ctx.geometry
    if ctx.needs_input_grad[1]:
        dys, ddecision = torch.ops.quadmamba.quad_merge_bwd(gy, ys, decision, sy, sx, order)
    else:  # the data gradient alone is the scan
        dys, ddecision = torch.ops.quadmamba.quad_scan(gy.contiguous(), decision, sy, sx, order), None
    return dys, ddecision, None, None, None, None, None


_quad_merge.register_autograd(_quad_merge_backward, setup_context=_quad_merge_setup)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------
def quad_scan(
    x: Tensor, decision: Tensor, shift: tuple[int, int] = (0, 0), order: str = "quadtree"
) -> Tensor:
    """Quadtree sequences of a feature map, both directions, in one pass.

    With x rolled by shift and M the mask of the selected quadrant on the rolled grid:
        seq = Fine(x * M) + Coarse(x * (1 - M)),   out = [seq, reverse(seq)].

    Args:
        x: (B, D, H, W), H and W multiples of 4 (pad before, crop after the merge).
        decision: (B, 4) float, one-hot over quadrants TL, TR, BL, BR (values 0/1, one 1
            per row); gradients flow to it (straight-through estimator).
        shift: cyclic roll (sy, sx) with |sy| < H, |sx| < W, applied before ordering.
        order: "quadtree" (the paper) or "official" (the authors' fine window order).

    Returns:
        (B, 2, D, H*W) in x's dtype.
    """
    _check_tensor(x, "x", 4, "(B, D, H, W)")
    batch, _, height, width = x.shape
    _check_quad_grid(height, width, "x")
    _check_decision(decision, batch, x.device)
    sy, sx = _check_shift(shift, height, width)
    _check_order(order)
    reject_forward_ad("quad_scan", x, decision)
    return torch.ops.quadmamba.quad_scan(x.contiguous(), decision.contiguous(), sy, sx, order)


def quad_merge(
    ys: Tensor,
    decision: Tensor,
    size: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    order: str = "quadtree",
) -> Tensor:
    """Merge the 2 scanned directions back to the (un-rolled) grid: the adjoint of quad_scan.

        seq = ys[:, 0] + reverse(ys[:, 1])
        y   = M * FineInverse(seq) + (1 - M) * CoarseInverse(seq),  then rolled by -shift.

    Args:
        ys: (B, 2, D, H*W).
        decision: (B, 4) float one-hot, as given to quad_scan.
        size: (H, W), multiples of 4.
        shift, order: as given to quad_scan.

    Returns:
        (B, D, H, W) in ys's dtype.
    """
    _check_tensor(ys, "ys", 4, "(B, 2, D, H*W)")
    height, width = _check_size(size)
    _check_quad_grid(height, width, "size")
    batch, directions, _, length = ys.shape
    if directions != 2 or length != height * width:
        raise ValueError(
            f"ys must have shape (B, 2, D, H*W) = (B, 2, D, {height * width}) for size {(height, width)}, "
            f"got {tuple(ys.shape)}"
        )
    _check_decision(decision, batch, ys.device)
    sy, sx = _check_shift(shift, height, width)
    _check_order(order)
    reject_forward_ad("quad_merge", ys, decision)
    return torch.ops.quadmamba.quad_merge(ys.contiguous(), decision.contiguous(), height, width, sy, sx, order)
