"""The CPU kernel paths the tests run on one machine, each named by the environment that
selects it (cpp/include/quadmamba/common.h): the kernels pick the widest instruction set the
CPU has ("native"); QUADMAMBA_CPU_NO_AVX512=1 holds the selective scan at its AVX2 copy
("avx2", listed only where the CPU has AVX-512, elsewhere it is "native");
QUADMAMBA_CPU_GENERIC=1 turns every AVX path off ("sse2" on x86) and =2 every x86 intrinsic
("portable": the code non-x86 builds run)."""
from __future__ import annotations

import os
from pathlib import Path

SELECTORS = ("QUADMAMBA_CPU_GENERIC", "QUADMAMBA_CPU_NO_AVX512")


def cpu_has_avx512() -> bool:
    """Whether the CPU has the AVX-512 subsets the selective scan's AVX-512 copy needs (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512vl", "avx512dq", "avx512bw"))


CPU_PATHS = {
    "native": {},
    **({"avx2": {"QUADMAMBA_CPU_NO_AVX512": "1"}} if cpu_has_avx512() else {}),
    "sse2": {"QUADMAMBA_CPU_GENERIC": "1"},
    "portable": {"QUADMAMBA_CPU_GENERIC": "2"},
}


def path_env(path: str, base: dict | None = None) -> dict:
    """`base` (default os.environ) with the selectors of CPU path `path` and no others."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in SELECTORS}
    env.update(CPU_PATHS[path])
    return env
