"""glibc's malloc settings for CPU work with large tensors.

With its defaults, glibc serves every allocation above its mmap threshold (128 KiB, raised
after frees up to 32 MiB) with fresh pages from the kernel and returns them on free. A
forward pass at batch 16 allocates activations of tens of MB per layer, so each call pays
the page faults (and the kernel's zeroing) of every such buffer again. ``tune_allocator()``
raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB, so that freed buffers
stay in the heap and the next call reuses them: at batch 16 on 2 cores the models ran
1.1-1.6x faster (QuadMamba-T inference 0.30 s instead of 0.39 s, a training step 1.05 s
instead of 1.31 s), and the process holds about its peak memory between calls (README,
Performance, CPU memory allocator). The ``quadmamba`` command calls it
(``QUADMAMBA_TUNE_ALLOCATOR=0`` turns that off); the library itself never changes the
process's allocator unasked.

The same settings from the environment, for any program:
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 30      # bytes: allocations below it come from the heap
TRIM_THRESHOLD = 2**31 - 1    # bytes of free heap top kept instead of returned to the kernel

_M_TRIM_THRESHOLD = -1        # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_ENV_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_tuned: tuple[int, int] | None = None   # the thresholds this process was given by tune_allocator


def _glibc_version() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")   # "glibc 2.36"; None or an error elsewhere
    except (AttributeError, ValueError, OSError):
        return None


def _environment_setting() -> str | None:
    """The environment variable that already sets glibc's thresholds or replaces malloc, if any."""
    for name in _ENV_SETTINGS:
        if name in os.environ:
            return name
    if any(t in os.environ.get("GLIBC_TUNABLES", "") for t in _ENV_TUNABLES):
        return "GLIBC_TUNABLES"
    if any(a in os.environ.get("LD_PRELOAD", "") for a in _OTHER_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def _check_bytes(value, name: str) -> int:
    """A mallopt threshold: an int from 0 to 2**31 - 1 (mallopt takes a C int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (bytes), got {type(value).__name__}")
    if not 0 <= value <= 2**31 - 1:
        raise ValueError(f"{name} must be between 0 and 2**31 - 1 bytes, got {value}")
    return value


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep large freed CPU buffers in glibc's heap for reuse (see the module docstring).

    Applies ``mallopt(M_MMAP_THRESHOLD, mmap_threshold)`` and ``mallopt(M_TRIM_THRESHOLD,
    trim_threshold)`` to this process and returns True. Returns False, changing nothing, where
    there is nothing to tune or the choice is already made: a C library other than glibc, or
    the environment setting the thresholds (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) or preloading another allocator
    (``LD_PRELOAD`` with jemalloc, tcmalloc or mimalloc). Calling it again is harmless.
    """
    global _tuned
    mmap_threshold = _check_bytes(mmap_threshold, "mmap_threshold")
    trim_threshold = _check_bytes(trim_threshold, "trim_threshold")
    if _glibc_version() is None or _environment_setting() is not None:
        return False
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    if not (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        raise RuntimeError(f"glibc's mallopt refused mmap_threshold={mmap_threshold}, "
                           f"trim_threshold={trim_threshold}")
    _tuned = (mmap_threshold, trim_threshold)
    return True


def _size_text(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 - 1 else f"{n / 2**20:g} MiB"


def describe_allocator() -> str:
    """One line on the CPU allocator of this process (``quadmamba info``, the benchmarks)."""
    version = _glibc_version()
    if version is None:
        return "not glibc's malloc: nothing to tune"
    if _tuned is not None:
        return (f"{version} malloc, tuned: buffers under {_size_text(_tuned[0])} reused from the heap, "
                f"up to {_size_text(_tuned[1])} of free heap kept (QUADMAMBA_TUNE_ALLOCATOR=0: defaults)")
    setting = _environment_setting()
    if setting is not None:
        return f"{version} malloc as set by the environment ({setting})"
    return (f"{version} malloc defaults: large buffers page-fault on every call "
            "(quadmamba.tune_allocator() keeps them for reuse)")
