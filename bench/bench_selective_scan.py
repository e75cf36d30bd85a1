"""Benchmark of quadmamba.ops.selective_scan at the shapes the models run.

For each shape: forward, backward and forward+backward times of the fused op, the
achieved GB/s and the fraction of the copy-bandwidth floor, and the ratio to
  - selective_scan_ref (the sequential plain-PyTorch specification), and
  - selective_scan_chunked_ref (the fastest plain-PyTorch formulation here: a
    chunked closed form; the best chunk length of those tried is used),
all measured in the same run. Times are the best of several runs (the sequential
reference: one run after no warm-up). Bytes moved (KERNELS.md), e = element size:
  forward  (3 B*KD*L + 2 B*K*N*L) * e     (read u, delta, B, C; write y)
  backward (5 B*KD*L + 4 B*K*N*L) * e     (read u, delta, dy, B, C; write du, ddelta, dB, dC)

Usage: PYTHONPATH=python python bench/bench_selective_scan.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import copy_bandwidth, environment, time_fn  # noqa: E402

from quadmamba.ops import selective_scan  # noqa: E402
from quadmamba.ops.reference import selective_scan_chunked_ref, selective_scan_ref  # noqa: E402

# (label, B, K, KD, L, N)
SHAPES = [
    ("S stage0", 1, 2, 384, 3136, 1),
    ("S stage0", 8, 2, 384, 3136, 1),
    ("S stage2", 1, 4, 3072, 196, 1),
    ("S stage2", 8, 4, 3072, 196, 1),
    ("T stage0", 1, 2, 128, 3136, 1),
    ("N=16", 1, 1, 256, 4096, 16),
]
CHUNKS = (16, 32)


def make_inputs(batch, groups, channels, length, dstate, device, dtype=torch.float32):
    u = torch.randn(batch, channels, length, device=device, dtype=dtype)
    delta = torch.randn(batch, channels, length, device=device, dtype=dtype) * 0.5 - 1.0
    A = -torch.rand(channels, dstate, device=device) * 2 - 0.2
    B = torch.randn(batch, groups, dstate, length, device=device, dtype=dtype)
    C = torch.randn(batch, groups, dstate, length, device=device, dtype=dtype)
    D = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device) * 0.3
    return [u, delta, A, B, C, D, bias]


def fwd_bwd_times(fn, inputs, device, reps, min_seconds=0.0):
    """(forward, forward+backward) median seconds of fn on inputs (gradients for all)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad = torch.randn_like(inputs[0])

    def forward():
        with torch.no_grad():
            fn(*leaves)

    def forward_backward():
        y = fn(*leaves)
        torch.autograd.grad(y, leaves, grad)

    warm = 1 if reps > 1 else 0
    t_f = time_fn(forward, device, warmup=warm, reps=reps, min_seconds=min_seconds)
    t_fb = time_fn(forward_backward, device, warmup=warm, reps=reps, min_seconds=min_seconds)
    return t_f, t_fb


def op_backward_time(inputs, device, reps, min_seconds):
    grad = torch.randn_like(inputs[0])
    return time_fn(lambda: torch.ops.quadmamba.selective_scan_bwd(grad, *inputs, True), device,
                   warmup=1, reps=reps, min_seconds=min_seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default=None, help="run only the shapes whose label contains this")
    parser.add_argument("--skip-ref", action="store_true", help="do not time the sequential reference")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    reps = 3 if args.quick else 10
    min_seconds = 0.2 if args.quick else 1.0

    print(environment())
    bandwidth = copy_bandwidth(device)
    print(f"{device.type} copy bandwidth (read + write): {bandwidth:.1f} GB/s")
    print("times in ms; GB/s = bytes / time; floor = fraction of the copy bandwidth; "
          "x ref = sequential reference time / op time; x chunked = best chunked-ref time / op time\n")
    header = ("| shape | B | KD | L | N | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s | floor fwd/bwd "
              "| ref fwd+bwd ms | x ref | chunked fwd+bwd ms (T) | x chunked |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, batch, groups, channels, length, dstate in SHAPES:
        if args.only and args.only not in label:
            continue
        inputs = make_inputs(batch, groups, channels, length, dstate, device)
        e = inputs[0].element_size()
        fwd_bytes = (3 * batch * channels * length + 2 * batch * groups * dstate * length) * e
        bwd_bytes = (5 * batch * channels * length + 4 * batch * groups * dstate * length) * e
        t_f, t_fb = fwd_bwd_times(selective_scan, inputs, device, reps, min_seconds)
        t_b = op_backward_time(inputs, device, reps, min_seconds)

        # Sequential reference: one timed run. Its cost is linear in B and L, so at batch > 1 it
        # runs at batch 1 and beyond L = 3136 at L = 2048 (autograd through longer step-by-step
        # graphs is very slow), scaled up and labelled, e.g. "(B=1 x8)".
        ref_note = ""
        if args.skip_ref:
            ref_fb = float("nan")
        else:
            ref_len = length if length <= 3136 else 2048
            scale = batch * length / ref_len
            if scale != 1:
                ref_note = f" (B=1, L={ref_len} x{scale:g})" if ref_len != length else f" (B=1 x{batch})"
            ref_inputs = make_inputs(1, groups, channels, ref_len, dstate, device) if scale != 1 else inputs
            _, ref_fb = fwd_bwd_times(selective_scan_ref, ref_inputs, device, reps=1)
            ref_fb *= scale

        best = None
        for chunk in CHUNKS:
            fn = lambda *x, chunk=chunk: selective_scan_chunked_ref(*x, chunk=chunk)  # noqa: E731
            try:
                _, t = fwd_bwd_times(fn, inputs, device, reps=3)
            except RuntimeError as exc:  # out of memory at large shapes
                print(f"  chunked ref T={chunk} failed: {exc}", file=sys.stderr)
                continue
            if best is None or t < best[0]:
                best = (t, chunk)
        chunk_txt = f"{best[0] * 1e3:.1f} ({best[1]})" if best else "n/a"
        x_chunk = f"{best[0] / t_fb:.1f}" if best else "n/a"
        floor = f"{fwd_bytes / t_f / 1e9 / bandwidth:.2f}/{bwd_bytes / t_b / 1e9 / bandwidth:.2f}"
        print(
            f"| {label} | {batch} | {channels} | {length} | {dstate} | {t_f * 1e3:.2f} | {t_b * 1e3:.2f} "
            f"| {t_fb * 1e3:.2f} | {fwd_bytes / t_f / 1e9:.1f} | {bwd_bytes / t_b / 1e9:.1f} | {floor} "
            f"| {ref_fb * 1e3:.0f}{ref_note} | {ref_fb / t_fb:.0f} | {chunk_txt} | {x_chunk} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
