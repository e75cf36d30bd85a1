"""quadmamba.tune_allocator: glibc's malloc keeps large freed buffers for reuse."""
import os
import subprocess
import sys
import textwrap

import pytest

import quadmamba
from quadmamba import allocator

PYTHON_DIR = os.path.join(os.path.dirname(__file__), "..", "python")
SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
glibc = pytest.mark.skipif(allocator._glibc_version() is None, reason="the C library is not glibc")


def _run(code: str, env: dict | None = None) -> str:
    """Runs `code` in a fresh Python with none of the malloc settings in its environment (plus `env`)."""
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    clean["PYTHONPATH"] = os.path.abspath(PYTHON_DIR) + os.pathsep + clean.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(clean, **(env or {})), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# A 64 MiB block malloc'd and freed: where it came from (mmap'd bytes while held) and what the
# heap keeps after the free (glibc's mallinfo2, or mallinfo before glibc 2.33).
PROBE = """
    import ctypes
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int)
                    for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                              "uordblks", "fordblks", "keepcost")]
    info = libc.mallinfo2 if hasattr(libc, "mallinfo2") else libc.mallinfo
    info.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)

    def probe():
        size = 64 << 20
        before = info().hblkhd
        p = libc.malloc(size)
        mapped = info().hblkhd - before >= size
        libc.free(p)
        return mapped, info().fordblks >= size
"""


@glibc
def test_large_blocks_come_from_the_heap_and_stay_there_once_tuned():
    out = _run(PROBE + """
    print("default", *probe())
    import quadmamba
    print("tuned", quadmamba.tune_allocator(), *probe())
    print("again", quadmamba.tune_allocator(), *probe())
    """)
    lines = out.split("\n")
    assert lines[0] == "default True False", out     # mmap'd, and returned on free
    assert lines[1] == "tuned True False True", out   # from the heap, kept after the free
    assert lines[2] == "again True False True", out


@glibc
@pytest.mark.parametrize("env,name", [
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES"),
])
def test_settings_from_the_environment_are_left_alone(env, name):
    out = _run(PROBE + """
    import quadmamba
    from quadmamba.allocator import describe_allocator
    print(quadmamba.tune_allocator(), *probe())
    print(describe_allocator())
    """, env)
    first, described = out.split("\n")[:2]
    assert first == "False True False", out           # still mmap'd at this size: untouched
    assert described.endswith(f"malloc as set by the environment ({name})"), out


def test_another_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setattr(allocator, "_tuned", None)   # whatever this test process did before
    if allocator._glibc_version() is None:
        pytest.skip("the C library is not glibc")
    assert quadmamba.tune_allocator() is False     # returns before any mallopt call
    assert allocator.describe_allocator().endswith("as set by the environment (LD_PRELOAD)")


def test_other_c_libraries_have_nothing_to_tune(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc_version", lambda: None)
    assert quadmamba.tune_allocator() is False
    assert allocator.describe_allocator() == "not glibc's malloc: nothing to tune"


@glibc
def test_describe_names_the_defaults_and_the_tuned_thresholds():
    out = _run("""
    import quadmamba
    from quadmamba.allocator import describe_allocator
    print(describe_allocator())
    quadmamba.tune_allocator(64 << 20, 256 << 20)
    print(describe_allocator())
    """)
    defaults, tuned = out.split("\n")[:2]
    assert defaults.endswith("malloc defaults: large buffers page-fault on every call "
                             "(quadmamba.tune_allocator() keeps them for reuse)"), out
    assert "tuned: buffers under 64 MiB reused from the heap, up to 256 MiB of free heap kept" in tuned, out


@pytest.mark.parametrize("kwargs,error,match", [
    ({"mmap_threshold": 1.5}, TypeError, "mmap_threshold must be an int"),
    ({"mmap_threshold": True}, TypeError, "mmap_threshold must be an int"),
    ({"trim_threshold": "1"}, TypeError, "trim_threshold must be an int"),
    ({"mmap_threshold": -1}, ValueError, "mmap_threshold must be between 0 and 2\\*\\*31 - 1 bytes, got -1"),
    ({"trim_threshold": 2**31}, ValueError, "trim_threshold must be between"),
])
def test_bad_thresholds(kwargs, error, match):
    with pytest.raises(error, match=match):
        quadmamba.tune_allocator(**kwargs)
