"""The core on other compilers and CPUs: builds the C++ core and its GoogleTest executables
with Clang, and cross-builds them for aarch64 to run under qemu-user (.ci/aarch64).

Each test needs its tools (clang++, or g++-aarch64-linux-gnu + qemu-user) and GoogleTest's
sources or package; without them it is a skip that says what is missing, unless
QUADMAMBA_REQUIRE_CPP_TESTS=1 (as in CI), where it fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("QUADMAMBA_REQUIRE_CPP_TESTS") == "1"


def _missing(what: str) -> None:
    reason = f"needs {what} (Debian: apt-get install clang g++-aarch64-linux-gnu qemu-user libgtest-dev)"
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


def _need(*tools: str, paths: tuple = ()) -> None:
    missing = [t for t in tools if shutil.which(t) is None] + [p for p in paths if not Path(p).exists()]
    if missing:
        _missing(", ".join(missing))


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


def test_core_with_clang(tmp_path):
    _need("clang", "clang++", "cmake")
    env = dict(os.environ, CC="clang", CXX="clang++")
    env.pop("QUADMAMBA_CPU_GENERIC", None)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    configure = _run(["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DQUADMAMBA_PYTHON=OFF",
                      "-DQUADMAMBA_CUDA=OFF", "-DQUADMAMBA_TESTS=ON"], env=env)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    if "C++ tests in" not in configure.stdout:
        _missing("GoogleTest for Clang (libgtest-dev)")
    compiled = _run(["cmake", "--build", str(build), "-j2"], env=env)
    assert compiled.returncode == 0, compiled.stdout[-4000:] + compiled.stderr[-2000:]
    binaries = sorted((build / "cpp_tests").glob("test_*"))
    assert [b.name for b in binaries] == sorted(p.stem for p in (ROOT / "tests" / "cpp").glob("test_*.cpp"))
    for binary in binaries:
        for level in ("", "2"):                           # native paths, then portable ones
            result = _run([str(binary), "--gtest_brief=1"], env=dict(env, QUADMAMBA_CPU_GENERIC=level))
            assert result.returncode == 0, f"{binary.name} (QUADMAMBA_CPU_GENERIC={level!r}):\n{result.stdout[-4000:]}"


def test_core_on_aarch64_under_qemu(tmp_path):
    _need("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc", "qemu-aarch64", "cmake",
          paths=("/usr/src/googletest",))
    result = _run(["bash", str(ROOT / ".ci" / "aarch64")], env=dict(os.environ, WORK=str(tmp_path)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count("(aarch64, qemu)") == len(list((ROOT / "tests" / "cpp").glob("test_*.cpp"))), \
        result.stdout[-2000:]
    assert "FAILED" not in result.stdout, result.stdout[-4000:]
