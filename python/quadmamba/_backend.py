"""The compiled core, imported once, and the conversion of tensors into the
plain arguments the binding takes (see cpp/bindings/module.cpp)."""
from __future__ import annotations

import torch

_C = None
_OPENMP = True  # whether the kernels run on the OpenMP runtime (read from _C on first use)

_DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
}


def core():
    """Return the compiled module ``quadmamba._C``, importing it on first use."""
    global _C, _OPENMP
    if _C is None:
        try:
            from quadmamba import _C as module
        except ImportError as exc:
            raise ImportError(
                "quadmamba's compiled core (quadmamba._C) could not be imported: "
                f"{exc}. Install the package so the extension is built: "
                "`pip install .` (or `pip install --no-build-isolation -e .` for development)."
            ) from exc
        _C = module
        _OPENMP = bool(module.openmp())
    if not _OPENMP:
        # Without OpenMP the kernels run on their own workers: as many as torch uses.
        _C.set_num_threads(torch.get_num_threads())
    return _C


def view(t: torch.Tensor | None):
    """The binding's form of a tensor: (data_ptr, dtype_code, device_index, shape, strides)."""
    if t is None:
        return None
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"quadmamba kernels do not support dtype {t.dtype}")
    dev = t.device
    if dev.type == "cpu":
        index = -1
    elif dev.type == "cuda":
        index = dev.index
    else:
        raise ValueError(f"quadmamba kernels run on CPU or CUDA tensors, got device {dev}")
    return (t.data_ptr(), code, index, tuple(t.shape), t.stride())


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device as an integer (0 for CPU tensors)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this install."""
    return bool(core().cuda_built())


def cuda_available() -> bool:
    """Whether the CUDA kernels were built and a CUDA device is usable now."""
    return cuda_built() and core().cuda_device_count() > 0 and torch.cuda.is_available()
