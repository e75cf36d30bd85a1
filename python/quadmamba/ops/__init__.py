"""Differentiable ops backed by the compiled core, and their plain-PyTorch
references (``quadmamba.ops.reference``), which are the specification."""
from quadmamba.ops import reference

__all__ = ["reference"]
