"""Layers of the QuadMamba models (channel-last feature maps (B, H, W, C))."""
from quadmamba.layers.blocks import QuadVSSBlock, VSSBlock
from quadmamba.layers.common import DropPath, Downsample, GlobalAvgPool, Linear, Mlp, Stem
from quadmamba.layers.kernels import KERNELS, OP_NAMES, ScanOps, get_ops
from quadmamba.layers.mixers import SS2D, QuadSS2D, SelectiveScan, init_ssm_
from quadmamba.layers.predictor import QuadDecision, ScorePredictor, quadrant_logits

__all__ = [
    "DropPath", "Downsample", "GlobalAvgPool", "KERNELS", "Linear", "Mlp", "OP_NAMES", "QuadDecision",
    "QuadSS2D", "QuadVSSBlock", "SS2D", "ScanOps", "ScorePredictor", "SelectiveScan", "Stem",
    "VSSBlock", "get_ops", "init_ssm_", "quadrant_logits",
]
