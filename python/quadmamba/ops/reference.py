"""Plain-PyTorch references: the specification of every op in quadmamba.ops.

Each ``<op>_ref`` computes exactly what the fused kernel ``quadmamba.ops.<op>``
computes, with ordinary (differentiable) PyTorch operations. Tests compare the
kernels against these; benchmarks time them side by side.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

QUAD_ORDERS = ("quadtree", "official")


# ---------------------------------------------------------------------------
# Selective scan (S6)
# ---------------------------------------------------------------------------
def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    out_dtype: torch.dtype | None = None,
    delta_proj: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selective scan, one step at a time.

    For batch b, channel d of group k = d // (KD / K), step t, state h in R^N, h = 0 before t = 0:
        dl_t = softplus(delta[b, d, t] + delta_bias[d])      (softplus optional)
        h_t  = exp(dl_t * A[d, :]) * h_{t-1} + dl_t * B[b, k, :, t] * u[b, d, t]
        y_t  = <C[b, k, :, t], h_t> + D[d] * u[b, d, t]
    With delta_proj, delta is low-rank and stands for project_delta(delta, delta_proj).

    Args:
        u: (B, K*D, L).
        delta: (B, K*D, L), or (B, K, R, L) with delta_proj.
        A: (K*D, N), real.
        B, C: (B, K, N, L), shared by the K*D/K channels of their group.
        D, delta_bias: (K*D,) or None.
        delta_softplus: apply softplus to delta + delta_bias.
        out_dtype: y's dtype: None (u's dtype), u's dtype or torch.float32.
        delta_proj: (K*D, R) or None.

    Returns:
        y (B, K*D, L) in u's dtype (or out_dtype); computed in float32 (float64 for float64 inputs).
    """
    dtype_out = scan_out_dtype("selective_scan_ref", u, out_dtype)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_proj is not None:
        delta = project_delta(delta, delta_proj.to(compute))
    batch, channels, length = u.shape
    groups = B.shape[1]
    per_group = channels // groups

    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = B.repeat_interleave(per_group, dim=1)  # (B, KD, N, L)
    Cx = C.repeat_interleave(per_group, dim=1)
    decay = torch.exp(delta.unsqueeze(2) * A[None, :, :, None])  # (B, KD, N, L)
    drive = delta.unsqueeze(2) * Bx * u.unsqueeze(2)
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    # unbind gives one view per step, so the backward stays linear in L.
    for decay_t, drive_t, c_t in zip(decay.unbind(-1), drive.unbind(-1), Cx.unbind(-1)):
        h = decay_t * h + drive_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    return y.to(dtype_out)


def project_delta(delta: torch.Tensor, delta_proj: torch.Tensor) -> torch.Tensor:
    """The full delta of a low-rank one: (B, K, R, L), (K*D, R) -> (B, K*D, L),
        out[b, d, t] = sum_r delta_proj[d, r] * delta[b, k, r, t]      (k = d // (K*D / K)),
    the projection the models apply to their R-dimensional delta (dt_proj)."""
    if delta.dim() != 4 or delta_proj.dim() != 2:
        raise ValueError(f"project_delta: delta must be (B, K, R, L) and delta_proj (K*D, R), got shapes "
                         f"{tuple(delta.shape)} and {tuple(delta_proj.shape)}")
    batch, groups, rank, length = delta.shape
    if delta_proj.shape[1] != rank or groups < 1 or delta_proj.shape[0] % groups:
        raise ValueError(f"project_delta: delta_proj must be (K*D, R) with R = {rank} and K = {groups} dividing "
                         f"its rows, got shape {tuple(delta_proj.shape)}")
    return torch.matmul(delta_proj.reshape(groups, -1, rank), delta).reshape(batch, -1, length)


