"""Shared timing helpers for the bench scripts: warm-up + median wall time, an
environment line, and the CPU copy bandwidth measured in the same run."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def median_ms(fn, warmup: int = 3, repeat: int = 15) -> float:
    """Median wall time of fn() in milliseconds (CUDA synchronised when available)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(megabytes: int = 256, device: str = "cpu") -> float:
    """Bandwidth of dst.copy_(src) in GB/s, counting one read and one write."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=2, repeat=9)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu '{cpu}' "
        f"({os.cpu_count()} logical), python {platform.python_version()}"
    )
