"""The CUDA status of an install: what the linked runtime reports, why CUDA kernels cannot run
(with what to do), and the error a CUDA tensor meets when they cannot."""
import types

import pytest
import torch

import quadmamba
from quadmamba import _backend
from quadmamba._backend import cuda_unusable_reason


def test_status_agrees_with_the_build():
    status = quadmamba.cuda_status()
    assert set(status) == {"built", "runtime", "driver", "devices", "usable", "reason"}
    assert status["built"] == quadmamba.cuda_built()
    assert status["usable"] == quadmamba.cuda_available() == (status["reason"] is None)
    if not status["built"]:
        assert (status["runtime"], status["driver"], status["devices"]) == (None, None, 0)
        assert "no CUDA kernels" in status["reason"] and "QUADMAMBA_CUDA=ON" in status["reason"]
    else:
        major, minor = map(int, status["runtime"].split("."))
        assert major >= 11, status
    if not torch.cuda.is_available():
        assert not status["usable"] and status["reason"], status


@pytest.mark.parametrize("case,args,fragments", [
    ("cpu-only build", (False, 0, 0, 0, "", False),
     ["no CUDA kernels", "cmake.define.QUADMAMBA_CUDA=ON"]),
    ("no driver", (True, 13000, 0, 0, "CUDA driver version is insufficient for CUDA runtime version", False),
     ["no NVIDIA driver", "CUDA 13.0 runtime", "insufficient"]),
    ("old driver", (True, 13000, 12040, 0, "CUDA driver version is insufficient for CUDA runtime version", True),
     ["supports CUDA up to 12.4", "CUDA 13.0 runtime", "release 580 or newer", "CUDACXX="]),
    ("old driver, unknown release", (True, 14020, 13000, 0, "insufficient", True),
     ["supports CUDA up to 13.0", "CUDA 14.2 runtime", "update the driver, or rebuild"]),
    ("no device", (True, 12080, 12080, 0, "no CUDA-capable device is detected", False),
     ["finds no usable device", "no CUDA-capable device"]),
    ("CPU build of torch", (True, 13000, 13000, 2, "", False), ["2 device(s)", "CUDA build of torch"]),
])
def test_unusable_reasons_say_what_to_do(case, args, fragments):
    reason = cuda_unusable_reason(*args)
    for fragment in fragments:
        assert fragment in reason, (case, reason)


def test_usable_when_driver_device_and_torch_agree():
    assert cuda_unusable_reason(True, 13000, 13010, 1, "", True) is None
    assert cuda_unusable_reason(True, 12080, 12020, 1, "", True) is None  # minor versions: compatible


def test_cuda_tensor_meets_the_reason(monkeypatch):
    """A CUDA tensor reaching the kernels where they cannot run: a RuntimeError with the reason
    (checked before any kernel is called; stream() takes the tensor's device only)."""
    monkeypatch.setattr(_backend, "_CUDA_CHECKED", False)
    monkeypatch.setattr(_backend, "cuda_status", lambda: {"reason": "the NVIDIA driver supports CUDA up to 12.4"})
    fake = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="CUDA kernels cannot run here: the NVIDIA driver supports CUDA up to 12.4"):
        _backend.stream(fake)
    assert _backend.stream(torch.zeros(1)) == 0  # CPU tensors: no check, stream 0
