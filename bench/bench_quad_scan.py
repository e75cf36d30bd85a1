"""quad_scan / quad_merge and cross_scan / cross_merge against the plain-PyTorch
compositions they replace, at QuadMamba-S quad-stage shapes (CPU, or CUDA with --device).

The authors' quad sequence: two masked full-size copies, two permute/reshape orderings,
a sum, a flip; the merge: the inverse permutes, the masked combination and the unroll.
Reports ms, GB/s (bytes the fused kernel must move) and the kernel time over the time of
a plain tensor copy moving the same bytes, measured right after it.

On small VMs the first touch of freshly allocated pages dominates large CPU outputs (both
sides pay it); glibc keeps freed memory for reuse with, e.g.,
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296.

    PYTHONPATH=python python bench/bench_quad_scan.py [--device cpu|cuda] [--repeat 15]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import add_allocator_option, apply_allocator, copy_bandwidth, environment, time_fn  # noqa: E402

from quadmamba.ops import cross_merge, cross_scan, quad_merge, quad_scan  # noqa: E402
from quadmamba.ops.reference import cross_merge_ref, cross_scan_ref  # noqa: E402


def _mask(decision, batch, height, width):
    m = decision.view(batch, 1, 2, 1, 2, 1).expand(batch, 1, 2, height // 2, 2, width // 2)
    return m.reshape(batch, 1, height, width)


def authors_scan(x, decision, shift):
    batch, channels, height, width = x.shape
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    mask = _mask(decision, batch, height, width)
    coarse = (x * (1 - mask)).view(batch, channels, 2, height // 2, 2, width // 2)
    coarse = coarse.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, -1)
    fine = (x * mask).view(batch, channels, 2, 2, height // 4, 2, 2, width // 4)
    fine = fine.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(batch, channels, -1)
    seq = fine + coarse
    return torch.stack([seq, seq.flip(-1)], dim=1)


def authors_merge(ys, decision, size, shift):
    height, width = size
    batch, _, channels, _ = ys.shape
    seq = ys[:, 0] + ys[:, 1].flip(-1)
    mask = _mask(decision, batch, height, width)
    coarse = seq.view(batch, channels, 2, 2, height // 2, width // 2).permute(0, 1, 2, 4, 3, 5)
    coarse = coarse.reshape(batch, channels, height, width)
    fine = seq.view(batch, channels, 2, 2, 2, 2, height // 4, width // 4).permute(0, 1, 2, 4, 6, 3, 5, 7)
    fine = fine.reshape(batch, channels, height, width)
    y = mask * fine + (1 - mask) * coarse
    return torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(2, 3))


def _kernels(x, decision, ys, gy, shift, size):
    """The core entry points on preallocated outputs (no allocation, no Python checks)."""
    from quadmamba._backend import core, stream, view

    C, st = core(), stream(x)
    (height, width), (sy, sx) = size, shift
    batch, channels = x.shape[:2]
    seq = torch.empty_like(ys)
    ras = torch.empty_like(x)
    dd = torch.empty(batch, 4, device=x.device)
    ws = torch.empty(batch, channels, 4, device=x.device)
    four = torch.empty(batch, 4, channels, height * width, device=x.device, dtype=x.dtype)
    # the views hold raw pointers: the tensors stay referenced by the closures below
    vx, vd, vys, vgy = view(x), view(decision), view(ys), view(gy)
    vseq, vras, vdd, vws, vfour = view(seq), view(ras), view(dd), view(ws), view(four)
    keep = (seq, ras, dd, ws, four)
    geo = (height, width, sy, sx, "quadtree", st)

    def scan_fwd():
        assert keep
        C.quad_scan_fwd(vx, vd, vseq, *geo)

    def merge_fwd():
        assert keep
        C.quad_merge_fwd(vys, vd, vras, *geo)

    def scan_fwd_bwd():
        assert keep
        C.quad_scan_fwd(vx, vd, vseq, *geo)
        C.quad_scan_bwd(vx, vd, vys, vras, vdd, vws, *geo)

    def merge_fwd_bwd():
        assert keep
        C.quad_merge_fwd(vys, vd, vras, *geo)
        C.quad_merge_bwd(vys, vd, vgy, vseq, vdd, vws, *geo)

    def cross_fwd():
        assert keep
        C.cross_scan_fwd(vx, vfour, st)

    def cross_merge_fwd():
        assert keep
        C.cross_merge_fwd(vfour, vras, st)

    return {
        ("quad_scan", "fwd"): scan_fwd,
        ("quad_merge", "fwd"): merge_fwd,
        ("quad_scan", "fwd+bwd"): scan_fwd_bwd,
        ("quad_merge", "fwd+bwd"): merge_fwd_bwd,
        ("cross_scan", "fwd"): cross_fwd,
        ("cross_merge", "fwd"): cross_merge_fwd,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeat", type=int, default=15)
    add_allocator_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_allocator(args.allocator)
    device = torch.device(args.device)
    print(environment())

    def best_ms(fn, repeat):
        return time_fn(fn, device, warmup=3, reps=repeat) * 1e3

    bw = copy_bandwidth(device)
    print(f"copy bandwidth ({args.device}): {bw:.1f} GB/s (read + write)")
    print("plain: the PyTorch composition; op: quadmamba.ops.<op> (checks + allocation + kernel);")
    print("kernel: the core entry point on preallocated outputs; copy: a tensor copy moving the same")
    print("bytes (read + write) as the kernel must, timed right after it (robust to machine load)")
    print()
    header = (f"| {'op':<11} | {'B,D,H,W':<14} | {'pass':<7} | {'plain ms':>8} | {'op ms':>7} | "
              f"{'kernel ms':>9} | {'op speed-up':>11} | {'kernel GB/s':>11} | {'kernel/copy':>11} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for (channels, size) in [(192, 56), (384, 28)]:
        for batch in (1, 8):
            shift = (size // 8, size // 8)
            x = torch.randn(batch, channels, size, size, device=device)
            decision = torch.nn.functional.one_hot(torch.randint(0, 4, (batch,)), 4).float().to(device)
            assert torch.equal(authors_scan(x, decision, shift), quad_scan(x, decision, shift))
            ys = quad_scan(x, decision, shift)
            assert torch.allclose(authors_merge(ys, decision, (size, size), shift),
                                  quad_merge(ys, decision, (size, size), shift))
            unit = x.numel() * x.element_size()  # bytes of one (B, D, H, W) tensor
            xg = x.clone().requires_grad_()
            dg = decision.clone().requires_grad_()
            ysg = ys.clone().requires_grad_()
            gy = torch.randn_like(x)
            y4 = cross_scan(x)

            def scan_fwd_bwd(fn):
                def run():
                    torch.autograd.grad(fn(xg, dg, shift), (xg, dg), ys)
                return run

            def merge_fwd_bwd(fn):
                def run():
                    torch.autograd.grad(fn(ysg, dg, (size, size), shift), (ysg, dg), gy)
                return run

            # (plain, op, bytes the fused kernels move in units of x)
            cases = {
                ("quad_scan", "fwd"): (lambda: authors_scan(x, decision, shift),
                                       lambda: quad_scan(x, decision, shift), 3),
                ("quad_scan", "fwd+bwd"): (scan_fwd_bwd(authors_scan), scan_fwd_bwd(quad_scan), 3 + 4),
                ("quad_merge", "fwd"): (lambda: authors_merge(ys, decision, (size, size), shift),
                                        lambda: quad_merge(ys, decision, (size, size), shift), 3),
                ("quad_merge", "fwd+bwd"): (merge_fwd_bwd(authors_merge), merge_fwd_bwd(quad_merge), 3 + 5),
                ("cross_scan", "fwd"): (lambda: cross_scan_ref(x), lambda: cross_scan(x), 5),
                ("cross_merge", "fwd"): (lambda: cross_merge_ref(y4, (size, size)),
                                         lambda: cross_merge(y4, (size, size)), 5),
            }
            kernels = _kernels(x, decision, ys, gy, shift, (size, size))
            for key, (plain, op, units) in cases.items():
                plain_ms = best_ms(plain, repeat=args.repeat)
                op_ms = best_ms(op, repeat=args.repeat)
                kernel_ms = best_ms(kernels[key], repeat=args.repeat)
                nbytes = units * unit
                src = torch.zeros(nbytes // 8, dtype=torch.float32, device=device)
                dst = torch.empty_like(src)
                copy_ms = best_ms(lambda: dst.copy_(src), repeat=args.repeat)
                print(f"| {key[0]:<11} | {f'{batch},{channels},{size},{size}':<14} | {key[1]:<7} | {plain_ms:>8.2f} | "
                      f"{op_ms:>7.2f} | {kernel_ms:>9.2f} | {plain_ms / op_ms:>10.1f}x | "
                      f"{nbytes / (kernel_ms * 1e-3) / 1e9:>11.1f} | {kernel_ms / copy_ms:>10.2f}x |", flush=True)


if __name__ == "__main__":
    main()
