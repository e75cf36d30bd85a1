"""quadmamba: QuadMamba (quadtree-based selective scan) vision backbones with
fused CPU and CUDA kernels.

Glossary of dimension letters used throughout the package:
    B batch, C block width, D inner width (ssm_ratio * C, per scan direction),
    H, W spatial size, L = H * W sequence length, K scan directions
    (2 in quad stages, 4 in cross stages), N state size (d_state), R dt_rank.
"""
from quadmamba._backend import cuda_available, cuda_built, cuda_status
from quadmamba.allocator import tune_allocator
from quadmamba.flops import count_flops, count_params
from quadmamba.models import QuadMamba, QuadMambaConfig, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "QuadMamba", "QuadMambaConfig", "count_flops", "count_params", "create_model",
    "cuda_available", "cuda_built", "cuda_status", "list_models", "tune_allocator", "__version__",
]
