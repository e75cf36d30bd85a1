"""Benchmark of quadmamba.ops.selective_scan at the shapes the models run.

For each shape: forward, backward and forward+backward times of the fused op, the
achieved GB/s and the fraction of the copy-bandwidth floor, and the ratio to
  - selective_scan_ref (the sequential plain-PyTorch specification; one view per step
    through unbind, so autograd's backward stays linear in L),
  - selective_scan_chunked_ref (the fastest plain-PyTorch formulation here: a
    chunked closed form; the best chunk length of those tried is used), and
  - with --indexed-loop, indexed_loop below: the same recurrence written the common way,
    indexing step t of the (B, KD, N, L) tensors in the loop (the form of the reference
    scans that ship with Mamba-style code); autograd's backward of each index is a
    full-size tensor, so its backward grows about quadratically in L (minutes at
    S stage 0, batch 8),
all measured in the same run, fwd+bwd for the loops. Times are the best of several runs
(the sequential loop: best of 2 after a warm-up; the indexed loop: one run). Bytes moved
(each tensor read or written once, the least a pass can move), e = element size:
  forward  (3 B*KD*L + 2 B*K*N*L) * e     (read u, delta, B, C; write y)
  backward (5 B*KD*L + 4 B*K*N*L) * e     (read u, delta, dy, B, C; write du, ddelta, dB, dC)

With --compare-isa (CPU): the op's forward and fwd+bwd times on each CPU kernel copy this
machine can run (native, e.g. AVX-512; AVX2 where the CPU has AVX-512; the portable copy),
and the kernels alone (the core's entry points on preallocated outputs, ns per element),
each in a child process (the copy is chosen once per process, by the environment), the
children run in turns for several rounds, best time per copy; ratios to the native copy.

With --low-rank: the op with a low-rank delta (delta_proj, the models' dt_proj formed in the
kernels) against the composition the models used before, project_delta (a batched matmul) and
then the scan, at three model shapes, fwd and fwd+bwd.

Usage: PYTHONPATH=python python bench/bench_selective_scan.py [--device cpu|cuda] [--quick] [--indexed-loop]
       PYTHONPATH=python python bench/bench_selective_scan.py --compare-isa [--rounds 3] [--threads 1]
       PYTHONPATH=python python bench/bench_selective_scan.py --low-rank
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_allocator_option, apply_allocator, copy_bandwidth, environment, time_fn  # noqa: E402

from quadmamba.ops import selective_scan  # noqa: E402
from quadmamba.ops.reference import project_delta, selective_scan_chunked_ref, selective_scan_ref  # noqa: E402

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
# The loops run at most this many steps; longer shapes are timed at this length and scaled
# up in proportion, labelled, e.g. "(L=3136 x1.31)": exact for the sequential loop (its cost
# per step does not depend on L), an underestimate for the indexed loop (quadratic backward).
LOOP_MAX_LENGTH = 3136


def indexed_loop(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """selective_scan_ref's recurrence, indexing step t of full tensors in the loop."""
    channels = u.shape[1]
    per_group = channels // B.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = B.repeat_interleave(per_group, dim=1)                          # (B, KD, N, L)
    Cx = C.repeat_interleave(per_group, dim=1)
    decay = torch.exp(delta.unsqueeze(2) * A[None, :, :, None])
    drive = delta.unsqueeze(2) * Bx * u.unsqueeze(2)
    h = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + u * D[:, None]


def make_inputs(batch, groups, channels, length, dstate, device, dtype=torch.float32):
    u = torch.randn(batch, channels, length, device=device, dtype=dtype)
    delta = torch.randn(batch, channels, length, device=device, dtype=dtype) * 0.5 - 1.0
    A = -torch.rand(channels, dstate, device=device) * 2 - 0.2
    B = torch.randn(batch, groups, dstate, length, device=device, dtype=dtype)
    C = torch.randn(batch, groups, dstate, length, device=device, dtype=dtype)
    D = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device) * 0.3
    return [u, delta, A, B, C, D, bias]


