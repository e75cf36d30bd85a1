"""quad_scan / quad_merge and cross_scan / cross_merge against the plain-PyTorch
compositions they replace, at QuadMamba-S quad-stage shapes (CPU, or CUDA with --device).

The authors' quad sequence: two masked full-size copies, two permute/reshape orderings,
a sum, a flip; the merge: the inverse permutes, the masked combination and the unroll.
Reports ms, GB/s (bytes the fused kernel must move) and time over the floor
bytes / copy bandwidth measured in the same run.

    PYTHONPATH=python python bench/bench_quad_scan.py [--device cpu|cuda] [--repeat 15]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import copy_bandwidth_gbs, environment, median_ms  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(environment())
    bw = copy_bandwidth_gbs(device=args.device)
    print(f"copy bandwidth ({args.device}): {bw:.1f} GB/s (read + write)")
    print()
    header = (f"{'op':<13} {'shape (B,D,H,W)':<18} {'pass':<8} {'plain ms':>9} {'fused ms':>9} "
              f"{'speed-up':>8} {'fused GB/s':>10} {'x floor':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for (channels, size) in [(192, 56), (384, 28)]:
        for batch in (1, 8):
            shift = (size // 8, size // 8)
            x = torch.randn(batch, channels, size, size, device=device)
            decision = torch.nn.functional.one_hot(torch.randint(0, 4, (batch,)), 4).float().to(device)
            assert torch.equal(authors_scan(x, decision, shift), quad_scan(x, decision, shift))
            ys = quad_scan(x, decision, shift)
            assert torch.allclose(authors_merge(ys, decision, (size, size), shift),
                                  quad_merge(ys, decision, (size, size), shift))
            unit = x.numel() * x.element_size()  # one (B, D, H, W) tensor
            cases = {
                # name: (plain fn, fused fn, fused bytes in units of x)
                ("quad_scan", "fwd"): (lambda: authors_scan(x, decision, shift),
                                       lambda: quad_scan(x, decision, shift), 3),
                ("quad_merge", "fwd"): (lambda: authors_merge(ys, decision, (size, size), shift),
                                        lambda: quad_merge(ys, decision, (size, size), shift), 3),
                ("cross_scan", "fwd"): (lambda: cross_scan_ref(x), lambda: cross_scan(x), 5),
            }
            xg = x.clone().requires_grad_()
            dg = decision.clone().requires_grad_()
            g = torch.randn_like(ys)

            def fwd_bwd(fn):
                def run():
                    out = fn(xg, dg, shift)
                    torch.autograd.grad(out, (xg, dg), g)
                return run

            # forward 3 units; backward reads gout (2) and x (1), writes dx (1)
            cases[("quad_scan", "fwd+bwd")] = (fwd_bwd(authors_scan), fwd_bwd(quad_scan), 7)
            ysg = ys.clone().requires_grad_()
            gy = torch.randn_like(x)

            def merge_fwd_bwd(fn):
                def run():
                    out = fn(ysg, dg, (size, size), shift)
                    torch.autograd.grad(out, (ysg, dg), gy)
                return run

            cases[("quad_merge", "fwd+bwd")] = (merge_fwd_bwd(authors_merge), merge_fwd_bwd(quad_merge), 7)
            cases[("cross_merge", "fwd")] = (lambda: cross_merge_ref(cross_scan(x), (size, size)),
                                             None, 5)
            y4 = cross_scan(x)
            cases[("cross_merge", "fwd")] = (lambda: cross_merge_ref(y4, (size, size)),
                                             lambda: cross_merge(y4, (size, size)), 5)
            for (name, kind), (plain, fused, units) in cases.items():
                plain_ms = median_ms(plain, repeat=args.repeat)
                fused_ms = median_ms(fused, repeat=args.repeat)
                gbs = units * unit / (fused_ms * 1e-3) / 1e9
                floor_ms = units * unit / (bw * 1e9) * 1e3
                line = (f"{name:<13} {str((batch, channels, size, size)):<18} {kind:<8} {plain_ms:>9.3f} "
                        f"{fused_ms:>9.3f} {plain_ms / fused_ms:>7.1f}x {gbs:>10.1f} {fused_ms / floor_ms:>6.2f}x")
                print(line, flush=True)
                rows.append(line)


if __name__ == "__main__":
    main()
