"""Rewrites the kernel launches of a CUDA source for the CPU emulation used by the tests
(tests/cuda_emu/include/qm_cuda_emu.h):

    kernel<T, 1><<<grid, block, smem, stream>>>(args)
 -> ::qm_emu::launcher(kernel<T, 1>, grid, block, smem, stream)(args)

Usage: python translate.py IN.cu OUT.cpp. Line numbers are kept (#line), so compiler
messages and sanitizer reports point into IN.cu.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# A kernel name with an optional template argument list (no nested <>), then <<<...>>>.
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>", re.S)


def translate(text: str, name: str) -> str:
    body = LAUNCH.sub(lambda m: f"::qm_emu::launcher({m[1]}, {m[2]})", text)
    if "<<<" in body:
        raise SystemExit(f"{name}: a kernel launch was not recognised")
    return f'#line 1 "{name}"\n{body}'


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    text = translate(src.read_text(), str(src.resolve()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)


if __name__ == "__main__":
    main()
