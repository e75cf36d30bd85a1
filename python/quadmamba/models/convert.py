"""Checkpoint conversion between the authors' state-dict layout and ours.

Key correspondence (authors' <-> ours; {i} stage, {j} block, {k} out-norm index):
    patch_embed.{0,2,5,7}                    <-> stem.{conv1,norm1,conv2,norm2}
    layers.{i}.blocks.{j}.norm               <-> stages.{i}.blocks.{j}.norm1
    ....op.in_proj / op.conv2d               <-> ....mixer.in_proj / mixer.conv
    ....op.x_proj_weight (K, R+2N, D)        <-> ....mixer.x_proj_weight (same)
    ....op.dt_projs_weight (K, D, R)         <-> ....mixer.dt_proj_weight (same)
    ....op.dt_projs_bias (K, D)              <-> ....mixer.dt_bias (K*D)      [reshaped]
    ....op.A_logs (K*D, N) / op.Ds (K*D)     <-> ....mixer.A_log / mixer.Ds
    ....op.out_norm / op.out_proj            <-> ....mixer.out_norm / mixer.out_proj
    ....op.score_predictor.in_conv.{0,1}     <-> ....mixer.predictor.{norm,fc1}
    ....op.score_predictor.out_conv.{0,2,4}  <-> ....mixer.predictor.{fc2,fc3,fc4}
    ....norm2 / mlp.fc1 / mlp.fc2            <-> ....norm2 / mlp.fc1 / mlp.fc2
    layers.{i}.downsample.{1,3}              <-> stages.{i}.downsample.{conv,norm}
    classifier.{norm,head}                   <-> head.{norm,fc}
    outnorm{k}                               <-> out_norms.{k}
The authors' checkpoints keep the weights under "model"; this package's ``quadmamba train``
checkpoints under "model" and, when the run kept an EMA, "ema" (the weights ``quadmamba eval``
scores, which unwrap_checkpoint takes).

A model may lack parts of the network a checkpoint has, by construction: a features_only
backbone or a model with num_classes=0 the classifier (or its Linear), a backbone with fewer
out_indices or a model after prune_intermediate_layers the later stages, the last kept stage's
downsample and out-norms. Loading reports the checkpoint's keys of those parts as unused
rather than unexpected; strict loading still fails on any key the model has and the
checkpoint lacks (save a backbone's out-norms, which a classifier's checkpoint never has and
which keep their initialisation), on unexpected keys and on shape mismatches.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from quadmamba.models.config import NUM_STAGES
from quadmamba.models.quadmamba import QuadMamba

_BLOCK = ("layers.{i}.blocks.{j}.", "stages.{i}.blocks.{j}.")
_RULES: List[Tuple[str, str]] = [
    ("patch_embed.0.", "stem.conv1."),
    ("patch_embed.2.", "stem.norm1."),
    ("patch_embed.5.", "stem.conv2."),
    ("patch_embed.7.", "stem.norm2."),
    ("layers.{i}.downsample.1.", "stages.{i}.downsample.conv."),
    ("layers.{i}.downsample.3.", "stages.{i}.downsample.norm."),
    ("classifier.norm.", "head.norm."),
    ("classifier.head.", "head.fc."),
    ("outnorm{k}.", "out_norms.{k}."),
] + [(_BLOCK[0] + a, _BLOCK[1] + b) for a, b in [
    ("norm.", "norm1."),
    ("op.in_proj.", "mixer.in_proj."),
    ("op.conv2d.", "mixer.conv."),
    ("op.x_proj_weight", "mixer.x_proj_weight"),
    ("op.dt_projs_weight", "mixer.dt_proj_weight"),
    ("op.dt_projs_bias", "mixer.dt_bias"),
    ("op.A_logs", "mixer.A_log"),
    ("op.Ds", "mixer.Ds"),
    ("op.out_norm.", "mixer.out_norm."),
    ("op.out_proj.", "mixer.out_proj."),
    ("op.score_predictor.in_conv.0.", "mixer.predictor.norm."),
    ("op.score_predictor.in_conv.1.", "mixer.predictor.fc1."),
    ("op.score_predictor.out_conv.0.", "mixer.predictor.fc2."),
    ("op.score_predictor.out_conv.2.", "mixer.predictor.fc3."),
    ("op.score_predictor.out_conv.4.", "mixer.predictor.fc4."),
    ("norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]]


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "j", "k"):
        pattern = pattern.replace(re.escape("{%s}" % name), f"(?P<{name}>\\d+)")
    suffix = "" if not template.endswith(".") else "(?P<rest>weight|bias)"
    return re.compile(pattern + suffix + "$")


_FORWARD = [(_compile(a), b) for a, b in _RULES]     # authors' -> ours
_BACKWARD = [(_compile(b), a) for a, b in _RULES]    # ours -> authors'


def _rename(key: str, rules) -> str:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            groups = match.groupdict()
            rest = groups.pop("rest", None) or ""
            return template.format(**groups) + rest
    raise KeyError(key)


# Where checkpoints keep their weights, in order of preference: the EMA weights first (this
# package's "ema" and timm's "state_dict_ema" / "model_ema", as timm's loader prefers them), then
# the trained ones.
_ENTRIES = ("ema", "state_dict_ema", "model_ema", "model", "state_dict")


def checkpoint_entry(checkpoint: Mapping) -> Optional[str]:
    """The key under which a checkpoint keeps its state dict (see unwrap_checkpoint), or None
    when the mapping is the state dict itself."""
    for key in _ENTRIES:
        if isinstance(checkpoint.get(key), Mapping):
            return key
    return None


def unwrap_checkpoint(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint, or the mapping itself: the EMA weights where there are
    some ("ema" of a ``quadmamba train`` checkpoint that kept an EMA, timm's "state_dict_ema" or
    "model_ema"), else those under "model" or "state_dict"; keys without the prefixes of
    DDP / DataParallel ("module.") and torch.compile ("_orig_mod.") (strip_wrapper_prefixes)."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping (a state dict or a dict holding one), "
                        f"got {type(checkpoint).__name__}")
    entry = checkpoint_entry(checkpoint)
    return strip_wrapper_prefixes(dict(checkpoint[entry] if entry is not None else checkpoint))


# Prefixes a wrapper adds to every key of the model's state dict: DistributedDataParallel and
# DataParallel ("module."), torch.compile's OptimizedModule ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict of a model saved inside wrappers (model.state_dict() of a DDP or a compiled
    model), without the wrappers' prefixes: each is removed where every key has it, as often as it
    repeats ("module._orig_mod." too); other state dicts are returned as they are."""
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def official_to_ours(state_dict: Mapping, keep_unknown: bool = False) -> Dict[str, torch.Tensor]:
    """Rename (and reshape dt_projs_bias (K, D) -> (K*D)) an authors' state dict.

    Keys without a counterpart raise ValueError listing them all, or with keep_unknown are
    passed through unchanged (they then show up as unexpected when compared to a model).
    """
    state_dict = unwrap_checkpoint(state_dict)
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            new = _rename(key, _FORWARD)
        except KeyError:
            unknown.append(key)
            if keep_unknown:
                out[key] = value
            continue
        out[new] = value.reshape(-1) if new.endswith(".dt_bias") else value
    if unknown and not keep_unknown:
        raise ValueError(f"{len(unknown)} keys of the authors' checkpoint have no counterpart: {unknown}")
    return out