def scan_out_dtype(op: str, u: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """y's dtype for a selective scan's out_dtype argument: u's dtype (None) or float32."""
    if out_dtype is not None and out_dtype not in (u.dtype, torch.float32):
        raise TypeError(f"{op}: out_dtype must be None, u's dtype ({u.dtype}) or torch.float32, got {out_dtype}")
    return u.dtype if out_dtype is None else out_dtype


def _segsum_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x[..., s+1] + ... + x[..., t]) for s <= t and 0 above the diagonal: (..., T) -> (..., T, T)."""
    length = x.shape[-1]
    cum = x.cumsum(-1)
    seg = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return torch.exp(seg.masked_fill(~causal, float("-inf")))


def selective_scan_chunked_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    chunk: int = 32,
) -> torch.Tensor:
    """The same function as selective_scan_ref, vectorised over time in chunks.

    Within a chunk of T steps the state is a masked sum (no division by decays,
    so no overflow):
        h_t = sum_{s <= t} exp(sum_{r = s+1..t} dl_r A) dl_s u_s B_s + exp(sum_{r <= t} dl_r A) h_start,
    and the chunk-start states follow from the chunk-end states with the same
    formula one level up (over chunks). Memory is O(B * KD * N * L * T); a plain
    PyTorch formulation used as a second reference and as a speed baseline.
    """
    dtype_out = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    batch, channels, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    per_group = channels // groups
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    dl = F.softplus(delta) if delta_softplus else delta
    pad = (-length) % chunk
    # Padding steps have dl = 0 and u = 0: decay 1, no drive (identity steps at the end).
    dl_p, u_p = F.pad(dl, (0, pad)), F.pad(u, (0, pad))
    B_p, C_p = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    chunks = (length + pad) // chunk
    shape = (batch, groups, per_group, dstate, chunks, chunk)
    log_decay = (dl_p.unsqueeze(2) * A[None, :, :, None]).view(shape)  # dl_t A, (B, K, Dg, N, nc, T)
    drive = (dl_p * u_p).view(batch, groups, per_group, 1, chunks, chunk) * B_p.view(
        batch, groups, 1, dstate, chunks, chunk
    )
    h_local = torch.einsum("...ts,...s->...t", _segsum_exp(log_decay), drive)  # from a zero start
    # Chunk-start states: H_c = sum_{c' < c} exp(sum of chunks c'+1 .. c-1 totals) h_local[c', -1].
    totals = log_decay.sum(-1)  # (B, K, Dg, N, nc)
    carry = torch.einsum("...cs,...s->...c", _segsum_exp(totals), h_local[..., -1])  # state at chunk end
    start = F.pad(carry[..., :-1], (1, 0))  # state before each chunk
    h = h_local + torch.exp(log_decay.cumsum(-1)) * start.unsqueeze(-1)
    y = (h * C_p.view(batch, groups, 1, dstate, chunks, chunk)).sum(3)  # (B, K, Dg, nc, T)
    y = y.reshape(batch, channels, chunks * chunk)[..., :length]
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    return y.to(dtype_out)


# ---------------------------------------------------------------------------
# Quadtree scan (quad stages)
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _quad_orders_cpu(height: int, width: int, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Built outside inference mode: the cache outlives the caller's mode, and an
    # inference tensor could not be saved for a later backward.
    with torch.inference_mode(False):
        return _build_quad_orders(height, width, order)


def _build_quad_orders(height: int, width: int, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.arange(height * width).view(height, width)
    # Coarse: view (q1, r, q2, c), order (q1, q2, r, c).
    coarse = grid.view(2, height // 2, 2, width // 2).permute(0, 2, 1, 3).reshape(-1)
    # Fine: view (q1, q3, r, q2, q4, c).
    fine6 = grid.view(2, 2, height // 4, 2, 2, width // 4)
    if order == "quadtree":  # order (q1, q2, q3, q4, r, c): sub-quadrants inside each quadrant
        fine = fine6.permute(0, 3, 1, 4, 2, 5).reshape(-1)
    else:  # "official": order (q1, q3, q2, q4, r, c), a plain H/4 x W/4 window scan
        fine = fine6.permute(0, 1, 3, 4, 2, 5).reshape(-1)
    return coarse, fine


def quad_orders(height: int, width: int, order: str = "quadtree", device=None):
    """The two sequence orders of an (H, W) grid (H, W multiples of 4).

    Returns (coarse, fine): int64 tensors of length L = H*W mapping sequence slot p
    to the raster index y*W + x of the token it reads. Both place the tokens of
    quadrant q (0 TL, 1 TR, 2 BL, 3 BR) in slots [q*L/4, (q+1)*L/4).
    """
    if order not in QUAD_ORDERS:
        raise ValueError(f"order must be one of {QUAD_ORDERS}, got {order!r}")
    if height % 4 or width % 4 or height <= 0 or width <= 0:
        raise ValueError(f"quad orders need H and W positive multiples of 4, got {height}x{width}")
    coarse, fine = _quad_orders_cpu(height, width, order)
    return coarse.to(device), fine.to(device)


def quad_mask(decision: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-token mask M (B, 1, H, W): decision[b, 2*(y >= H/2) + (x >= W/2)]."""
    m = decision.view(-1, 1, 2, 2)
    return m.repeat_interleave(height // 2, dim=2).repeat_interleave(width // 2, dim=3)


def quad_scan_ref(
    x: torch.Tensor,
    decision: torch.Tensor,
    shift: tuple[int, int] = (0, 0),
    order: str = "quadtree",
) -> torch.Tensor:
    """Quadtree sequences of a feature map: the scan's 2 directions.

    x is rolled by shift = (sy, sx) (torch.roll over (H, W)); M is the mask of the
    selected quadrant on the rolled grid; then
        seq = Fine(x * M) + Coarse(x * (1 - M)),   out = [seq, reverse(seq)].

    Args:
        x: (B, D, H, W), H and W multiples of 4.
        decision: (B, 4) float, one-hot over quadrants TL, TR, BL, BR (gradients flow to it).
        shift: cyclic roll (sy, sx) applied before ordering.
        order: "quadtree" (the paper) or "official" (the authors' fine order).

    Returns:
        (B, 2, D, H*W).
    """
    batch, channels, height, width = x.shape
    if shift != (0, 0):
        x = torch.roll(x, shifts=tuple(shift), dims=(2, 3))
    coarse, fine = quad_orders(height, width, order, x.device)
    mask = quad_mask(decision.to(x.dtype), height, width).flatten(2)  # (B, 1, L)
    flat = x.flatten(2)
    seq = (flat * mask)[..., fine] + (flat * (1 - mask))[..., coarse]
    return torch.stack([seq, seq.flip(-1)], dim=1)


def quad_merge_ref(
    ys: torch.Tensor,
    decision: torch.Tensor,
    size: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    order: str = "quadtree",
) -> torch.Tensor:
    """Merge the 2 scanned directions back to the raster grid: the adjoint of quad_scan_ref.

        seq = ys[:, 0] + reverse(ys[:, 1])
        y   = M * FineInverse(seq) + (1 - M) * CoarseInverse(seq),  then rolled by -shift.

    Args:
        ys: (B, 2, D, H*W).
        decision: (B, 4) float one-hot, as given to quad_scan.
        size: (H, W).
        shift, order: as given to quad_scan.

    Returns:
        (B, D, H, W).
    """
    height, width = size
    batch, _, channels, length = ys.shape
    coarse, fine = quad_orders(height, width, order, ys.device)
    seq = ys[:, 0] + ys[:, 1].flip(-1)
    mask = quad_mask(decision.to(ys.dtype), height, width).flatten(2)
    y = mask * seq[..., torch.argsort(fine)] + (1 - mask) * seq[..., torch.argsort(coarse)]
    y = y.view(batch, channels, height, width)
    if shift != (0, 0):
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(2, 3))
    return y


# ---------------------------------------------------------------------------
# Cross scan (plain stages)
# ---------------------------------------------------------------------------
def cross_scan_ref(x: torch.Tensor) -> torch.Tensor:
    """The 4 directions of a feature map: row-major, column-major, and both reversed.

    Args:
        x: (B, D, H, W).

    Returns:
        (B, 4, D, H*W).
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def cross_merge_ref(ys: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The adjoint of cross_scan_ref: sum of the 4 directions mapped back to raster.

    Args:
        ys: (B, 4, D, H*W).
        size: (H, W).

    Returns:
        (B, D, H, W).
    """
    height, width = size
    batch, _, channels, _ = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    cols = cols.view(batch, channels, width, height).transpose(2, 3)
    return rows.view(batch, channels, height, width) + cols
