"""Differentiable ops backed by the compiled core, and their plain-PyTorch
references (``quadmamba.ops.reference``), which are the specification."""
from quadmamba.ops import reference
from quadmamba.ops.selective_scan import selective_scan

__all__ = ["reference", "selective_scan"]
