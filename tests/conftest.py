import subprocess
import sys

import pytest
import torch

import quadmamba
from cpu_paths import path_env


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


@pytest.fixture
def run_on_cpu_path():
    """run_on_cpu_path(test_file, selection, path="sse2"): runs `pytest -k selection` on test_file
    in a subprocess on CPU path `path` of cpu_paths.py ("avx2": the selective scan's AVX2 copy on
    a CPU with AVX-512; "sse2": the CPU kernels without their AVX paths; "portable": without any
    x86 intrinsics, as non-x86 builds) and returns the completed process."""
    def run(test_file, selection, path="sse2"):
        env = path_env(path)
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), "-k", selection],
            env=env, capture_output=True, text=True, timeout=600,
        )
    return run


@pytest.fixture
def export_targets():
    """export_targets(program): the call_function targets of a torch.export program's graph,
    in order, as strings (e.g. "quadmamba.selective_scan.default")."""
    def targets(program):
        return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    return targets
