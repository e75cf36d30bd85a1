"""Optional registration with timm and mmengine (never done at import time).

    from quadmamba.models.integrations import register_timm, register_mmengine
    if register_timm():
        timm.create_model("quadmamba_t", num_classes=10, drop_rate=0.1)
    if register_mmengine():
        MODELS.build(dict(type="QuadMambaBackbone", arch="quadmamba_t", out_indices=(0, 1, 2, 3),
                          frozen_stages=1, init_cfg=dict(type="Pretrained", checkpoint="t.pth")))

Both return False when the library cannot be imported (timm raises RuntimeError, not only
ImportError, when its torchvision does not match the installed torch); the reason is kept
in ``unavailable_reason``. Registering twice is harmless.
"""
from __future__ import annotations

import copy
import inspect
from typing import Dict, Optional, Sequence

import torch.nn as nn

from quadmamba.models.config import NUM_STAGES, get_config, list_models
from quadmamba.models.quadmamba import QuadMamba, create_model

unavailable_reason: Dict[str, str] = {}
_registered: Dict[str, bool] = {}

# What timm.create_model passes to every entry point and has no meaning here.
_TIMM_DROPPED = ("pretrained_cfg", "cache_dir")
# timm's creation arguments an entry point takes besides create_model's own.
_TIMM_ARGS = ("pretrained", "pretrained_cfg_overlay", "img_size", "global_pool", "output_stride", "device",
              "dtype")


def _timm_entry(name: str):
    def entry(pretrained: bool = False, **kwargs) -> QuadMamba:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are distributed; load a checkpoint "
                             "with quadmamba.models.convert.load_official instead")
        for key in _TIMM_DROPPED:
            kwargs.pop(key, None)
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        if not isinstance(overlay, dict):
            raise TypeError(f"{name}: pretrained_cfg_overlay must be a dict, got {overlay!r}")
        img_size = kwargs.pop("img_size", None)
        size = _image_size(name, img_size) if img_size is not None else None
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        global_pool = kwargs.pop("global_pool", None)
        if global_pool not in (None, "avg"):
            raise ValueError(f"{name}: global_pool must be 'avg' (the head's pooling), got {global_pool!r}")
        output_stride = kwargs.pop("output_stride", None)
        if output_stride not in (None, 32):
            raise ValueError(f"{name}: output_stride must be 32 (the strides are fixed: 4, 8, 16, 32), "
                             f"got {output_stride!r}")
        out = kwargs.get("out_indices")
        if isinstance(out, int) and not isinstance(out, bool):   # timm: an int n is the last n stages
            if not 0 < out <= NUM_STAGES:
                raise ValueError(f"{name}: out_indices as an int takes the last n stages, n in "
                                 f"1..{NUM_STAGES}, got {out}")
            kwargs["out_indices"] = tuple(range(NUM_STAGES - out, NUM_STAGES))
        allowed = set(inspect.signature(create_model).parameters) - {"name"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"{name}: unsupported arguments {unknown}; the model takes {sorted(allowed)} "
                            f"and timm's {list(_TIMM_ARGS)}")
        model = create_model(name, **kwargs)
        if size is not None:
            model.pretrained_cfg["input_size"] = (model.config.in_chans, *size)
        model.pretrained_cfg.update(overlay)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"timm entry point for {name} (see quadmamba.create_model for the arguments)."
    return entry


def _image_size(name: str, img_size) -> tuple:
    """timm's img_size: an int or an (H, W) pair of positive ints."""
    pair = (img_size, img_size) if isinstance(img_size, int) else img_size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)):
        raise ValueError(f"{name}: img_size must be a positive int or an (H, W) pair of them, got {img_size!r}")
    return tuple(pair)


