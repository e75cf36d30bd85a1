"""Residual blocks (pre-norm): x = x + DropPath(Mixer(LN(x))); x = x + DropPath(MLP(LN(x)))."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from quadmamba.layers.common import DropPath, Mlp, map_tokens
from quadmamba.layers.kernels import ScanOps
from quadmamba.layers.mixers import SS2D, QuadSS2D


class _Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), fused=mixer.ops.kernels == "fused")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(map_tokens(self._mlp_branch, x))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))


class VSSBlock(_Block):
    """Plain block with the cross mixer (SS2D).

    Args:
        dim: width C.
        ssm_ratio, d_state, dt_rank, ops: mixer settings (see SS2D).
        mlp_ratio: MLP hidden width / C.
        drop_path: stochastic-depth probability.

    Input and output (B, H, W, C).
    """

    def __init__(self, dim: int, *, ssm_ratio: float = 1.0, d_state: int = 1,
                 dt_rank: Optional[int] = None, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 ops: ScanOps):
        mixer = SS2D(dim, ssm_ratio=ssm_ratio, d_state=d_state, dt_rank=dt_rank, ops=ops)
        super().__init__(dim, mixer, mlp_ratio, drop_path)


class QuadVSSBlock(_Block):
    """Quadtree block with the quad mixer (QuadSS2D).

    Args:
        dim, ssm_ratio, d_state, dt_rank, mlp_ratio, drop_path, ops: as VSSBlock.
        shift: window-shift direction (sign_y, sign_x) or None (see QuadSS2D).
        quad_scan, compat, gumbel_tau: see QuadSS2D.

    Input and output (B, H, W, C).
    """

    def __init__(self, dim: int, *, ssm_ratio: float = 1.0, d_state: int = 1,
                 dt_rank: Optional[int] = None, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 ops: ScanOps, shift: Optional[Tuple[int, int]] = None,
                 quad_scan: str = "quadtree", compat: str = "paper", gumbel_tau: float = 1.0):
        mixer = QuadSS2D(dim, ssm_ratio=ssm_ratio, d_state=d_state, dt_rank=dt_rank, ops=ops,
                         shift=shift, quad_scan=quad_scan, compat=compat, gumbel_tau=gumbel_tau)
        super().__init__(dim, mixer, mlp_ratio, drop_path)