def forward_backward(fn, inputs):
    """A closure running fn on copies of inputs and its backward to every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad = torch.randn_like(inputs[0])

    def run():
        torch.autograd.grad(fn(*leaves), leaves, grad)
    return run


def fwd_bwd_times(fn, inputs, device, reps, min_seconds=0.0):
    """(forward, forward+backward) best seconds of fn on inputs (gradients for all)."""
    def forward():
        with torch.no_grad():
            fn(*inputs)

    warm = 1 if reps > 1 else 0
    t_f = time_fn(forward, device, warmup=warm, reps=reps, min_seconds=min_seconds)
    t_fb = time_fn(forward_backward(fn, inputs), device, warmup=warm, reps=reps, min_seconds=min_seconds)
    return t_f, t_fb


def op_backward_time(inputs, device, reps, min_seconds):
    grad = torch.randn_like(inputs[0])
    return time_fn(lambda: torch.ops.quadmamba.selective_scan_bwd(grad, *inputs, True), device,
                   warmup=1, reps=reps, min_seconds=min_seconds)


def check_baselines(device):
    """Every baseline computes the op's function (small inputs, D and delta_bias given)."""
    inputs = make_inputs(2, 2, 8, 37, 4, device)
    with torch.no_grad():
        y = selective_scan(*inputs)
        for name, fn in (("selective_scan_ref", selective_scan_ref),
                         ("selective_scan_chunked_ref", lambda *x: selective_scan_chunked_ref(*x, chunk=16)),
                         ("indexed_loop", indexed_loop)):
            torch.testing.assert_close(fn(*inputs), y, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# CPU kernel copies for --compare-isa: name -> environment that selects it, as the tests name
# them (tests/cpu_paths.py; cpp/include/quadmamba/common.h); "avx2" only where the native copy
# is AVX-512.
ISA_ENVS = {"native": {}, "avx2": {"QUADMAMBA_CPU_NO_AVX512": "1"}, "portable": {"QUADMAMBA_CPU_GENERIC": "2"}}


def kernel_times(inputs, reps, min_seconds):
    """(forward s, backward s) of the core's CPU entry points on preallocated outputs: the
    kernels without the op's checks, allocations and autograd."""
    from quadmamba._backend import core, view

    u, delta, A, B, C, D, bias = inputs
    y, du, ddelta = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
    dy = torch.randn_like(u)
    dA, dB, dC, dD, dbias = (torch.empty_like(t) for t in (A, B, C, D, bias))
    ins = [view(t) for t in inputs]
    outs = [view(t) for t in (du, ddelta, dA, dB, dC, dD, dbias)]
    vy, vdy = view(y), view(dy)
    cpu = torch.device("cpu")
    t_f = time_fn(lambda: core().selective_scan_fwd(*ins, True, vy, 0), cpu, warmup=1, reps=reps,
                  min_seconds=min_seconds)
    t_b = time_fn(lambda: core().selective_scan_bwd(*ins, True, vdy, *outs, None, None, None, 0), cpu,
                  warmup=1, reps=reps, min_seconds=min_seconds)
    return t_f, t_b


def op_times(only, reps, min_seconds):
    """{label/batch: (op forward s, op fwd+bwd s, kernel forward s, kernel backward s, elements)}
    at every selected shape (CPU)."""
    times = {}
    for label, batch, groups, channels, length, dstate in SHAPES:
        if only and only not in label:
            continue
        inputs = make_inputs(batch, groups, channels, length, dstate, torch.device("cpu"))
        t_f, t_fb = fwd_bwd_times(selective_scan, inputs, torch.device("cpu"), reps, min_seconds)
        k_f, k_b = kernel_times(inputs, reps, min_seconds)
        times[f"{label} B{batch}"] = (t_f, t_fb, k_f, k_b, batch * channels * length)
    return times


def compare_isa(args, reps, min_seconds):
    """The op and its kernels on each CPU kernel copy, child processes in turns, best of
    args.rounds."""
    from quadmamba._backend import core

    native = core().cpu_isa()["selective_scan"]
    names = [n for n in ISA_ENVS if n != "avx2" or native == "avx512"]
    best = {}
    isa_of = {}
    for _ in range(args.rounds):
        for name in names:
            env = {k: v for k, v in os.environ.items() if k not in ("QUADMAMBA_CPU_GENERIC", "QUADMAMBA_CPU_NO_AVX512")}
            env.update(ISA_ENVS[name])
            cmd = [sys.executable, __file__, "--child-times", "--reps", str(reps), "--min-seconds", str(min_seconds),
                   "--threads", str(torch.get_num_threads()), "--allocator", args.allocator]
            if args.only:
                cmd += ["--only", args.only]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            isa_of[name] = result["isa"]
            for shape, times in result["times"].items():
                old = best.get((name, shape), [float("inf")] * 4 + [times[4]])
                best[(name, shape)] = [min(o, t) for o, t in zip(old[:4], times[:4])] + [times[4]]
    shapes = [s for (n, s) in best if n == names[0]]
    print(f"selective scan CPU kernel copies, {torch.get_num_threads()} threads, best of {args.rounds} rounds "
          "(children in turns). op: fwd / fwd+bwd ms and the ratio of each copy's time to the native "
          "copy's; kernel: the core entry points on preallocated outputs, fwd / bwd ns per element of u\n")
    header = ("| shape | " + " | ".join(f"{n} ({isa_of[n]}) op ms" for n in names) + " | "
              + " | ".join(f"{n} / native" for n in names[1:]) + " | "
              + " | ".join(f"{n} kernel ns" for n in names) + " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in shapes:
        row = {n: best[(n, shape)] for n in names}
        base = row[names[0]]
        cells = [f"{row[n][0] * 1e3:.2f} / {row[n][1] * 1e3:.2f}" for n in names]
        cells += [f"{row[n][0] / base[0]:.2f}x / {row[n][1] / base[1]:.2f}x" for n in names[1:]]
        cells += [f"{row[n][2] / row[n][4] * 1e9:.2f} / {row[n][3] / row[n][4] * 1e9:.2f}" for n in names]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


# Model shapes of the low-rank delta (label, B, K, KD, L, R): the scan's own projection
# (delta_proj) against the models' former composition, a batched matmul and the scan.
LOW_RANK_SHAPES = [
    ("T stage0", 16, 2, 128, 3136, 4),
    ("T stage1", 16, 2, 256, 784, 8),
    ("S stage2", 8, 4, 3072, 196, 24),
]


def low_rank_times(device, reps, min_seconds):
    """Print fwd and fwd+bwd ms of selective_scan(..., delta_proj=W) on a low-rank delta and of
    selective_scan(project_delta(delta, W)) (a matmul, then the scan), side by side."""
    print("low-rank delta (N = 1): the scan forming delta_proj @ delta itself, against a batched matmul "
          "and the scan; ms, and the composition's time / the fused op's\n")
    header = "| shape | B | KD | L | R | fused fwd | matmul + scan fwd | x | fused fwd+bwd | matmul + scan fwd+bwd | x |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, batch, groups, channels, length, rank in LOW_RANK_SHAPES:
        u, _, A, B, C, D, bias = make_inputs(batch, groups, channels, length, 1, device)
        low = torch.rand(batch, groups, rank, length, device=device) - 0.5
        proj = torch.randn(channels, rank, device=device) * rank ** -0.5
        inputs = [u, low, A, B, C, D, bias, proj]
        fused = lambda *x: selective_scan(*x[:7], delta_proj=x[7])  # noqa: E731
        composed = lambda *x: selective_scan(x[0], project_delta(x[1], x[7]), *x[2:7])  # noqa: E731
        torch.testing.assert_close(fused(*inputs), composed(*inputs), rtol=1e-4, atol=1e-4)
        f_f, f_fb = fwd_bwd_times(fused, inputs, device, reps, min_seconds)
        c_f, c_fb = fwd_bwd_times(composed, inputs, device, reps, min_seconds)
        print(f"| {label} | {batch} | {channels} | {length} | {rank} | {f_f * 1e3:.2f} | {c_f * 1e3:.2f} "
              f"| {c_f / f_f:.2f} | {f_fb * 1e3:.2f} | {c_fb * 1e3:.2f} | {c_fb / f_fb:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default=None, help="run only the shapes whose label contains this")
    parser.add_argument("--skip-ref", action="store_true", help="do not time the sequential reference")
    parser.add_argument("--indexed-loop", action="store_true",
                        help="also time indexed_loop (slow: about 10 minutes on 2 cores)")
    parser.add_argument("--compare-isa", action="store_true",
                        help="time the op on each CPU kernel copy (native, AVX2, portable) side by side")
    parser.add_argument("--low-rank", action="store_true",
                        help="time the low-rank delta (delta_proj) against a matmul and the scan")
    parser.add_argument("--rounds", type=int, default=3, help="--compare-isa: rounds of the child processes")
    parser.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads (default: torch's)")
    add_allocator_option(parser)
    parser.add_argument("--child-times", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--min-seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    apply_allocator(args.allocator)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reps = args.reps or (3 if args.quick else 10)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.2 if args.quick else 1.0)
    if args.child_times:
        from quadmamba._backend import core

        times = op_times(args.only, reps, min_seconds)
        print(json.dumps({"isa": core().cpu_isa()["selective_scan"], "times": times}))
        return
    if args.compare_isa:
        if device.type != "cpu":
            parser.error("--compare-isa times the CPU kernels: use --device cpu")
        print(environment())
        compare_isa(args, reps, min_seconds)
        return

    print(environment())
    if args.low_rank:
        low_rank_times(device, reps, min_seconds)
        return
    check_baselines(device)
    bandwidth = copy_bandwidth(device)
    print(f"{device.type} copy bandwidth (read + write): {bandwidth:.1f} GB/s")
    print("times in ms; GB/s = bytes / time; floor = fraction of the copy bandwidth; "
          "x ref = sequential reference time / op time; x chunked = best chunked-ref time / op time; "
          "x indexed = indexed loop time / op time (all fwd+bwd)\n")
    header = ("| shape | B | KD | L | N | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s | floor fwd/bwd "
              "| ref fwd+bwd ms | x ref | chunked fwd+bwd ms (T) | x chunked |"
              + (" indexed fwd+bwd ms | x indexed |" if args.indexed_loop else ""))
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

        # The loops, fwd+bwd at the shape's batch and at most LOOP_MAX_LENGTH steps: the
        # sequential reference best of 2 runs after a warm-up, the indexed loop one run.
        loop_len = min(length, LOOP_MAX_LENGTH)
        loop_note = f" (L={loop_len} x{length / loop_len:.3g})" if loop_len != length else ""
        loop_inputs = make_inputs(batch, groups, channels, loop_len, dstate, device) if loop_note else inputs

        def loop_time(fn, reps):
            run = forward_backward(fn, loop_inputs)
            return time_fn(run, device, warmup=1 if reps > 1 else 0, reps=reps) * length / loop_len

        ref_fb = float("nan") if args.skip_ref else loop_time(selective_scan_ref, reps=2)
        indexed = ""
        if args.indexed_loop:
            t_idx = loop_time(indexed_loop, reps=1)
            indexed = f" {t_idx * 1e3:.0f}{loop_note} | {t_idx / t_fb:.0f} |"

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
            f"| {ref_fb * 1e3:.0f}{loop_note} | {ref_fb / t_fb:.0f} | {chunk_txt} | {x_chunk} |{indexed}",
            flush=True,
        )


if __name__ == "__main__":
    main()
