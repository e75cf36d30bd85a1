"""Optional registration with timm and mmengine (never done at import time).

    from quadmamba.models.integrations import register_timm, register_mmengine
    if register_timm():
        timm.create_model("quadmamba_t", num_classes=10, drop_rate=0.1)
        timm.create_model("quadmamba_t", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file="/path/weights.pth"))
    if register_mmengine():
        MODELS.build(dict(type="QuadMambaBackbone", arch="quadmamba_t", out_indices=(0, 1, 2, 3),
                          frozen_stages=1, init_cfg=dict(type="Pretrained", checkpoint="t.pth")))

Both return False when the library cannot be imported (timm raises RuntimeError, not only
ImportError, when its torchvision does not match the installed torch); the reason is kept
in ``unavailable_reason``. Registering twice is harmless.

The timm entry points take what timm.create_model passes: pretrained, pretrained_cfg (None, a
tag, a dict or timm's PretrainedCfg), pretrained_cfg_overlay, cache_dir, pretrained_model_args
(from "hf-hub:" / "local-dir:" model names) and the model's arguments; features_only with
feature_cls None (the model's own backbone: maps through fresh out-norms) or "getter" (timm's
FeatureGetterNet's maps: the stages' outputs without norms). No weights are distributed:
pretrained=True loads the local checkpoint that the cfg's "file" names (pretrained_cfg, with
pretrained_cfg_overlay on top; a timm "local-dir:" folder; or an in-memory "state_dict"), see
_load_pretrained; "url" and "hf_hub_id" are not fetched. timm's own checkpoint_path argument
is loaded by timm after the entry point returns (model.load_state_dict, this package's layout).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import math
import os
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from quadmamba.models.config import NUM_STAGES, get_config, list_models
from quadmamba.models.convert import load_official
from quadmamba.models.quadmamba import QuadMamba, create_model

_logger = logging.getLogger(__name__)

unavailable_reason: Dict[str, str] = {}
_registered: Dict[str, bool] = {}

# timm's creation arguments an entry point takes besides create_model's own.
_TIMM_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "cache_dir",
              "img_size", "global_pool", "output_stride", "feature_cls", "device", "dtype")
# The files timm looks for in a "local-dir:" folder, in its order of preference.
_LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_HOW_TO_LOAD = ("pass a local checkpoint as pretrained_cfg_overlay=dict(file='/path/weights.pth') (a state "
                "dict in this package's or the authors' layout, a checkpoint holding one under 'model', "
                "'state_dict' or 'ema', or a .safetensors file)")


def _timm_entry(name: str):
    def entry(pretrained: bool = False, **kwargs) -> QuadMamba:
        source = _pretrained_cfg(name, kwargs.pop("pretrained_cfg", None))
        kwargs.pop("cache_dir", None)   # no downloads
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        if not isinstance(overlay, Mapping):
            raise TypeError(f"{name}: pretrained_cfg_overlay must be a dict, got {overlay!r}")
        source.update(overlay)
        model_args = kwargs.pop("pretrained_model_args", None) or {}
        if not isinstance(model_args, Mapping):
            raise TypeError(f"{name}: pretrained_model_args must be a dict, got {model_args!r}")
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
        getter = _feature_getter(name, kwargs.pop("feature_cls", None), kwargs.get("features_only", False))
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
        if getter:   # as FeatureGetterNet(norm=False): the kept stages' outputs, no out-norms
            model.prune_intermediate_layers(model.config.out_indices, prune_norm=True)
        if pretrained:
            _load_pretrained(name, model, source, "num_classes" in kwargs)
        if size is not None:
            model.pretrained_cfg["input_size"] = (model.config.in_chans, *size)
        model.pretrained_cfg.update((k, v) for k, v in overlay.items() if k != "state_dict")
        model.pretrained_model_args = dict(model_args)   # as timm's build_model_with_cfg keeps them
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"timm entry point for {name} (see quadmamba.create_model for the arguments)."
    return entry


def _pretrained_cfg(name: str, cfg) -> dict:
    """timm's pretrained_cfg as a dict: None and a tag (a string; no tags are registered) give
    an empty one, timm's PretrainedCfg (a dataclass) its set fields."""
    if cfg is None or isinstance(cfg, str):
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is not None}
    raise TypeError(f"{name}: pretrained_cfg must be None, a tag, a dict or timm's PretrainedCfg, "
                    f"got {type(cfg).__name__}")


