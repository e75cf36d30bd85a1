"""The QuadMamba network: stem, 4 stages (quadtree blocks in quad stages, cross blocks in
the others), classifier head or dense-prediction outputs.

Shapes: image (B, in_chans, H, W); stage i works on (B, H_i, W_i, C_i) channel-last with
H_0 = ceil(H/4), H_{i+1} = ceil(H_i/2); dense outputs are channel-first (B, C_i, H_i, W_i).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from quadmamba.layers.blocks import QuadVSSBlock, VSSBlock
from quadmamba.layers.common import Downsample, GlobalAvgPool, Stem
from quadmamba.layers.kernels import ScanOps, get_ops
from quadmamba.layers.mixers import QuadSS2D
from quadmamba.models.config import NUM_STAGES, QuadMambaConfig

# Window-shift directions cycled over pairs of blocks (spec 3.5): (+,+), (-,-), (+,-), (-,+).
SHIFT_DIRECTIONS = ((1, 1), (-1, -1), (1, -1), (-1, 1))


def shift_schedule(depths: Sequence[int], quad_stages: Sequence[int]) -> List[List[Optional[Tuple[int, int]]]]:
    """Per stage, per block: the shift direction of a quad block, or None.

    Shifted blocks are the odd blocks of quad stages; block with global index g uses
    direction SHIFT_DIRECTIONS[(g // 2) % 4].
    """
    schedule, offset = [], 0
    for stage, depth in enumerate(depths):
        row = []
        for j in range(depth):
            shifted = stage in quad_stages and j % 2 == 1
            row.append(SHIFT_DIRECTIONS[((offset + j) // 2) % 4] if shifted else None)
        schedule.append(row)
        offset += depth
    return schedule


class QuadMambaStage(nn.Module):
    """Blocks of one width, then an optional downsample.

    Args:
        dim: width C of the blocks.
        out_dim: width after the downsample; None for no downsample.
        depth: number of blocks.
        scan: "quad" (QuadVSSBlock) or "cross" (VSSBlock).
        shifts: per block, the shift direction (quad blocks) or None.
        drop_paths: per block, the stochastic-depth probability.
        ops: the op table.
        ssm_ratio, d_state, dt_rank, mlp_ratio, quad_scan, compat, gumbel_tau: block settings.

    Forward returns (stage output before the downsample, downsampled map), channel-last.
    """

    def __init__(self, dim: int, out_dim: Optional[int], depth: int, *, scan: str,
                 shifts: Sequence[Optional[Tuple[int, int]]], drop_paths: Sequence[float],
                 ops: ScanOps, ssm_ratio: float, d_state: int, dt_rank: Optional[int],
                 mlp_ratio: float, quad_scan: str, compat: str, gumbel_tau: float):
        super().__init__()
        if scan not in ("quad", "cross"):
            raise ValueError(f"scan must be 'quad' or 'cross', got {scan!r}")
        common = dict(ssm_ratio=ssm_ratio, d_state=d_state, dt_rank=dt_rank, mlp_ratio=mlp_ratio, ops=ops)
        blocks = []
        for j in range(depth):
            if scan == "quad":
                blocks.append(QuadVSSBlock(dim, drop_path=drop_paths[j], shift=shifts[j],
                                           quad_scan=quad_scan, compat=compat, gumbel_tau=gumbel_tau, **common))
            else:
                blocks.append(VSSBlock(dim, drop_path=drop_paths[j], **common))
        self.blocks = nn.ModuleList(blocks)
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, self.downsample(x)


class ClassifierHead(nn.Module):
    """LayerNorm(C) -> global average pool -> Dropout(drop_rate) -> Linear(C, classes)
    (Identity if classes == 0)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pool = GlobalAvgPool()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(self.norm(x)))
        return x if pre_logits else self.fc(x)


class FeatureInfo(list):
    """The maps a model can return, as timm describes them: a list of dicts (num_chs,
    reduction, module), with the accessors of timm's FeatureInfo (idx: a position in this
    list, a sequence of positions, or None for all)."""

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None):
        return [d if keys is None else {k: d[k] for k in keys} for d in self._pick(idx)]

    def _get(self, key, idx):
        values = [d[key] for d in self._pick(idx)]
        return values if idx is None or isinstance(idx, (tuple, list)) else values[0]

    def _pick(self, idx) -> list:
        if idx is None:
            return list(self)
        return [self[i] for i in idx] if isinstance(idx, (tuple, list)) else [self[idx]]


