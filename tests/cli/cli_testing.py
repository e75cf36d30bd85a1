"""Helpers for the command-line tests: run the command, check its errors."""
import os
import subprocess
import sys
from unittest import mock

import numpy as np
from PIL import Image

PYTHON_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "python")

# Tiny settings shared by the tests: a few batches of 32x32 digits on the reference ops.
TINY = ["--kernels", "reference", "--epochs", "2", "--batch-size", "16", "--train-limit", "48",
        "--test-limit", "32", "--img-size", "32"]


def run_cli(*args, cwd=None, timeout=300, env=None, unset=()):
    """Run ``python -m quadmamba ARGS`` in a fresh process (``env``: extra variables, set after
    the names in ``unset`` are removed); returns CompletedProcess."""
    env = dict({k: v for k, v in os.environ.items() if k not in unset}, **(env or {}))
    env["PYTHONPATH"] = os.path.abspath(PYTHON_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("QUADMAMBA_TRACEBACK", None)
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-m", "quadmamba", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def run_main(capsys, *args):
    """quadmamba.cli.main in this process: (exit code, stdout, stderr). The test process keeps
    its own allocator settings (the command's tune_allocator is tested in subprocesses)."""
    from quadmamba import cli

    with mock.patch.dict(os.environ, {"QUADMAMBA_TUNE_ALLOCATOR": "0"}):
        code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(proc, *fragments):
    """Exit status 1, exactly one line on stderr starting 'quadmamba: error:', no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr: {proc.stderr!r}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {proc.stderr!r}"
    assert lines[0].startswith("quadmamba: error: "), lines[0]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def make_folder(root, layout="flat", n=6, size=20, corrupt=None):
    """Two classes of synthetic photos: bright-left vs bright-right gradients (RGB PNG/JPEG)."""
    rng = np.random.default_rng(0)
    splits = {"flat": [root], "split": [root / "train", root / "val"]}[layout]
    for split in splits:
        for label, name in enumerate(("left", "right")):
            folder = split / name
            folder.mkdir(parents=True)
            for i in range(n):
                ramp = np.linspace(0, 1, size)[None, :, None] * np.ones((size, size, 3))
                img = ramp if label else ramp[:, ::-1]
                img = np.clip(img + 0.1 * rng.standard_normal(img.shape), 0, 1)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray((255 * img).astype(np.uint8)).save(folder / f"{i}.{ext}")
    if corrupt is not None:
        (root / corrupt).write_bytes(b"this is not an image")
    return root