def _feature_getter(name: str, feature_cls, features_only) -> bool:
    """timm's feature_cls: None (the model's own features_only maps) or "getter" (True: timm's
    FeatureGetterNet, the stages' outputs without out-norms). timm hands it to the entry point,
    which builds the backbone itself; timm's other wrappers ("list", "dict", "hook", "fx") are
    not supported."""
    if feature_cls is None:
        return False
    if not (isinstance(feature_cls, str) and feature_cls.lower() == "getter"):
        raise ValueError(f"{name}: feature_cls must be None (the backbone's maps through its out-norms) or "
                         f"'getter' (the stages' outputs, as timm's FeatureGetterNet), got {feature_cls!r}")
    if not features_only:
        raise ValueError(f"{name}: feature_cls={feature_cls!r} needs features_only=True")
    return True


def _load_pretrained(name: str, model: QuadMamba, cfg: dict, num_classes_given: bool) -> None:
    """Load the weights that the merged pretrained cfg names into ``model``, strictly (see
    convert.load_official): a checkpoint in this package's layout or the authors', its EMA
    weights where it has some; the parts the model lacks (a classifier's head in a backbone or a
    model with num_classes=0, pruned stages) are left out, and a classifier Linear of another
    num_classes than the checkpoint's keeps its initialisation, as in timm. Anything else that
    does not match raises ValueError naming the keys. A model with other image channels than the
    checkpoint's RGB stem gets that stem adapted, as timm does (_adapt_input_conv)."""
    state, where = _read_weights(name, cfg)
    try:
        report = load_official(model, state, strict=True, reset_head=True,
                               adapt=functools.partial(_adapt_input_conv, name, model))
    except ValueError as exc:
        raise ValueError(f"{name}: the pretrained weights ({where}) do not fit the model: {exc}") from None
    if "head.fc.weight" in report.initialised and not num_classes_given:
        _logger.warning("%s: num_classes was not given and the default's classifier differs from the "
                        "checkpoint's; %s. Pass the checkpoint's num_classes to load its classifier",
                        name, report.initialised["head.fc.weight"])
    _logger.info("%s: loaded pretrained weights (%s)\n%s", name, where, report)


def _adapt_input_conv(name: str, model: QuadMamba, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict in this package's layout with its first convolution's RGB weights
    (C, 3, k, k) adapted to the model's in_chans, as timm's adapt_input_conv: one channel takes
    their sum (a grey image then gives what its RGB copy gave); c > 3 channels (or 2) repeat
    R, G, B cyclically, scaled by 3 / c (for c a multiple of 3, a c-channel copy of a grey image
    gives what its RGB copy gave). The state dict itself where there is nothing to adapt (an RGB
    model, or no RGB stem weight: the comparison with the model then reports it)."""
    in_chans = model.config.in_chans
    key = "stem.conv1.weight"
    weight = state.get(key)
    if in_chans == 3 or weight is None or weight.dim() != 4 or weight.shape[1] != 3:
        return state
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        adapted = weight.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    _logger.info("%s: %s adapted from the checkpoint's 3 image channels to in_chans=%d", name, key, in_chans)
    return dict(state, **{key: adapted})


def _read_weights(name: str, cfg: dict):
    """(state dict or checkpoint mapping, a description of where it came from) of the cfg's
    "state_dict", else its "file" (a file, or a "local-dir:" folder); else a ValueError saying
    how to pass a local file."""
    if cfg.get("state_dict") is not None:
        state = cfg["state_dict"]
        if not isinstance(state, Mapping):
            raise TypeError(f"{name}: pretrained_cfg's state_dict must be a dict, got {type(state).__name__}")
        return state, "the cfg's state_dict"
    path = cfg.get("file")
    if not path:
        remote = {k: cfg[k] for k in ("hf_hub_id", "url") if cfg.get(k)}
        if remote:
            raise ValueError(f"{name}: pretrained=True loads a local file only; the pretrained cfg names "
                             f"{remote}, which is not fetched: download the weights and {_HOW_TO_LOAD}")
        raise ValueError(f"{name}: pretrained=True needs local weights (none are distributed): {_HOW_TO_LOAD}")
    path = os.fspath(path)
    if os.path.isdir(path):   # timm's "local-dir:" source: a folder holding the weights
        found = [f for f in _LOCAL_DIR_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"{name}: pretrained_cfg file {path!r} is a folder without any of "
                                    f"{list(_LOCAL_DIR_FILES)}")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: pretrained_cfg file {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{name}: pretrained_cfg file {path!r} is a .safetensors file, which needs the "
                              "safetensors package (pip install safetensors)") from None
        return load_file(path, device="cpu"), path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many types for foreign files; all mean the same here
        raise ValueError(f"{name}: pretrained_cfg file {path!r} is not a checkpoint torch.load reads with "
                         f"weights_only=True ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{name}: pretrained_cfg file {path!r} holds a {type(state).__name__}, not a state dict")
    return state, path


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