def register_timm() -> bool:
    """Add every variant to timm's model registry. False (and a reason) if timm is unusable."""
    try:
        from timm.models import register_model
    except (ImportError, RuntimeError) as exc:  # RuntimeError: torchvision built for another torch
        unavailable_reason["timm"] = f"{type(exc).__name__}: {exc}"
        return False
    if not _registered.get("timm"):
        for name in list_models():
            register_model(_timm_entry(name))
        _registered["timm"] = True
    return True


class QuadMambaBackbone(QuadMamba):
    """Dense backbone for OpenMMLab configs (mmdet, mmseg): the maps (B, C_i, H/2^(i+2),
    W/2^(i+2)) of out_indices, as a tuple.

    Args:
        arch: a variant name (quadmamba.list_models()).
        out_indices: stages returned (negative: from the end).
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 also stages 0..k-1
            (with their downsamples and out-norms), which then stay in eval mode.
        init_cfg: mmengine's initialisation config, e.g. dict(type="Pretrained",
            checkpoint=path) with a state dict in this package's layout (a classifier's keys
            load; its head is reported unused; of a ``quadmamba train`` checkpoint, save its
            "ema" entry when the run kept one, else its "model" entry); None keeps the spec's
            initialisation.
        drop_path_rate, compat, kernels, quad_scan, in_chans, gumbel_tau: as create_model.

    Registered by register_mmengine with mmengine's BaseModule as a second base (so that
    init_weights applies init_cfg); usable as a plain module without mmengine.
    """

    def __init__(self, arch: str = "quadmamba_t", out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, init_cfg: Optional[dict] = None, drop_path_rate=None,
                 compat: str = "paper", kernels: str = "fused", quad_scan: str = "quadtree",
                 in_chans: int = 3, gumbel_tau: float = 1.0):
        super().__init__(get_config(
            arch, features_only=True, out_indices=out_indices, drop_path_rate=drop_path_rate, compat=compat,
            kernels=kernels, quad_scan=quad_scan, in_chans=in_chans, gumbel_tau=gumbel_tau))
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) \
                or not -1 <= frozen_stages <= len(self.stages):
            raise ValueError(f"frozen_stages must be an int in -1..{len(self.stages)}, got {frozen_stages!r}")
        self.frozen_stages = frozen_stages
        self.init_cfg = copy.deepcopy(init_cfg)
        self._freeze()

    def _frozen_modules(self):
        if self.frozen_stages < 0:
            return []
        frozen = [self.stem] + [self.stages[i] for i in range(self.frozen_stages)]
        return frozen + [self.out_norms[str(i)] for i in range(self.frozen_stages) if str(i) in self.out_norms]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "QuadMambaBackbone":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x):
        return tuple(super().forward(x))


def register_mmengine() -> bool:
    """Register "QuadMambaBackbone" in mmengine's root MODELS registry (searched by mmdet,
    mmseg, mmpretrain). False (and a reason) if mmengine is not importable."""
    try:
        from mmengine.model import BaseModule
        from mmengine.registry import MODELS
    except (ImportError, RuntimeError) as exc:
        unavailable_reason["mmengine"] = f"{type(exc).__name__}: {exc}"
        return False
    MODELS.register_module(name="QuadMambaBackbone", module=mmengine_backbone_class(BaseModule), force=True)
    return True


def mmengine_backbone_class(base_module: type) -> type:
    """QuadMambaBackbone with mmengine's BaseModule (base_module) after it: BaseModule's
    init_weights (init_cfg) and bookkeeping on the same parameters and names."""
    if not issubclass(base_module, nn.Module):
        raise TypeError(f"base_module must be an nn.Module subclass, got {base_module!r}")
    cls = type("QuadMambaBackbone", (QuadMambaBackbone, base_module),
               {"__module__": __name__, "__doc__": QuadMambaBackbone.__doc__,
                "__qualname__": "MMEngineQuadMambaBackbone"})
    # Reachable under its qualified name, so that pickle (torch.save of a whole model, spawned
    # workers) finds this class rather than the plain QuadMambaBackbone.
    globals()["MMEngineQuadMambaBackbone"] = cls
    return cls
