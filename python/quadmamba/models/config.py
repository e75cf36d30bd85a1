"""Model configuration and the named variants."""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Optional, Tuple

from quadmamba.layers.kernels import KERNELS
from quadmamba.layers.mixers import COMPATS, QUAD_SCANS

NUM_STAGES = 4
MAX_D_STATE = 16  # the largest state size N the fused selective scan takes


@dataclass
class QuadMambaConfig:
    """Everything that defines a QuadMamba model (``asdict`` of it rebuilds the model).

    Args:
        dims: stage widths C_0..C_3.
        depths: blocks per stage.
        ssm_ratio: inner width D = ssm_ratio * C.
        d_state: N.
        dt_rank: R; None means ceil(C_stage / 16).
        mlp_ratio: MLP hidden width / C.
        quad_stages: indices of the stages built from quadtree blocks (others: cross blocks).
        num_classes: classifier outputs (0: no head, forward returns pooled features).
        in_chans: image channels.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        drop_rate: dropout on the pooled features before the classifier's Linear (timm's
            ``drop_rate``); 0 in the paper.
        compat: "paper" | "official" (the authors' code, spec 3.6).
        kernels: "fused" | "reference" (plain-PyTorch ops; F.linear for every Linear, where
            "fused" routes float32 CPU Linears through oneDNN, see quadmamba.layers.common.Linear).
        quad_scan: "quadtree" | "raster" (ablation).
        gumbel_tau: Gumbel-softmax temperature of the quadrant decision.
        features_only: build the dense backbone (per-stage normed maps, no head).
        out_indices: stages whose outputs the backbone returns (negative: from the end), kept
            sorted: the maps come in stage order.
        name: the variant name (informational).
    """

    dims: Tuple[int, ...] = (16, 32, 64, 128)
    depths: Tuple[int, ...] = (2, 2, 1, 1)
    ssm_ratio: float = 1.0
    d_state: int = 1
    dt_rank: Optional[int] = None
    mlp_ratio: float = 4.0
    quad_stages: Tuple[int, ...] = (0, 1)
    num_classes: int = 1000
    in_chans: int = 3
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    compat: str = "paper"
    kernels: str = "fused"
    quad_scan: str = "quadtree"
    gumbel_tau: float = 1.0
    features_only: bool = False
    out_indices: Tuple[int, ...] = (0, 1, 2, 3)
    name: str = "quadmamba"

    def __post_init__(self):
        for key in ("dims", "depths", "quad_stages", "out_indices"):
            setattr(self, key, _int_tuple(key, getattr(self, key)))
        for key in ("num_classes", "in_chans", "d_state"):
            setattr(self, key, _int(key, getattr(self, key)))
        if self.dt_rank is not None:
            self.dt_rank = _int("dt_rank", self.dt_rank)
        given_out_indices = self.out_indices
        # in stage order, the order of the maps returned (and of feature_info)
        self.out_indices = tuple(sorted(i + NUM_STAGES if -NUM_STAGES <= i < 0 else i for i in self.out_indices))
        for key in ("ssm_ratio", "mlp_ratio", "drop_path_rate", "drop_rate", "gumbel_tau"):
            setattr(self, key, _real(key, getattr(self, key)))
        if not isinstance(self.features_only, bool):
            raise TypeError(f"features_only must be a bool, got {self.features_only!r}")
        if len(self.dims) != NUM_STAGES or len(self.depths) != NUM_STAGES:
            raise ValueError(f"dims and depths need {NUM_STAGES} entries, got {self.dims} and {self.depths}")
        if any(d <= 0 for d in self.dims) or any(d % 2 for d in self.dims):
            raise ValueError(f"dims must be positive even numbers, got {self.dims}")
        if any(d < 0 for d in self.depths):
            raise ValueError(f"depths must be >= 0, got {self.depths}")
        _check_choice("compat", self.compat, COMPATS)
        _check_choice("kernels", self.kernels, KERNELS)
        _check_choice("quad_scan", self.quad_scan, QUAD_SCANS)
        if not set(self.quad_stages) <= set(range(NUM_STAGES)):
            raise ValueError(f"quad_stages must be within 0..{NUM_STAGES - 1}, got {self.quad_stages}")
        if not self.out_indices or not set(self.out_indices) <= set(range(NUM_STAGES)) \
                or len(set(self.out_indices)) != len(self.out_indices):
            raise ValueError(f"out_indices must be distinct values in 0..{NUM_STAGES - 1} (or -{NUM_STAGES}..-1 "
                             f"from the end), got {given_out_indices}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.in_chans <= 0:
            raise ValueError(f"in_chans must be > 0, got {self.in_chans}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if not self.gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if not (self.ssm_ratio > 0 and self.mlp_ratio > 0 and self.d_state > 0):
            raise ValueError("ssm_ratio, d_state and mlp_ratio must be positive, got "
                             f"{self.ssm_ratio}, {self.d_state}, {self.mlp_ratio}")
        if self.kernels == "fused" and self.d_state > MAX_D_STATE:
            raise ValueError(f"d_state must be at most {MAX_D_STATE} with the fused kernels (the "
                             f"reference kernels take any), got {self.d_state}")
        if self.dt_rank is not None and self.dt_rank < 1:
            raise ValueError(f"dt_rank must be >= 1 (or None for ceil(C / 16)), got {self.dt_rank}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _int_tuple(name: str, value) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    items = tuple(value)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    return tuple(int(v) for v in items)


# name -> (dims, depths, ssm_ratio, default drop_path_rate)
_VARIANTS = {
    "quadmamba_nano": ((16, 32, 64, 128), (2, 2, 1, 1), 1.0, 0.0),
    "quadmamba_li": ((48, 96, 192, 384), (2, 2, 2, 2), 1.0, 0.1),
    "quadmamba_t": ((64, 128, 256, 512), (2, 6, 2, 2), 1.0, 0.1),
    "quadmamba_s": ((96, 192, 384, 768), (2, 2, 5, 2), 2.0, 0.2),
    "quadmamba_b": ((96, 192, 384, 768), (2, 2, 15, 2), 2.0, 0.3),
}


def list_models() -> list:
    """Names accepted by create_model / get_config."""
    return list(_VARIANTS)


def get_config(name: str, **overrides) -> QuadMambaConfig:
    """The configuration of a named variant, with field overrides (unknown fields raise;
    drop_path_rate=None keeps the variant's default)."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {list_models()}")
    valid = {f.name for f in fields(QuadMambaConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; valid fields: {sorted(valid)}")
    dims, depths, ratio, dpr = _VARIANTS[name]
    settings = dict(dims=dims, depths=depths, ssm_ratio=ratio, drop_path_rate=dpr, name=name)
    settings.update(overrides)
    if settings["drop_path_rate"] is None:
        settings["drop_path_rate"] = dpr
    return QuadMambaConfig(**settings)
