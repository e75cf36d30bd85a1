"""Differentiable ops backed by the compiled core, and their plain-PyTorch
references (``quadmamba.ops.reference``), which are the specification."""
from quadmamba.ops import reference
from quadmamba.ops.cross_scan import cross_merge, cross_scan
from quadmamba.ops.quad_scan import quad_merge, quad_scan
from quadmamba.ops.selective_scan import selective_scan

__all__ = ["reference", "selective_scan", "quad_scan", "quad_merge", "cross_scan", "cross_merge"]
