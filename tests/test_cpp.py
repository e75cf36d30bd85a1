"""Runs the C++ kernel tests (GoogleTest executables built by CMake from
tests/cpp/test_*.cpp) as pytest items, one item per C++ test case.

The executables are looked up in $QUADMAMBA_CPP_TEST_DIR, else in the newest
build/*/cpp_tests folder of the checkout. A missing executable is a skip that
says why, unless QUADMAMBA_REQUIRE_CPP_TESTS=1 (as in CI), where it fails.

Every case runs with the instruction sets the kernels pick on this CPU ("native"),
with the selective scan held at AVX2 where the CPU has AVX-512 ("avx2"), and with
QUADMAMBA_CPU_GENERIC=2 ("portable": no AVX and no x86 intrinsics, the code non-x86
builds run); see cpu_paths.py.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cpu_paths import CPU_PATHS, path_env

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tests" / "cpp").glob("test_*.cpp"))
REQUIRED = os.environ.get("QUADMAMBA_REQUIRE_CPP_TESTS") == "1"


def _test_dir() -> Path | None:
    if os.environ.get("QUADMAMBA_CPP_TEST_DIR"):
        return Path(os.environ["QUADMAMBA_CPP_TEST_DIR"])
    found = sorted((ROOT / "build").glob("*/cpp_tests"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _cases():
    folder = _test_dir()
    for source in SOURCES:
        binary = folder / source.stem if folder else None
        if binary is None or not binary.exists():
            yield pytest.param(source.stem, None, id=f"{source.stem}::not-built")
            continue
        listing = subprocess.run(
            [str(binary), "--gtest_list_tests"], capture_output=True, text=True, check=True
        ).stdout
        suite = None
        for line in listing.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line.startswith(" "):
                suite = line.strip()
            else:
                case = line.split("#")[0].strip()
                yield pytest.param(str(binary), f"{suite}{case}", id=f"{source.stem}::{suite}{case}")


ISAS = [p for p in CPU_PATHS if p != "sse2"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("binary,case", list(_cases()))
def test_cpp(binary, case, isa):
    if case is None:
        reason = (
            f"C++ test executable {binary} was not built (install libgtest-dev and rebuild: "
            "pip install --no-build-isolation -e .)"
        )
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [binary, f"--gtest_filter={case}", "--gtest_color=no"], capture_output=True, text=True, env=path_env(isa)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    if "[  SKIPPED ]" in output:
        pytest.skip(output.split("[  SKIPPED ]")[0].strip().splitlines()[-1])
