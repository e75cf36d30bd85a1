"""Rewrites the kernel launches of a CUDA source for the CPU emulation used by the tests
(tests/cuda_emu/include/qm_cuda_emu.h):

    kernel<T, 1><<<grid, block, smem, stream>>>(args)
 -> ::qm_emu::launcher(kernel<T, 1>, grid, block, smem, stream)(args)

With --fast-math (the CUDA builds compile with --use_fast_math) every call of expf becomes
::qm_emu::fast_expf, which rounds as the __expf intrinsic does, and every launch goes through
::qm_emu::fast_math_launcher, which flushes denormals to zero during the kernel (-ftz=true).

Usage: python translate.py [--fast-math] IN.cu OUT.cpp. Line numbers are kept (#line), so
compiler messages and sanitizer reports point into IN.cu.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# A kernel name with an optional template argument list (no nested <>), then <<<...>>>.
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>", re.S)
EXPF = re.compile(r"(?<![\w:.])expf\s*\(")


def translate(text: str, name: str, fast_math: bool = False) -> str:
    launcher = "::qm_emu::fast_math_launcher" if fast_math else "::qm_emu::launcher"
    body = LAUNCH.sub(lambda m: f"{launcher}({m[1]}, {m[2]})", text)
    if "<<<" in body:
        raise SystemExit(f"{name}: a kernel launch was not recognised")
    if fast_math:
        body = EXPF.sub("::qm_emu::fast_expf(", body)
    return f'#line 1 "{name}"\n{body}'


def main() -> None:
    args = sys.argv[1:]
    fast_math = "--fast-math" in args
    src, dst = (Path(a) for a in args if a != "--fast-math")
    text = translate(src.read_text(), str(src.resolve()), fast_math)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)


if __name__ == "__main__":
    main()
