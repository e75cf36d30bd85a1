"""Selective scan (S6) backed by the compiled core, forward and backward.

``selective_scan`` computes exactly ``reference.selective_scan_ref`` (see there and
cpp/include/quadmamba/selective_scan.h for the math). It is registered as the
custom op ``quadmamba::selective_scan`` (with a fake implementation and autograd),
so ``torch.compile(fullgraph=True)``, ``torch.library.opcheck`` and
``FlopCounterMode`` see a single op.

Precision: the scan always runs in float32 (float64 for float64 inputs). On the CPU,
float16/bfloat16 inputs are upcast to float32 first; on CUDA the kernels read them
directly. The output has the dtype of ``u`` (or float32 with ``out_dtype=torch.float32``:
y before its rounding to a 16-bit ``u``); each gradient has the dtype of its input.
Autocast does not touch the op: it takes the dtypes it is given.

Determinism: the CPU backward always reduces in a fixed order. The CUDA backward uses
atomics unless ``torch.are_deterministic_algorithms_enabled()``, then fixed-order
reductions of per-row partial sums.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from quadmamba import _backend
from quadmamba.ops.reference import project_delta, scan_out_dtype

__all__ = ["selective_scan"]

_SCAN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PARAM_DTYPES = (torch.float32, torch.float64)
MAX_DSTATE = 16


def _check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"selective_scan: {name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"selective_scan: {name} must be {what}, got shape {tuple(t.shape)}")


def _validate(u, delta, A, B, C, D, delta_bias, delta_proj=None) -> None:
    _check_tensor("u", u, 3, "of shape (B, KD, L)")
    if delta_proj is None:
        _check_tensor("delta", delta, 3, "of shape (B, KD, L) (or (B, K, R, L) with delta_proj)")
    else:
        _check_tensor("delta_proj", delta_proj, 2, "of shape (KD, R)")
        _check_tensor("delta", delta, 4, "of shape (B, K, R, L) with delta_proj")
    _check_tensor("A", A, 2, "of shape (KD, N)")
    _check_tensor("B", B, 4, "of shape (B, K, N, L)")
    _check_tensor("C", C, 4, "of shape (B, K, N, L)")
    if D is not None:
        _check_tensor("D", D, 1, "of shape (KD,)")
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, 1, "of shape (KD,)")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError(f"selective_scan: u has sequence length L = 0 (shape {tuple(u.shape)}); L must be >= 1")
    if delta_proj is None and tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.shape[0] != channels:
        raise ValueError(f"selective_scan: A must be (KD={channels}, N), got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"selective_scan: A's state size N must be in [1, {MAX_DSTATE}], got N = {dstate}")
    groups = B.shape[1]
    if groups < 1 or channels % groups:
        raise ValueError(
            f"selective_scan: B's group count K = {groups} must divide KD = {channels} (B has shape {tuple(B.shape)})"
        )
    expected = (batch, groups, dstate, length)
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != expected:
            raise ValueError(f"selective_scan: {name} must be (B, K, N, L) = {expected}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"selective_scan: {name} must be (KD,) = ({channels},), got {tuple(t.shape)}")
    if delta_proj is not None:
        rank = delta_proj.shape[1]
        if delta_proj.shape[0] != channels or rank < 1:
            raise ValueError(f"selective_scan: delta_proj must be (KD={channels}, R) with R >= 1, "
                             f"got shape {tuple(delta_proj.shape)}")
        if tuple(delta.shape) != (batch, groups, rank, length):
            raise ValueError(f"selective_scan: with delta_proj, delta must be (B, K, R, L) = "
                             f"{(batch, groups, rank, length)}, got {tuple(delta.shape)}")
    if u.dtype not in _SCAN_DTYPES:
        raise TypeError(f"selective_scan: u must be float32, float64, float16 or bfloat16, got {u.dtype}")
    for name, t in (("delta", delta), ("B", B), ("C", C)):
        if t.dtype != u.dtype:
            raise TypeError(f"selective_scan: {name} must have u's dtype {u.dtype}, got {t.dtype}")
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias), ("delta_proj", delta_proj)):
        if t is not None and t.dtype not in _PARAM_DTYPES:
            raise TypeError(f"selective_scan: {name} must be float32 or float64, got {t.dtype}")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias),
                    ("delta_proj", delta_proj)):
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
    if u.device.type == "cuda" and u.dtype == torch.float64:
        raise TypeError("selective_scan: float64 runs on the CPU only; CUDA takes float32, float16 or bfloat16")
    # A host-side check: on CUDA it would synchronise every call, so it runs on the CPU only.
    if u.device.type == "cpu" and not torch.compiler.is_compiling():
        try:
            finite = bool(torch.isfinite(A).all())
        except RuntimeError:   # no values to read: a transform such as torch.func.vmap maps over A
            raise NotImplementedError(
                "selective_scan: A's values cannot be read to check that they are finite (as under "
                "torch.func.vmap over A); map over u, delta, B, C only") from None
        if not finite:
            raise ValueError("selective_scan: A has non-finite values (inf or nan)")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    out_dtype: Optional[torch.dtype] = None,
    delta_proj: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Selective scan y = S6(u, delta, A, B, C, D, delta_bias); differentiable in every tensor.

    For batch b, channel d of group k = d // (KD / K), step t, state h in R^N (h = 0 before t = 0):
        dl_t = softplus(delta[b, d, t] + delta_bias[d])      (softplus if delta_softplus)
        h_t  = exp(dl_t * A[d, :]) * h_{t-1} + dl_t * B[b, k, :, t] * u[b, d, t]
        y_t  = <C[b, k, :, t], h_t> + D[d] * u[b, d, t]
    With delta_proj, delta is low-rank, (B, K, R, L), and delta[b, d, t] above stands for
        sum_r delta_proj[d, r] * delta[b, k, r, t]            (reference.project_delta)
    the models' dt_proj: the CPU kernels form it tile by tile, never storing the (B, KD, L)
    tensor (CUDA forms it with a matrix product before its kernels).

    Args:
        u, delta: (B, KD, L), float32 / float64 / float16 / bfloat16 (float64 on CPU only);
            delta (B, K, R, L) with delta_proj.
        A: (KD, N) float32 or float64, 1 <= N <= 16, finite.
        B, C: (B, K, N, L), u's dtype; K divides KD.
        D, delta_bias: (KD,) float32 or float64, or None.
        delta_softplus: apply softplus to delta + delta_bias.
        out_dtype: y's dtype: None or u's dtype, or torch.float32 (for float16 / bfloat16 u:
            the float32 result unrounded; for float64 u: rounded to float32).
        delta_proj: (KD, R) float32 or float64, or None.

    Returns:
        y: (B, KD, L) in u's dtype, or out_dtype.
    """
    _validate(u, delta, A, B, C, D, delta_bias, delta_proj)
    _backend.reject_forward_ad("selective_scan", u, delta, A, B, C, D, delta_bias, delta_proj)
    out_float32 = _out_float32(u, out_dtype)
    u, delta, A, B, C, D, delta_bias, delta_proj = (
        None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, delta_bias, delta_proj))
    return torch.ops.quadmamba.selective_scan(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_float32,
                                              delta_proj)