def data_config(cfg: QuadMambaConfig) -> dict:
    """The input a model expects, in timm's pretrained_cfg keys (the ImageNet recipe of the
    paper: 224 x 224, bicubic resize, center crop 0.875, ImageNet mean and std; with other than 3
    input channels, the channel averages of those for each channel)."""
    from quadmamba.data import IMAGENET_MEAN, IMAGENET_STD

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if cfg.in_chans != 3:   # one value per channel: the ImageNet channel averages, repeated
        mean = (round(sum(IMAGENET_MEAN) / 3, 3),) * cfg.in_chans
        std = (round(sum(IMAGENET_STD) / 3, 3),) * cfg.in_chans
    return dict(input_size=(cfg.in_chans, 224, 224), interpolation="bicubic", crop_pct=0.875,
                crop_mode="center", mean=mean, std=std, num_classes=cfg.num_classes,
                first_conv="stem.conv1", classifier="head.fc", architecture=cfg.name)


@dataclass
class PartitionMap:
    """The quadtree partition one quad block used (see QuadMamba.partition_maps)."""

    stage: int
    block: int
    stride: int
    shift: Tuple[int, int]
    decision: torch.Tensor   # (B, 4) one-hot, TL, TR, BL, BR in the rolled frame
    score: torch.Tensor      # (B, H0, W0) locality score, image frame, cropped
    windows: torch.Tensor    # (B, H0, W0) int64: 0..3 coarse quadrant, 4..7 fine sub-window


