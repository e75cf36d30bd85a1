"""The core on other compilers and CPUs, and under sanitizers: builds the C++ core and its
GoogleTest executables with Clang, cross-builds them for aarch64 to run under qemu-user
(.ci/aarch64), builds them with AddressSanitizer + UndefinedBehaviorSanitizer and with
ThreadSanitizer, and runs the CUDA kernels' C++ tests on the CPU emulation of CUDA
(tests/cuda_emu).

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
from cpu_paths import CPU_PATHS, path_env

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("QUADMAMBA_REQUIRE_CPP_TESTS") == "1"
# AddressSanitizer + UndefinedBehaviorSanitizer: compiler / linker flags and run-time options.
ASAN_UBSAN_FLAGS = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
ASAN_UBSAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}


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


def _build_cpp_tests(build: Path, env: dict, cmake_args=(), targets=()) -> None:
    """Configures and builds the core + C++ tests (no Python, no CUDA) into `build` (only
    `targets` when given)."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = _run(["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DQUADMAMBA_PYTHON=OFF",
                      "-DQUADMAMBA_CUDA=OFF", "-DQUADMAMBA_TESTS=ON", *cmake_args], env=env)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    if "C++ tests in" not in configure.stdout:
        _missing("GoogleTest (libgtest-dev)")
    compiled = _run(["cmake", "--build", str(build), "-j2", *(["--target", *targets] if targets else [])], env=env)
    assert compiled.returncode == 0, compiled.stdout[-4000:] + compiled.stderr[-2000:]


def _build_and_run_cpp_tests(build: Path, env: dict, cmake_args=(), paths=("native", "portable")) -> None:
    """_build_cpp_tests, then every test executable once per CPU path (cpu_paths.py; "avx2"
    only where the CPU has AVX-512)."""
    env = path_env("native", env)
    _build_cpp_tests(build, env, cmake_args)
    binaries = sorted((build / "cpp_tests").glob("test_*"))
    assert [b.name for b in binaries] == sorted(p.stem for p in (ROOT / "tests" / "cpp").glob("test_*.cpp"))
    for binary in binaries:
        for path in (p for p in paths if p in CPU_PATHS):
            result = _run([str(binary), "--gtest_brief=1"], env=path_env(path, env))
            assert result.returncode == 0, \
                f"{binary.name} ({path}: {CPU_PATHS[path]}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_core_with_clang(tmp_path):
    _need("clang", "clang++", "cmake")
    _build_and_run_cpp_tests(tmp_path / "build", dict(os.environ, CC="clang", CXX="clang++"), paths=tuple(CPU_PATHS))


def _need_sanitizer_runtime(runtime: str) -> None:
    cxx = os.environ.get("CXX", "c++")
    lib = _run([cxx, f"-print-file-name={runtime}"]).stdout.strip()
    if not lib or not Path(lib).is_file():
        _missing(f"the sanitizer runtime {runtime} for {cxx}")


def _build_sanitized(build: Path, flags: str, runtime: str, env: dict, extra_args=(),
                     paths=("native", "portable")) -> None:
    """_build_and_run_cpp_tests with every object and executable built with `flags`
    (-fsanitize=...), when the compiler has the sanitizer's `runtime` library."""
    _need("cmake")
    _need_sanitizer_runtime(runtime)
    _build_and_run_cpp_tests(build, env, cmake_args=(
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo", f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_EXE_LINKER_FLAGS={flags}",
        *extra_args), paths=paths)


def test_core_under_sanitizers(tmp_path):
    """Every C++ test, on every code path (native, AVX2 below AVX-512, no AVX, no intrinsics),
    with ASan + UBSan: out-of-bounds or misaligned accesses and undefined arithmetic fail the test."""
    _build_sanitized(tmp_path / "build", ASAN_UBSAN_FLAGS, "libasan.so", dict(os.environ, **ASAN_UBSAN_ENV),
                     paths=tuple(CPU_PATHS))


def test_core_on_aarch64_under_qemu(tmp_path):
    _need("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc", "qemu-aarch64", "cmake",
          paths=("/usr/src/googletest",))
    result = _run(["bash", str(ROOT / ".ci" / "aarch64")], env=dict(os.environ, WORK=str(tmp_path)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count("(aarch64, qemu)") == len(list((ROOT / "tests" / "cpp").glob("test_*.cpp"))), \
        result.stdout[-2000:]
    assert "FAILED" not in result.stdout, result.stdout[-4000:]


def test_core_under_thread_sanitizer(tmp_path):
    """Every C++ test with ThreadSanitizer, on the std::thread workers (OpenMP off: TSan does not
    see into libgomp): a data race between the kernels' threads fails the test."""
    _build_sanitized(tmp_path / "build", "-fsanitize=thread", "libtsan.so",
                     dict(os.environ, TSAN_OPTIONS="halt_on_error=1"),
                     extra_args=("-DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON",))


def test_cuda_kernels_under_the_cpu_emulator(tmp_path):
    """The CUDA kernels (cuda/*.cu) compiled as C++ against the CPU emulation of CUDA in
    tests/cuda_emu (every CUDA thread a fiber; see qm_cuda_emu.h), with ASan + UBSan on the
    kernels, and the CUDA cases of the C++ tests run against the CPU kernels under two
    schedules of the threads: `shuffle:1` (random order, warps at random speeds: a missing
    __syncthreads shows up as a wrong result) and `reverse`. The emulator's own tests first."""
    _need("cmake")
    _need_sanitizer_runtime("libasan.so")
    build = tmp_path / "build"
    env = path_env("native", dict(os.environ, **ASAN_UBSAN_ENV))
    _build_cpp_tests(build, env, cmake_args=(
        "-DQUADMAMBA_CUDA_EMULATOR=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        f"-DQUADMAMBA_CUDA_EMULATOR_FLAGS={ASAN_UBSAN_FLAGS}", f"-DCMAKE_EXE_LINKER_FLAGS={ASAN_UBSAN_FLAGS}"),
        targets=("test_cuda_emu", "test_selective_scan", "test_quad_scan"))

    def run(binary: str, gtest_filter: str, order: str, cases: int) -> None:
        result = _run([str(build / "cpp_tests" / binary), f"--gtest_filter={gtest_filter}", "--gtest_brief=1"],
                      env=dict(env, QM_CUDA_EMU_ORDER=order))
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{binary} ({order}):\n{output[-6000:]}"
        assert f"[  PASSED  ] {cases} test" in output and "SKIPPED" not in output, output[-3000:]

    run("test_cuda_emu", "*", "shuffle:1", 11)
    for order in ("shuffle:1", "reverse"):
        run("test_selective_scan", "*Cuda*", order, 4)
        run("test_quad_scan", "*Cuda*", order, 4)   # with CudaDeviceGuard
