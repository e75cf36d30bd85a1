"""quadmamba: QuadMamba (quadtree-based selective scan) vision backbones with
fused CPU and CUDA kernels.

Glossary of dimension letters used throughout the package:
    B batch, C block width, D inner width (ssm_ratio * C, per scan direction),
    H, W spatial size, L = H * W sequence length, K scan directions
    (2 in quad stages, 4 in cross stages), N state size (d_state), R dt_rank.
"""
from quadmamba._backend import cuda_available, cuda_built

__version__ = "0.1.0"

__all__ = ["cuda_available", "cuda_built", "__version__"]