def ours_to_official(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """The inverse of official_to_ours (dt_bias (K*D) -> dt_projs_bias (K, D), K from x_proj_weight)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            new = _rename(key, _BACKWARD)
        except KeyError:
            unknown.append(key)
            continue
        if key.endswith(".dt_bias"):
            k = state_dict[key[: -len("dt_bias")] + "x_proj_weight"].shape[0]
            value = value.reshape(k, -1)
        out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no counterpart in the authors' layout: {unknown}")
    return out


@dataclass
class LoadReport:
    """Differences between a converted state dict and a model.

    missing, unexpected and mismatched fail strict loading. unused (checkpoint keys of parts the
    model does not have by construction) and initialised (model keys the checkpoint does not
    hold for a known reason, left as they are: their initialisation in a new model) do not;
    both map each key to why.
    """

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    # our key -> the authors' key, where the state dict came in the authors' layout (shown beside ours)
    official_names: Dict[str, str] = field(default_factory=dict)
    unused: Dict[str, str] = field(default_factory=dict)
    initialised: Dict[str, str] = field(default_factory=dict)
    # the checkpoint's entry the weights came from ("ema", "model", ...; None: the mapping itself)
    entry: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [] if self.entry is None else [f"weights from the checkpoint's {self.entry!r} entry"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): " + ", ".join(map(self._name, self.missing)))
        if self.unexpected:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected)}): "
                         + ", ".join(map(self._name, self.unexpected)))
        if self.mismatched:
            lines.append(f"shape mismatches ({len(self.mismatched)}): " + ", ".join(
                f"{self._name(k)} model {tuple(m)} vs checkpoint {tuple(c)}" for k, m, c in self.mismatched))
        if self.ok:
            lines.append("all other keys matched" if self.unused or self.initialised else "all keys matched")
        for title, keys in (("checkpoint keys not loaded", self.unused),
                            ("model keys not loaded, kept as they are", self.initialised)):
            for why, count in Counter(keys.values()).items():
                part, _, explanation = why.partition(": ")
                lines.append(f"{title}: {part} ({count} keys): {explanation}")
        return "\n".join(lines)

    def _name(self, key: str) -> str:
        official = self.official_names.get(key)
        return key if official is None or official == key else f"{key} (authors': {official})"


def _absent_part(model: nn.Module, key: str) -> Optional[str]:
    """Why a QuadMamba does not have the part of the network that a checkpoint key (our layout)
    belongs to, when it lacks it by construction (no head, fewer stages, no downsample after the
    last stage, fewer out-norms); None for any other key."""
    if not isinstance(model, QuadMamba):
        return None
    parts = key.split(".")
    index = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
    if parts[0] == "head" and len(parts) > 2:
        if model.head is None:
            return "head.*: no classifier head (a features_only backbone, or pruned by prune_intermediate_layers)"
        if parts[1] == "fc" and isinstance(model.head.fc, nn.Identity):
            return "head.fc.*: num_classes=0, the head ends without a Linear"
    elif parts[0] == "stages" and index is not None and index < NUM_STAGES:
        built = len(model.stages)
        if index >= built:
            return f"stages.{index}.*: not built (the model has stages 0..{built - 1})"
        if parts[2] == "downsample" and index < NUM_STAGES - 1 and isinstance(model.stages[index].downsample,
                                                                              nn.Identity):
            return f"stages.{index}.downsample.*: stage {index} is the model's last, without a downsample"
    elif parts[0] == "out_norms" and index is not None and index < NUM_STAGES:
        if model.out_norms is None or str(index) not in model.out_norms:
            return f"out_norms.{index}.*: the model returns no map of stage {index} through an out-norm"
    return None


def compare_state_dict(model: nn.Module, state_dict: Mapping, reset_head: bool = False) -> LoadReport:
    """Missing, unexpected and shape-mismatched keys of state_dict against model; the keys of
    parts the model lacks by construction are unused, not unexpected (see the module's
    docstring), and a backbone's out-norms missing from a checkpoint without any are
    initialised, not missing. reset_head: a classifier Linear whose shape differs from the
    checkpoint's (another num_classes) is initialised, not mismatched."""
    expected = model.state_dict()
    report = LoadReport()
    for key in sorted(set(state_dict) - set(expected)):
        why = _absent_part(model, key)
        if why is None:
            report.unexpected.append(key)
        else:
            report.unused[key] = why
    any_out_norms = any(k.startswith("out_norms.") for k in state_dict)
    for key in sorted(set(expected) - set(state_dict)):
        if key.startswith("out_norms.") and not any_out_norms and isinstance(model, QuadMamba):
            report.initialised[key] = "out_norms.*: the backbone's out-norms, which the checkpoint (of a " \
                                      "classifier) has none of"
        else:
            report.missing.append(key)
    for key in sorted(set(expected) & set(state_dict)):
        model_shape, shape = tuple(expected[key].shape), tuple(state_dict[key].shape)
        if model_shape == shape:
            continue
        if reset_head and key in ("head.fc.weight", "head.fc.bias") and isinstance(model, QuadMamba):
            report.initialised[key] = (f"head.fc.*: a new classifier Linear, {model.num_classes} classes "
                                       f"(the checkpoint's has {shape[0]})")
        else:
            report.mismatched.append((key, model_shape, shape))
    return report


def load_official(model: nn.Module, checkpoint: Mapping, strict: bool = True, reset_head: bool = False,
                  adapt: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None) -> LoadReport:
    """Load a checkpoint (or state dict) in the authors' layout or this package's into ``model``.

    strict: raise ValueError with the report unless every key the model has is in the checkpoint
    with its shape and the checkpoint has no unexpected key (keys of parts the model lacks by
    construction are reported unused and do not count; nor do a backbone's out-norms that a
    classifier's checkpoint has none of); otherwise load the matching tensors and return the report.
    reset_head: a classifier Linear of another num_classes than the checkpoint's keeps its
    initialisation (reported) instead of failing as a shape mismatch.
    adapt: a function applied to the state dict once it has this package's names, before it is
    compared with the model (timm's input-channel adaptation of the stem).
    """
    if adapt is not None and not callable(adapt):
        raise TypeError(f"adapt must be a function of the converted state dict, or None, got {type(adapt).__name__}")
    entry = checkpoint_entry(checkpoint) if isinstance(checkpoint, Mapping) else None
    converted = official_to_ours(checkpoint, keep_unknown=True)
    if adapt is not None:
        converted = adapt(converted)
    report = compare_state_dict(model, converted, reset_head=reset_head)
    report.entry = entry
    for key in report.missing + report.unexpected + [k for k, _, _ in report.mismatched]:
        try:
            report.official_names[key] = _rename(key, _BACKWARD)
        except KeyError:   # an unknown key passed through unchanged: it is the authors' own
            pass
    if strict and not report.ok:
        raise ValueError(f"checkpoint does not match the model:\n{report}")
    skip = set(report.unexpected) | set(report.unused) | set(report.initialised) \
        | {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in converted.items() if k not in skip}, strict=False)
    return report
