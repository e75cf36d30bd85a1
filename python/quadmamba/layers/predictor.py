"""Locality score predictor and the quadrant decision of a quad mixer."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from quadmamba.layers.common import Linear, map_tokens


class ScorePredictor(nn.Module):
    """Per-token locality score: LN(D) -> Linear(D, D) -> GELU -> Linear(D, D/2) -> GELU
    -> Linear(D/2, D/4) -> GELU -> Linear(D/4, 2) -> log-softmax; returns channel 0.

    The predictor acts on every token independently, so it commutes with a roll of
    the grid: score(roll(x)) == roll(score(x)).

    Args:
        dim: inner width D.
        fused: the Linears' oneDNN route on the CPU (see quadmamba.layers.common.Linear).

    Input (B, D, H, W) channel-first; output s (B, H, W), the log-probability of "local".
    """

    def __init__(self, dim: int, *, fused: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, dim, gelu=True, fused=fused)               # GELUs inside fc1..fc3
        self.fc2 = Linear(dim, dim // 2, gelu=True, fused=fused)
        self.fc3 = Linear(dim // 2, dim // 4, gelu=True, fused=fused)
        self.fc4 = Linear(dim // 4, 2, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return map_tokens(self._score, x.permute(0, 2, 3, 1))

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...), token by token."""
        x = self.fc3(self.fc2(self.fc1(self.norm(x))))
        return F.log_softmax(self.fc4(x), dim=-1)[..., 0]


def quadrant_logits(score: torch.Tensor) -> torch.Tensor:
    """Mean of s (B, H, W) over the 4 coarse quadrants -> (B, 4), order TL, TR, BL, BR."""
    batch, height, width = score.shape
    return score.view(batch, 2, height // 2, 2, width // 2).mean(dim=(2, 4)).reshape(batch, 4)


class QuadDecision(nn.Module):
    """Which quadrant to refine: one-hot (B, 4) from the score map (in the scan's frame).

    Training (or ``stochastic_eval``): hard Gumbel-softmax with temperature ``tau`` and the
    straight-through estimator (forward one-hot, backward the soft sample's gradient).
    Eval: deterministic arg-max of the quadrant logits.

    Args:
        tau: Gumbel-softmax temperature.
        stochastic_eval: draw Gumbel noise in eval mode too (the authors' code does).
    """

    def __init__(self, tau: float = 1.0, stochastic_eval: bool = False):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"gumbel_tau must be > 0, got {tau!r}")
        self.tau = float(tau)
        self.stochastic_eval = bool(stochastic_eval)

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        logits = quadrant_logits(score)
        if self.training or self.stochastic_eval:
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)
        index = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(1, index, 1.0)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, stochastic_eval={self.stochastic_eval}"