def window_ids(decision: torch.Tensor, size: Tuple[int, int], shift: Tuple[int, int],
               crop: Tuple[int, int]) -> torch.Tensor:
    """Window id of every token in the image frame: (B, crop_h, crop_w) int64.

    On the padded, rolled grid of ``size``: quadrant q = 2*(y >= H/2) + (x >= W/2) gets id q,
    unless it is the selected one, whose tokens get 4 + 2*(y' >= H/4) + (x' >= W/4) with
    (y', x') inside the quadrant. Then the roll is undone (roll by -shift) and cropped.
    """
    height, width = size
    ys = torch.arange(height, device=decision.device)
    xs = torch.arange(width, device=decision.device)
    quadrant = 2 * (ys[:, None] >= height // 2).long() + (xs[None, :] >= width // 2).long()
    sub = 2 * ((ys[:, None] % (height // 2)) >= height // 4).long() + ((xs[None, :] % (width // 2)) >= width // 4).long()
    selected = decision.argmax(dim=1)                                   # (B,)
    ids = torch.where(quadrant[None] == selected[:, None, None], 4 + sub[None], quadrant[None])
    ids = torch.roll(ids, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return ids[:, :crop[0], :crop[1]]


_NO_HEAD = ("this model has no classifier head (a features_only backbone, or a model whose head "
            "prune_intermediate_layers removed); use forward_intermediates")


class QuadMamba(nn.Module):
    """QuadMamba classifier, or dense backbone with ``config.features_only``.

    Args:
        config: the model configuration (QuadMambaConfig).
    """

    def __init__(self, config: QuadMambaConfig):
        super().__init__()
        if not isinstance(config, QuadMambaConfig):
            raise TypeError(f"config must be a QuadMambaConfig, got {type(config).__name__}")
        self.config = cfg = dataclasses.replace(config)   # its own copy: reset_classifier edits it
        self.num_classes = cfg.num_classes if not cfg.features_only else 0
        ops = get_ops(cfg.kernels)
        self.stem = Stem(cfg.in_chans, cfg.dims[0])
        num_stages = max(cfg.out_indices) + 1 if cfg.features_only else NUM_STAGES
        self.num_features = cfg.dims[num_stages - 1]   # width of forward_features' output
        self.head_hidden_size = self.num_features      # timm's name of forward_head's pre_logits width
        total = sum(cfg.depths)
        rates = torch.linspace(0, cfg.drop_path_rate, total).tolist() if total else []
        shifts = shift_schedule(cfg.depths, cfg.quad_stages)
        stages, offset = [], 0
        for i in range(num_stages):
            depth = cfg.depths[i]
            stages.append(QuadMambaStage(
                cfg.dims[i], cfg.dims[i + 1] if i + 1 < num_stages else None, depth,
                scan="quad" if i in cfg.quad_stages else "cross", shifts=shifts[i],
                drop_paths=rates[offset:offset + depth], ops=ops, ssm_ratio=cfg.ssm_ratio,
                d_state=cfg.d_state, dt_rank=cfg.dt_rank, mlp_ratio=cfg.mlp_ratio,
                quad_scan=cfg.quad_scan, compat=cfg.compat, gumbel_tau=cfg.gumbel_tau))
            offset += depth
        self.stages = nn.ModuleList(stages)
        if cfg.features_only:
            self.out_norms = nn.ModuleDict({str(i): nn.LayerNorm(cfg.dims[i]) for i in cfg.out_indices})
            self.head = None
        else:
            self.out_norms = None
            self.head = ClassifierHead(cfg.dims[-1], cfg.num_classes, cfg.drop_rate)
        # The maps forward returns (backbone) or forward_intermediates can return (classifier).
        self.feature_info = self._feature_info(cfg.out_indices if cfg.features_only else range(NUM_STAGES))
        self.pretrained_cfg = data_config(cfg)
        self.apply(init_weights)
        channels_last_convs_(self)

    # -- features --------------------------------------------------------------------------
    def _feature_info(self, stages: Sequence[int]) -> FeatureInfo:
        """timm's description (num_chs, reduction, module) of the output maps of ``stages``."""
        return FeatureInfo(dict(num_chs=self.config.dims[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                           for i in stages)

    def _stage_outputs(self, x: torch.Tensor, last: int):
        """Yield (i, output of stage i before its downsample) for i <= last; channel-last."""
        self._check_image(x)
        x = self.stem(x)
        for i, stage in enumerate(self.stages[:last + 1]):
            out, x = stage(x)
            yield i, out, x

    def _check_image(self, x) -> None:
        chans = self.config.in_chans
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != chans:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be an image batch (B, {chans}, H, W), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x must have B, H, W >= 1, got shape {tuple(x.shape)}")
        weight = self.stem.conv1.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model on {weight.device}: move one (model.to(x.device))")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the model's weights are {weight.dtype}: convert one "
                            "(model.to(dtype) or x.to(dtype)), or run under torch.autocast")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, in_chans, H, W) -> last stage output (B, H_3, W_3, C_3), channel-last."""
        for _, out, _ in self._stage_outputs(x, len(self.stages) - 1):
            pass
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H_3, W_3, C_3) -> logits (B, classes), or pooled features with pre_logits."""
        if self.head is None:
            raise RuntimeError(_NO_HEAD)
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              norm: bool = True, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs, taken before each downsample (timm's signature).

        Args:
            indices: stage indices (sequence; negative from the end), the last n stages (int),
                or None for all built stages.
            norm: pass outputs through the backbone's out-norms where the model has them.
            stop_early: run no stage after the last one taken (the final features are then
                that stage's output); always so with intermediates_only.
            output_fmt: "NCHW" (B, C_i, H_i, W_i) or "NHWC" (B, H_i, W_i, C_i) maps.
            intermediates_only: return only the list.

        Returns:
            list of maps, or (list, final features channel-last) unless intermediates_only.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = self._take_indices(indices)
        last = take[-1] if (stop_early or intermediates_only) else len(self.stages) - 1
        maps, final = [], None
        for i, out, _ in self._stage_outputs(x, last):
            if i in take:
                normed = out
                if norm and self.out_norms is not None and str(i) in self.out_norms:
                    normed = self.out_norms[str(i)](out)
                maps.append(normed.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else normed)
            final = out   # as forward_features: not normed
        return maps if intermediates_only else (maps, final)

    def _take_indices(self, indices: Union[int, Sequence[int], None]) -> List[int]:
        """The sorted stage indices that ``indices`` selects among the built stages (a sequence,
        negative from the end; an int n: the last n; None: all)."""
        built = len(self.stages)
        if indices is None:
            take = list(range(built))
        elif isinstance(indices, int) and not isinstance(indices, bool):
            take = list(range(built - indices, built)) if 0 < indices <= built else []
        else:
            take = sorted(int(i) + built if int(i) < 0 else int(i) for i in indices)
        if not take or take[0] < 0 or take[-1] >= built or len(set(take)) != len(take):
            raise ValueError(f"indices must select distinct stages in 0..{built - 1} (negative: from the "
                             f"end; an int n: the last n), got {indices!r}")
        return take

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int], None] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Remove what ``forward_intermediates(x, indices)`` does not use (timm's signature):
        the stages after the last one taken and that stage's downsample; with prune_head the
        classifier head; with prune_norm the out-norms (a backbone's; the out-norms of removed
        stages go in any case). ``num_features``, ``feature_info`` and a backbone's
        ``out_indices`` (what forward returns) follow the kept stages.

        Args:
            indices: as forward_intermediates (default: the last stage).
            prune_norm: drop the out-norms (maps are then returned as the stages give them).
            prune_head: drop the classifier head (forward then raises; use forward_intermediates).
                Without it the head stays, which needs the last stage kept.

        Returns:
            the kept stage indices, sorted (pass them to forward_intermediates).
        """
        take = self._take_indices(indices)
        last = take[-1]
        if not prune_head and self.head is not None and last < len(self.stages) - 1:
            raise ValueError(f"prune_head=False keeps the classifier head, which reads the last stage "
                             f"({len(self.stages) - 1}); indices {indices!r} end at stage {last}")
        del self.stages[last + 1:]
        self.stages[last].downsample = nn.Identity()
        self.num_features = self.head_hidden_size = self.config.dims[last]
        # the maps forward (a backbone) or forward_intermediates (a classifier) can give
        self.feature_info = self._feature_info(take if self.config.features_only else range(last + 1))
        if self.out_norms is not None:
            for key in [k for k in self.out_norms if prune_norm or int(k) > last]:
                del self.out_norms[key]
        if self.config.features_only:
            self.config = dataclasses.replace(self.config, out_indices=tuple(take))
        if prune_head and self.head is not None:
            self.head = None
            self.num_classes = self.pretrained_cfg["num_classes"] = 0
        return take

    def forward(self, x: torch.Tensor):
        """Classifier: logits (B, classes). Backbone: list of (B, C_i, H_i, W_i) for out_indices."""
        if self.config.features_only:
            return self.forward_intermediates(x, self.config.out_indices, norm=True, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    # -- training helpers ----------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        """The final Linear (Identity when num_classes is 0)."""
        if self.head is None:
            raise RuntimeError(_NO_HEAD)
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the final Linear by a fresh one with ``num_classes`` outputs (0: Identity).
        global_pool: None or "avg" (the only pooling; timm's argument)."""
        if self.head is None:
            raise RuntimeError(_NO_HEAD)
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg' (the head's pooling) or None, got {global_pool!r}")
        self.config = dataclasses.replace(self.config, num_classes=num_classes)   # checks the value
        self.num_classes = num_classes = self.config.num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        fc.apply(init_weights)
        ref = self.head.norm.weight
        self.head.fc = fc.to(device=ref.device, dtype=ref.dtype)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, for layer-wise learning-rate decay (timm's
        convention: regexes over parameter names, with ordinals from their groups; coarse: one
        group per stage). A stage's downsample follows its blocks (timm's (99999,) joins it to
        the stage's last block); the head (and out-norms) match nothing, which timm puts last."""
        if coarse:
            return dict(stem=r"^stem\.", blocks=r"^stages\.(\d+)\.")
        return dict(stem=r"^stem\.", blocks=[(r"^stages\.(\d+)\.blocks\.(\d+)\.", None),
                                             (r"^stages\.(\d+)\.downsample\.", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set:
        """Names of the parameters that take no weight decay (A_log and Ds of every mixer)."""
        return {name for name, _ in self.named_parameters() if name.endswith((".A_log", ".Ds"))}

    # -- inspection ----------------------------------------------------------------------------
    @property
    def default_cfg(self) -> dict:
        """timm's older name of pretrained_cfg."""
        return self.pretrained_cfg

    @torch.no_grad()
    def partition_maps(self, x: torch.Tensor) -> List[PartitionMap]:
        """Run the model on x (current train/eval mode, no grad) and return the partition of
        every quadtree block, in order (see PartitionMap and window_ids)."""
        records, handles = {}, []
        mixers = [(i, j, blk.mixer) for i, stage in enumerate(self.stages)
                  for j, blk in enumerate(stage.blocks) if isinstance(blk.mixer, QuadSS2D)]
        if any(m.quad_scan != "quadtree" for _, _, m in mixers):
            raise RuntimeError("partition_maps needs quad_scan='quadtree' (the raster ablation has no partition)")

        def keep(key, what):
            def hook(module, args, output):
                records.setdefault(key, {})[what] = (args, output)
            return hook

        for i, j, mixer in mixers:
            handles.append(mixer.register_forward_hook(keep((i, j), "mixer")))
            handles.append(mixer.predictor.register_forward_hook(keep((i, j), "score")))
            handles.append(mixer.decide.register_forward_hook(keep((i, j), "decision")))
        try:
            self.forward_intermediates(x, intermediates_only=True)   # every built stage, head or not
        finally:
            for handle in handles:
                handle.remove()
        maps = []
        for i, j, mixer in mixers:
            rec = records[(i, j)]
            height0, width0 = rec["mixer"][0][0].shape[1:3]
            score = rec["score"][1]                                   # (B, Hp, Wp), image frame
            decision = rec["decision"][1]
            size = (score.shape[1], score.shape[2])
            shift = mixer.shift_amount(*size)
            maps.append(PartitionMap(
                stage=i, block=j, stride=4 * 2 ** i, shift=shift, decision=decision,
                score=score[:, :height0, :width0],
                windows=window_ids(decision, size, shift, (height0, width0))))
        return maps


@torch.no_grad()
def channels_last_convs_(model: nn.Module) -> None:
    """Stores every Conv2d weight channels-last. The activations reach the convs
    channels-last (permuted views of (B, H, W, C) maps), and a weight in the other layout
    is reordered on every call; the stem's outputs then also come out channels-last, so
    the LayerNorms after them read contiguous memory. Values are unchanged;
    ``load_state_dict`` copies into these weights and keeps their layout."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """Spec init: Linear trunc-normal(std 0.02) with zero bias, LayerNorm (1, 0); convs keep
    PyTorch's default; scan parameters are set by the mixers (quadmamba.layers.init_ssm_)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_model(name: str, *, num_classes: int = 1000, drop_path_rate: Optional[float] = None,
                 drop_rate: float = 0.0, compat: str = "paper", kernels: str = "fused", quad_scan: str = "quadtree",
                 features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
                 in_chans: int = 3, gumbel_tau: float = 1.0) -> QuadMamba:
    """Build a named variant (see list_models()).

    Args:
        name: "quadmamba_nano" | "quadmamba_li" | "quadmamba_t" | "quadmamba_s" | "quadmamba_b".
        num_classes: classifier outputs.
        drop_path_rate: stochastic depth; None takes the variant's default (Li/T 0.1, S 0.2, B 0.3).
        drop_rate: dropout before the classifier's Linear (0 in the paper).
        compat: "paper" | "official".
        kernels: "fused" | "reference".
        quad_scan: "quadtree" | "raster".
        features_only: dense backbone (maps at strides 4, 8, 16, 32) instead of a classifier.
        out_indices: stages the backbone returns (negative: from the end).
        in_chans: image channels.
        gumbel_tau: Gumbel-softmax temperature.
    """
    from quadmamba.models.config import get_config

    return QuadMamba(get_config(
        name, num_classes=num_classes, drop_path_rate=drop_path_rate, drop_rate=drop_rate, compat=compat,
        kernels=kernels, quad_scan=quad_scan, features_only=features_only, out_indices=out_indices,
        in_chans=in_chans, gumbel_tau=gumbel_tau))
