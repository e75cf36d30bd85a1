"""Shared benchmark helpers: environment report, timing, copy bandwidth."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 1, reps: int = 5, min_seconds: float = 0.0) -> float:
    """Best (minimum) wall time of fn() in seconds over the timed runs, after `warmup` calls
    (device work included). The minimum is the least disturbed by other load on the machine.

    With min_seconds > 0, repeats until at least that much time was spent (at least `reps` runs).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def time_interleaved(fns: dict, device: torch.device, *, warmup: int = 1, reps: int = 5,
                     max_seconds: float = float("inf")) -> dict:
    """Median wall time in seconds of each fn in ``fns`` (name -> fn), timed in turns: one call
    of each per round, so slow drifts of the machine (other load, the allocator's state) reach
    every fn alike and their ratios compare like with like. Stops after ``reps`` rounds, or
    earlier once ``max_seconds`` have passed (at least one round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    start_all = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
        if time.perf_counter() - start_all > max_seconds:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second) of a large tensor copy."""
    n = megabytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * n * 4 / seconds / 1e9


def add_allocator_option(parser) -> None:
    """--allocator tuned|default (see apply_allocator)."""
    parser.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                        help="tuned (default): quadmamba.tune_allocator(), as the quadmamba command runs; "
                             "default: glibc's own settings (large buffers page-fault on every call)")


def apply_allocator(choice: str) -> bool:
    """Tunes glibc's malloc for this process when choice is "tuned" (quadmamba.tune_allocator);
    whether it did. environment() names the state either way."""
    from quadmamba.allocator import tune_allocator

    return choice == "tuned" and tune_allocator()


def environment() -> str:
    from quadmamba.allocator import describe_allocator

    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
        f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"CPU allocator: {describe_allocator()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
