"""The benchmark scripts run (tiny settings, CPU) and print their tables: a broken bench is
found here rather than on a GPU machine's time (bench/gpu_check.sh runs them there). Only the
tables' shape is checked, never a time."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[\d.]+"


def _bench(script: str, *args: str, timeout: int = 600, allocator_line: bool = True) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert not allocator_line or "CPU allocator: " in proc.stdout, proc.stdout
    return proc.stdout


def test_bench_model_rows_and_ratios():
    out = _bench("bench_model.py", "--variants", "nano", "--batches", "2", "--modes", "infer", "train",
                 "--img-size", "32", "--iters", "1", "--device", "cpu")
    for mode in ("infer", "train"):
        assert re.search(rf"^quadmamba_nano\s+2 {mode}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x$", out, re.M), out


def test_bench_model_compares_the_allocator_settings():
    out = _bench("bench_model.py", "--variants", "nano", "--batches", "2", "--modes", "infer", "--img-size", "32",
                 "--iters", "1", "--kernels", "fused", "--compare-allocator", "--rounds", "1", allocator_line=False)
    assert "default: glibc's malloc settings; tuned: quadmamba.tune_allocator()" in out, out
    assert re.search(rf"^quadmamba_nano\s+2 infer\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x\s+\d+\s+\d+$", out, re.M), out


def test_bench_quad_scan_table():
    out = _bench("bench_quad_scan.py", "--repeat", "1")
    rows = re.findall(r"^\| (quad_scan|quad_merge|cross_scan|cross_merge)\s+\| ([\d,]+)\s+\| (fwd\+bwd|fwd)\s+\|"
                      + rf"(?:\s+{NUMBER}x? \|){{6}}$", out, re.M)
    assert len(rows) == 24, out      # 6 op/pass pairs x 4 shapes


@pytest.mark.parametrize("args,row", [
    (["--quick", "--only", "T stage", "--skip-ref"], r"^\| T stage0 \| 1 \| 128 \| 3136 \| 1 \|"),
    (["--compare-isa", "--quick", "--only", "T stage", "--rounds", "1"], r"^\| T stage0 B1 \| "),
    (["--low-rank", "--quick"], r"^\| S stage2 \| 8 \| 3072 \| 196 \| 24 \|"),
])
def test_bench_selective_scan_modes(args, row):
    out = _bench("bench_selective_scan.py", *args)
    assert re.search(row, out, re.M), out


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
