"""The compiled core, imported once, and the conversion of tensors into the
plain arguments the binding takes (see cpp/bindings/module.cpp)."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

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


def reject_forward_ad(op: str, *tensors) -> None:
    """Raises NotImplementedError when forward-mode AD (torch.func.jvp,
    torch.autograd.forward_ad) would carry a tangent into ``op``. The ops have reverse-mode
    formulas only, and PyTorch drops a custom op's tangents without a word (a zero jvp)."""
    if fwAD._current_level < 0:   # no dual level open: no tangents anywhere (the common case)
        return
    for t in tensors:
        if t is None:
            continue
        try:
            dual = fwAD.unpack_dual(t).tangent is not None
        except RuntimeError:      # a transform that cannot unpack it (vmap inside jvp): assume one
            dual = True
        if dual:
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported, "
                "the tangents would be lost; use reverse mode (backward, torch.autograd.grad)")


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device as an integer (0 for CPU tensors). For a CUDA
    tensor, first checks that the CUDA kernels can run here (RuntimeError saying why not)."""
    if t.device.type == "cuda":
        _require_cuda()
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this install."""
    return bool(core().cuda_built())


def cuda_available() -> bool:
    """Whether the CUDA kernels were built and a CUDA device is usable now."""
    return cuda_status()["usable"]


# The oldest NVIDIA driver release of each CUDA major version (Linux), for the messages below.
_DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580"}


def _version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def cuda_status() -> dict:
    """What this install's CUDA kernels find here.

    Keys: ``built`` (CUDA kernels compiled in); ``runtime`` (the CUDA runtime they link,
    e.g. "13.0", None in a CPU-only build); ``driver`` (the newest CUDA version the NVIDIA
    driver supports, None without a driver); ``devices`` (usable devices); ``usable``
    (kernels built, a device usable, and torch built with CUDA); ``reason`` (why not
    usable, with what to do; None when usable).

    The runtime is linked statically, so it needs a driver that supports its CUDA version,
    independently of the runtime PyTorch ships with.
    """
    raw = core().cuda_status()
    status = {
        "built": cuda_built(),
        "runtime": _version(raw["runtime_version"]) if raw["runtime_version"] else None,
        "driver": _version(raw["driver_version"]) if raw["driver_version"] else None,
        "devices": int(raw["device_count"]),
    }
    status["reason"] = cuda_unusable_reason(status["built"], raw["runtime_version"], raw["driver_version"],
                                            status["devices"], raw["error"], torch.cuda.is_available())
    status["usable"] = status["reason"] is None
    return status


def cuda_unusable_reason(built: bool, runtime_version: int, driver_version: int, devices: int,
                         error: str, torch_cuda: bool):
    """Why the CUDA kernels cannot run (None when they can), from what the linked runtime
    reports (versions as 1000 * major + 10 * minor, 0 when absent) and whether torch has CUDA."""
    rebuild = "pip install --no-build-isolation -C cmake.define.QUADMAMBA_CUDA=ON ."
    if not built:
        return f"this quadmamba build has no CUDA kernels; rebuild with the CUDA toolkit on PATH: {rebuild}"
    runtime = _version(runtime_version)
    if devices == 0 and driver_version == 0:
        return (f"no NVIDIA driver was found (quadmamba's CUDA kernels link the CUDA {runtime} runtime "
                f"and need a driver that supports CUDA {runtime}); CUDA runtime: {error or 'no device'}")
    if devices == 0 and driver_version // 1000 < runtime_version // 1000:
        release = _DRIVER_FOR_CUDA.get(runtime_version // 1000)
        need = f" (release {release} or newer)" if release else ""
        return (f"the NVIDIA driver supports CUDA up to {_version(driver_version)}, but quadmamba's CUDA "
                f"kernels link the CUDA {runtime} runtime: update the driver{need}, or rebuild quadmamba "
                f"with a CUDA toolkit of version {_version(driver_version)} or older on PATH "
                f"(CUDACXX=/usr/local/cuda-<version>/bin/nvcc {rebuild} --force-reinstall)")
    if devices == 0:
        return f"the CUDA {runtime} runtime finds no usable device: {error or 'no device'}"
    if not torch_cuda:
        return (f"the CUDA runtime sees {devices} device(s), but this PyTorch has no CUDA "
                f"(torch {torch.__version__}): install a CUDA build of torch")
    return None


_CUDA_CHECKED = False


def _require_cuda() -> None:
    """Raises RuntimeError with the reason when CUDA tensors reach kernels that cannot run here."""
    global _CUDA_CHECKED
    if _CUDA_CHECKED:
        return
    reason = cuda_status()["reason"]
    if reason is not None:
        raise RuntimeError(f"quadmamba got CUDA tensors, but its CUDA kernels cannot run here: {reason}")
    _CUDA_CHECKED = True
