"""Token mixers: the selective-scan core shared by the cross mixer (SS2D, 4 directions)
and the quadtree mixer (QuadSS2D, 2 directions).

Mixer (no gate, no biases), channel-last in and out:
    in_proj Linear(C -> D) -> depthwise Conv3x3 -> SiLU -> directions -> scan core
    -> merge -> LayerNorm(D) -> out_proj Linear(D -> C)
Scan core, direction k of K, token t:
    [dt_raw (R), B_k (N), C_k (N)] = x_proj_weight[k] @ x_t
    delta_raw = dt_proj_weight[k] @ dt_raw                          (D values)
    y = selective_scan(x, delta_raw, A = -exp(A_log), B, C, Ds, dt_bias, softplus)
(the scan takes dt_raw and dt_proj_weight and forms delta_raw itself: delta_proj).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from quadmamba.layers.common import Linear, map_tokens
from quadmamba.layers.kernels import ScanOps
from quadmamba.layers.predictor import QuadDecision, ScorePredictor

QUAD_SCANS = ("quadtree", "raster")
COMPATS = ("paper", "official")


class SelectiveScan(nn.Module):
    """The selective scan (no parameters) in float32, even under autocast; a float64 model on
    the CPU scans in float64 (the op's CPU kernels take it; CUDA scans in float32).
    forward takes the op's tensors; delta_proj as (K*D, R) or (K, D, R).

    Holds the op so that hooks (FLOP counting) see each call with its shapes.
    """

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, u, delta, A, B, C, D, delta_bias, delta_proj=None):
        device = u.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return self._scan(u, delta, A, B, C, D, delta_bias, delta_proj)
        # Without autocast no context at all: traced graphs (torch.export) stay flat, the
        # op a node of its own rather than inside an autocast region.
        return self._scan(u, delta, A, B, C, D, delta_bias, delta_proj)

    def _scan(self, u, delta, A, B, C, D, delta_bias, delta_proj):
        dtype = torch.float64 if u.dtype == torch.float64 and u.device.type == "cpu" else torch.float32
        u, delta, A, B, C, D, delta_bias = (t.to(dtype) for t in (u, delta, A, B, C, D, delta_bias))
        if delta_proj is None:
            return self.fn(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
        # (K, D, R) -> (K*D, R) here: a reshaped Parameter passed in would be a view made under
        # no_grad, which module hooks (FlopCounterMode's tracker) cannot follow.
        delta_proj = delta_proj.to(dtype).reshape(-1, delta_proj.shape[-1])
        return self.fn(u, delta, A, B, C, D, delta_bias, delta_softplus=True, delta_proj=delta_proj)


class _SSMBase(nn.Module):
    """Parameters and scan core common to both mixers.

    Args:
        dim: block width C.
        num_directions: K.
        ssm_ratio: D = int(ssm_ratio * C).
        d_state: N.
        dt_rank: R (None: ceil(C / 16)).
        ops: the op table (quadmamba.layers.kernels.get_ops).
    """

    def __init__(self, dim: int, num_directions: int, ssm_ratio: float, d_state: int,
                 dt_rank: Optional[int], ops: ScanOps):
        super().__init__()
        inner = int(ssm_ratio * dim)
        rank = math.ceil(dim / 16) if dt_rank is None else int(dt_rank)
        self.dim, self.inner, self.d_state, self.dt_rank = dim, inner, d_state, rank
        self.num_directions = num_directions
        self.ops = ops
        k = num_directions
        fused = ops.kernels == "fused"
        self.in_proj = Linear(dim, inner, bias=False, fused=fused)
        self.conv = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner, bias=False)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, inner, rank))
        self.dt_bias = nn.Parameter(torch.empty(k * inner))
        self.A_log = nn.Parameter(torch.empty(k * inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * inner))
        self.scan = SelectiveScan(ops.selective_scan)
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = Linear(inner, dim, bias=False, fused=fused)
        init_ssm_(self)

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, D, H, W) after in_proj, depthwise conv, SiLU."""
        x = self.in_proj(x).permute(0, 3, 1, 2)
        return self.act(self.conv(x))

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, H, W, C) through out_norm and out_proj."""
        return map_tokens(self._norm_out, y.permute(0, 2, 3, 1))

    def _norm_out(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.out_norm(y))

    def _scan_core(self, xs: torch.Tensor) -> torch.Tensor:
        """xs (B, K, D, L) -> ys (B, K, D, L) in xs's dtype; the scan itself runs in fp32 (fp64
        for a float64 model on the CPU)."""
        batch, k, inner, length = xs.shape
        # A batched matmul laid out so that its output is already (B, K, rows, L): no permuted
        # copy of xs. The scan projects dts (R rows) to the D deltas itself (delta_proj), so the
        # (B, K, D, L) deltas are never stored.
        x_dbl = torch.matmul(self.x_proj_weight, xs)                      # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        ys = self.scan(
            xs.reshape(batch, k * inner, length), dts.contiguous(),
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            Bs.contiguous(), Cs.contiguous(), self.Ds, self.dt_bias,
            self.dt_proj_weight,                                           # (K, D, R)
        )
        return ys.view(batch, k, inner, length).to(xs.dtype)


class SS2D(_SSMBase):
    """Cross mixer (plain stages): 4 directions (rows, columns, both reversed), merged by
    the adjoint. Parameters as in _SSMBase with K = 4.

    Input and output (B, H, W, C).
    """

    def __init__(self, dim: int, *, ssm_ratio: float = 1.0, d_state: int = 1,
                 dt_rank: Optional[int] = None, ops: ScanOps):
        super().__init__(dim, 4, ssm_ratio, d_state, dt_rank, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._project_in(x)
        size = (x.shape[2], x.shape[3])
        ys = self._scan_core(self.ops.cross_scan(x))
        return self._project_out(self.ops.cross_merge(ys, size))


class QuadSS2D(_SSMBase):
    """Quadtree mixer (quad stages): 2 directions, the quadtree sequence and its reverse.

    Args:
        dim, ssm_ratio, d_state, dt_rank, ops: as _SSMBase (K = 2).
        shift: window-shift direction (sign_y, sign_x) in {-1, +1}^2, or None for no shift;
            the amount is (floor(H/8), floor(W/8)) of the padded grid (half a fine window).
        quad_scan: "quadtree" or "raster" (ablation: raster order + reverse; the
            predictor and shift are unused, parameters unchanged).
        compat: "paper" or "official" (the authors' code: official fine order, Gumbel
            noise in eval, score taken before the shift, amount floor(H/8) on both axes).
        gumbel_tau: Gumbel-softmax temperature.

    Input and output (B, H, W, C); any H, W (padded to multiples of 4 and cropped back).
    """

    def __init__(self, dim: int, *, ssm_ratio: float = 1.0, d_state: int = 1,
                 dt_rank: Optional[int] = None, ops: ScanOps,
                 shift: Optional[Tuple[int, int]] = None, quad_scan: str = "quadtree",
                 compat: str = "paper", gumbel_tau: float = 1.0):
        super().__init__(dim, 2, ssm_ratio, d_state, dt_rank, ops)
        if quad_scan not in QUAD_SCANS:
            raise ValueError(f"quad_scan must be one of {QUAD_SCANS}, got {quad_scan!r}")
        if compat not in COMPATS:
            raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
        if shift is not None and (len(shift) != 2 or any(s not in (-1, 1) for s in shift)):
            raise ValueError(f"shift must be None or a pair of signs in {{-1, +1}}, got {shift!r}")
        self.shift = None if shift is None else (int(shift[0]), int(shift[1]))
        self.quad_scan = quad_scan
        self.compat = compat
        self.order = "official" if compat == "official" else "quadtree"
        self.predictor = ScorePredictor(self.inner, fused=ops.kernels == "fused")
        self.decide = QuadDecision(gumbel_tau, stochastic_eval=compat == "official")

    def shift_amount(self, height: int, width: int) -> Tuple[int, int]:
        """The roll (sy, sx) applied on a padded (H, W) grid."""
        if self.shift is None:
            return (0, 0)
        sy = self.shift[0] * (height // 8)
        sx = self.shift[1] * (height // 8 if self.compat == "official" else width // 8)
        # torch.roll wraps any amount, the quad ops take |s| < size: the official amount
        # floor(H/8) reaches W on a grid about 8x taller than wide, and is wrapped as roll does.
        return (sy, sx if abs(sx) < width else sx % width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._project_in(x)
        if self.quad_scan == "raster":
            return self._project_out(self._raster(x))
        height0, width0 = x.shape[2], x.shape[3]
        pad_h, pad_w = -height0 % 4, -width0 % 4
        if pad_h or pad_w:                                                # F.pad always copies
            x = F.pad(x, (0, pad_w, 0, pad_h))                            # pad
        size = (x.shape[2], x.shape[3])
        shift = self.shift_amount(*size)
        score = self.predictor(x)                                         # image frame
        if self.compat == "paper":
            score = torch.roll(score, shifts=shift, dims=(1, 2))          # scan frame
        decision = self.decide(score).to(x.dtype)
        xs = self.ops.quad_scan(x, decision, shift, self.order)          # shift, gather
        ys = self._scan_core(xs)
        y = self.ops.quad_merge(ys, decision, size, shift, self.order)   # scatter, unshift
        y = y[:, :, :height0, :width0]                                    # crop
        return self._project_out(y)

    def _raster(self, x: torch.Tensor) -> torch.Tensor:
        batch, inner, height, width = x.shape
        seq = x.flatten(2)
        ys = self._scan_core(torch.stack([seq, seq.flip(-1)], dim=1))
        return (ys[:, 0] + ys[:, 1].flip(-1)).view(batch, inner, height, width)

    def extra_repr(self) -> str:
        return f"shift={self.shift}, quad_scan={self.quad_scan!r}, compat={self.compat!r}"


@torch.no_grad()
def init_ssm_(mixer: _SSMBase, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> None:
    """Spec init of the scan parameters: x_proj U(+-1/sqrt(D)); dt_proj U(+-R^-0.5);
    dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] clamped >= dt_floor;
    A_log = log(1..N); Ds = 1."""
    inner, rank, n = mixer.inner, mixer.dt_rank, mixer.d_state
    bound = inner ** -0.5
    mixer.x_proj_weight.uniform_(-bound, bound)
    mixer.dt_proj_weight.uniform_(-rank ** -0.5, rank ** -0.5)
    dt = torch.exp(torch.rand_like(mixer.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))               # softplus^-1(dt)
    a = torch.arange(1, n + 1, dtype=torch.float32, device=mixer.A_log.device)
    mixer.A_log.copy_(torch.log(a).expand_as(mixer.A_log))
    mixer.Ds.fill_(1.0)
