import pytest
import torch

import quadmamba


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(params=_devices())
def device(request):
    """Every device the kernels can run on here; CUDA only when built and present."""
    if request.param == "cuda" and not quadmamba.cuda_available():
        pytest.skip("CUDA device present but quadmamba was built without CUDA kernels")
    return torch.device(request.param)
