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
The authors' checkpoints keep the weights under "model".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

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


def unwrap_checkpoint(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (under "model" or "state_dict"), or the mapping itself."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


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
    """Differences between a converted state dict and a model."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    # our key -> the authors' key, where the state dict came in the authors' layout (shown beside ours)
    official_names: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        if self.ok:
            return "all keys matched"
        lines = []
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): " + ", ".join(map(self._name, self.missing)))
        if self.unexpected:
            lines.append(f"unexpected in checkpoint ({len(self.unexpected)}): "
                         + ", ".join(map(self._name, self.unexpected)))
        if self.mismatched:
            lines.append(f"shape mismatches ({len(self.mismatched)}): " + ", ".join(
                f"{self._name(k)} model {tuple(m)} vs checkpoint {tuple(c)}" for k, m, c in self.mismatched))
        return "\n".join(lines)

    def _name(self, key: str) -> str:
        official = self.official_names.get(key)
        return key if official is None or official == key else f"{key} (authors': {official})"


def compare_state_dict(model: nn.Module, state_dict: Mapping) -> LoadReport:
    """Missing, unexpected and shape-mismatched keys of state_dict against model."""
    expected = model.state_dict()
    report = LoadReport(
        missing=sorted(set(expected) - set(state_dict)),
        unexpected=sorted(set(state_dict) - set(expected)),
    )
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(expected[key].shape) != tuple(state_dict[key].shape):
            report.mismatched.append((key, tuple(expected[key].shape), tuple(state_dict[key].shape)))
    return report


def load_official(model: nn.Module, checkpoint: Mapping, strict: bool = True) -> LoadReport:
    """Load an authors' checkpoint (or state dict) into ``model``.

    strict: raise ValueError with the report unless every key and shape matches; otherwise
    load the matching tensors and return the report.
    """
    converted = official_to_ours(checkpoint, keep_unknown=True)
    report = compare_state_dict(model, converted)
    for key in report.missing + report.unexpected + [k for k, _, _ in report.mismatched]:
        try:
            report.official_names[key] = _rename(key, _BACKWARD)
        except KeyError:   # an unknown key passed through unchanged: it is the authors' own
            pass
    if strict and not report.ok:
        raise ValueError(f"checkpoint does not match the model:\n{report}")
    bad = set(report.unexpected) | {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in converted.items() if k not in bad}, strict=False)
    return report