def _out_float32(u: torch.Tensor, out_dtype) -> bool:
    """Whether y is float32 where u is not (out_dtype=torch.float32); checks out_dtype."""
    return scan_out_dtype("selective_scan", u, out_dtype) != u.dtype


def _y_dtype(u: torch.Tensor, out_float32: bool) -> torch.dtype:
    return torch.float32 if out_float32 else u.dtype


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _cast(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


@torch.library.custom_op("quadmamba::selective_scan", mutates_args=())
def _selective_scan_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    out_float32: bool,
    delta_proj: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    core = _backend.core()
    out_dtype = _y_dtype(u, out_float32)
    if u.numel() == 0:  # no batch or no channels (L = 0 is refused by the public function)
        return u.new_zeros(u.shape, dtype=out_dtype)
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    if u.device.type == "cuda":
        if delta_proj is not None:   # the CUDA kernels read a full delta
            delta = _project_cuda(delta, delta_proj, u.dtype)
        # The kernel reads u, delta, B, C in their own dtype; A, D, delta_bias in float32;
        # it writes y in u's dtype or float32.
        params = [_cast(t, torch.float32) for t in (A, D, delta_bias)]
        y = torch.empty_like(u, dtype=out_dtype)
        core.selective_scan_fwd(
            _backend.view(u), _backend.view(delta), _backend.view(params[0]), _backend.view(B),
            _backend.view(C), _backend.view(params[1]), _backend.view(params[2]), delta_softplus,
            _backend.view(y), _backend.stream(u),
        )
        return y
    compute = _compute_dtype(u)
    uc, dc, Ac, Bc, Cc, Dc, bc, pc = (_cast(t, compute) for t in (u, delta, A, B, C, D, delta_bias, delta_proj))
    y = torch.empty_like(uc)
    core.selective_scan_fwd(
        _backend.view(uc), _backend.view(dc), _backend.view(Ac), _backend.view(Bc), _backend.view(Cc),
        _backend.view(Dc), _backend.view(bc), delta_softplus, _backend.view(y), 0, _backend.view(pc),
    )
    return y.to(out_dtype)


def _project_cuda(delta: torch.Tensor, delta_proj: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full delta (B, KD, L) of a low-rank one for the CUDA kernels, in float32, stored in
    the data's dtype (as a full delta would come)."""
    return project_delta(delta.float(), delta_proj.float()).to(dtype).contiguous()


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float32, delta_proj=None):
    return u.new_empty(u.shape, dtype=_y_dtype(u, out_float32))   # contiguous, as the kernels write it


@torch.library.custom_op("quadmamba::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(
    dy: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    delta_proj: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype
    (dD, ddelta_bias in A's dtype when D / delta_bias are None). With delta_proj, ddelta is the
    gradient of the projected delta, (B, KD, L) in the compute dtype (_ddelta_meta)."""
    core = _backend.core()
    batch, channels, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dD_dtype = A.dtype if D is None else D.dtype
    dbias_dtype = A.dtype if delta_bias is None else delta_bias.dtype
    ddelta_shape, ddelta_dtype = _ddelta_meta(u, delta, delta_proj)
    if u.numel() == 0:  # no batch or no channels: every gradient is an empty sum
        return (u.new_zeros(u.shape), u.new_zeros(ddelta_shape, dtype=ddelta_dtype), A.new_zeros(A.shape),
                B.new_zeros(B.shape), C.new_zeros(C.shape), u.new_zeros(channels, dtype=dD_dtype),
                u.new_zeros(channels, dtype=dbias_dtype))
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    if u.device.type == "cuda":
        if delta_proj is not None:   # the CUDA kernels read a full delta
            delta = _project_cuda(delta, delta_proj, u.dtype)
            delta_proj = None
        f32 = torch.float32
        A32, D32, b32 = (_cast(t, f32) for t in (A, D, delta_bias))
        # The kernel reads dy in the data's dtype. A float32 y (out_dtype=torch.float32 with
        # float16 / bfloat16 data) has a float32 dy: rather than round it to 16 bits, the
        # backward then runs on float32 copies of the data (as the CPU does).
        data = (u, delta, B, C)
        if dy.dtype == f32 and u.dtype != f32:
            data = tuple(t.to(f32) for t in data)
        ku, kdelta, kB, kC = data
        dy = dy.to(ku.dtype).contiguous()
        du = torch.empty_like(ku)
        ddelta = torch.empty_like(ku)
        # Accumulated with atomics (float32, zeroed), or, under
        # torch.use_deterministic_algorithms(True), written by fixed-order reductions of
        # per-row partial sums (bitwise repeatable; one more pass over 2 * B*KD*N*L floats).
        deterministic = torch.are_deterministic_algorithms_enabled()
        partials = row_partials = None
        if deterministic:
            partials = torch.empty(2, batch, channels, dstate, length, dtype=f32, device=u.device)
            row_partials = torch.empty(batch, channels, dstate + 2, dtype=f32, device=u.device)
        dA = torch.zeros(channels, dstate, dtype=f32, device=u.device)
        dB = torch.zeros(batch, groups, dstate, length, dtype=f32, device=u.device)
        dC = torch.zeros_like(dB)
        dD = torch.zeros(channels, dtype=f32, device=u.device)
        dbias = torch.zeros_like(dD)
        chunk = core.selective_scan_chunk_cuda()
        workspace = torch.empty(batch, channels, (length + chunk - 1) // chunk, dstate, dtype=f32, device=u.device)
        v = _backend.view
        core.selective_scan_bwd(
            v(ku), v(kdelta), v(A32), v(kB), v(kC), v(D32), v(b32), delta_softplus, v(dy), v(du), v(ddelta),
            v(dA), v(dB), v(dC), v(dD), v(dbias), v(workspace), v(partials), v(row_partials),
            _backend.stream(ku),
        )
    else:
        compute = _compute_dtype(u)
        uc, dc, Ac, Bc, Cc, Dc, bc, gc, pc = (_cast(t, compute) for t in (u, delta, A, B, C, D, delta_bias, dy,
                                                                         delta_proj))
        du = torch.empty_like(uc)
        ddelta = torch.empty_like(uc)
        dA = torch.empty_like(Ac)
        dB = torch.empty_like(Bc)
        dC = torch.empty_like(Cc)
        dD = torch.empty(channels, dtype=compute)
        dbias = torch.empty(channels, dtype=compute)
        v = _backend.view
        core.selective_scan_bwd(
            v(uc), v(dc), v(Ac), v(Bc), v(Cc), v(Dc), v(bc), delta_softplus, v(gc), v(du), v(ddelta),
            v(dA), v(dB), v(dC), v(dD), v(dbias), None, None, None, 0, v(pc),
        )
    return (
        du.to(u.dtype), ddelta.to(ddelta_dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.to(dD_dtype), dbias.to(dbias_dtype),
    )


def _ddelta_meta(u: torch.Tensor, delta: torch.Tensor, delta_proj: Optional[torch.Tensor]):
    """Shape and dtype of the backward's ddelta: delta's, or with delta_proj the projected
    delta's (B, KD, L) in the compute dtype (float32, float64 for float64 data), from which
    _backward forms the gradients of delta and delta_proj."""
    if delta_proj is None:
        return delta.shape, delta.dtype
    return u.shape, _compute_dtype(u)


@_selective_scan_bwd_op.register_fake
def _(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, delta_proj=None):
    channels = u.shape[1]
    dD_dtype = A.dtype if D is None else D.dtype
    dbias_dtype = A.dtype if delta_bias is None else delta_bias.dtype
    ddelta_shape, ddelta_dtype = _ddelta_meta(u, delta, delta_proj)
    return (   # contiguous, as the kernels write them
        u.new_empty(u.shape), u.new_empty(ddelta_shape, dtype=ddelta_dtype), A.new_empty(A.shape),
        B.new_empty(B.shape), C.new_empty(C.shape), u.new_empty(channels, dtype=dD_dtype),
        u.new_empty(channels, dtype=dbias_dtype),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, _, delta_proj = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, delta_proj)
    ctx.delta_softplus = delta_softplus
    ctx.has_D = D is not None
    ctx.has_bias = delta_bias is not None


def _backward(ctx, dy):
    u, delta, A, B, C, D, delta_bias, delta_proj = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = torch.ops.quadmamba.selective_scan_bwd(
        dy.contiguous(), u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, delta_proj
    )
    dproj = None
    if delta_proj is not None:
        # ddelta is the gradient of project_delta(delta, delta_proj) (B, KD, L):
        #   d delta[b, k, r, t] = sum_{d in k} delta_proj[d, r] ddelta[b, d, t]
        #   d delta_proj[d, r]  = sum_{b, t} ddelta[b, d, t] delta[b, k, r, t]
        batch, groups, rank, length = delta.shape
        g = ddelta.view(batch, groups, -1, length)
        w = delta_proj.to(g.dtype).view(groups, -1, rank)
        dproj = torch.matmul(g, delta.to(g.dtype).transpose(-1, -2)).sum(0).view(-1, rank).to(delta_proj.dtype)
        ddelta = torch.matmul(w.transpose(-1, -2), g).to(delta.dtype)
    return (du, ddelta, dA, dB, dC, (dD if ctx.has_D else None), (dbias if ctx.has_bias else None), None, None,
            dproj)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_flops(batch: int, channels: int, length: int, dstate: int, rank: int = 0,
                         with_skip: bool = True) -> int:
    """Forward FLOPs of one call, fvcore / paper convention (one per multiply-add):
    9 * B * L * KD * N for the scan plus B * KD * L for the skip term (with_skip), plus
    B * KD * L * R for a low-rank delta's projection (delta_proj of rank R)."""
    return 9 * batch * length * channels * dstate + batch * channels * length * (rank + int(with_skip))


def _rank(delta_shape, delta_proj_shape) -> int:
    return delta_shape[2] if delta_proj_shape is not None else 0


@register_flop_formula(torch.ops.quadmamba.selective_scan)
def _selective_scan_flop(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape=None, bias_shape=None,
                         softplus=True, out_float32=False, delta_proj_shape=None, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts 2 per multiply-add (as it does for matmuls), so twice the
    # fvcore-style count: FlopCounterMode totals / 2 are the paper's GFLOPs.
    batch, channels, length = u_shape
    return 2 * selective_scan_flops(batch, channels, length, A_shape[1], _rank(delta_shape, delta_proj_shape))


@register_flop_formula(torch.ops.quadmamba.selective_scan_bwd)
def _selective_scan_bwd_flop(dy_shape, u_shape, delta_shape, A_shape, B_shape=None, C_shape=None, D_shape=None,
                             bias_shape=None, softplus=True, delta_proj_shape=None, out_shape=None, **kwargs) -> int:
    # The backward recomputes the forward and runs the adjoint scan: counted as twice the forward
    # (the gradients of a low-rank delta and of delta_proj are matmuls of their own).
    batch, channels, length = u_shape
    return 4 * selective_scan_flops(batch, channels, length, A_shape[1], _rank(delta_shape, delta_proj_shape))
