"""Optional registration with timm and mmengine (never done at import time).

    from quadmamba.models.integrations import register_timm, register_mmengine
    if register_timm():
        timm.create_model("quadmamba_t", num_classes=10, kernels="reference")
    if register_mmengine():
        MODELS.build(dict(type="QuadMambaBackbone", arch="quadmamba_t", out_indices=(0, 1, 2, 3)))

Both return False when the library cannot be imported (timm raises RuntimeError, not only
ImportError, when its torchvision does not match the installed torch); the reason is kept
in ``unavailable_reason``.
"""
from __future__ import annotations

from typing import Dict, Sequence

from quadmamba.models.config import list_models
from quadmamba.models.quadmamba import QuadMamba, create_model

unavailable_reason: Dict[str, str] = {}

# Keys timm.create_model passes to every entry point; they have no meaning here.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_entry(name: str):
    def entry(pretrained: bool = False, **kwargs) -> QuadMamba:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are distributed; load a checkpoint "
                             "with quadmamba.models.convert.load_official instead")
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"timm entry point for {name} (see quadmamba.create_model for the arguments)."
    return entry


def register_timm() -> bool:
    """Add every variant to timm's model registry. False (and a reason) if timm is unusable."""
    try:
        from timm.models import register_model
    except (ImportError, RuntimeError) as exc:  # RuntimeError: torchvision built for another torch
        unavailable_reason["timm"] = f"{type(exc).__name__}: {exc}"
        return False
    for name in list_models():
        register_model(_timm_entry(name))
    return True


def quadmamba_backbone(arch: str = "quadmamba_t", out_indices: Sequence[int] = (0, 1, 2, 3),
                       drop_path_rate=None, compat: str = "paper", kernels: str = "fused",
                       quad_scan: str = "quadtree", in_chans: int = 3, gumbel_tau: float = 1.0) -> QuadMamba:
    """Dense backbone for OpenMMLab configs: maps (B, C_i, H/2^(i+2), W/2^(i+2)) for out_indices."""
    return create_model(arch, features_only=True, out_indices=tuple(out_indices),
                        drop_path_rate=drop_path_rate, compat=compat, kernels=kernels,
                        quad_scan=quad_scan, in_chans=in_chans, gumbel_tau=gumbel_tau)


def register_mmengine() -> bool:
    """Register "QuadMambaBackbone" in mmengine's root MODELS registry (searched by mmdet,
    mmseg, mmpretrain). False (and a reason) if mmengine is not importable."""
    try:
        from mmengine.registry import MODELS
    except (ImportError, RuntimeError) as exc:
        unavailable_reason["mmengine"] = f"{type(exc).__name__}: {exc}"
        return False
    MODELS.register_module(name="QuadMambaBackbone", module=quadmamba_backbone, force=True)
    return True
