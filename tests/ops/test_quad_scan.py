"""quad_scan / quad_merge: golden sequence tables written by hand from the paper's quadtree
order (its section 3; the index forms in quadmamba/ops/reference.py), properties, kernels
against the references on every device, gradients, poisoned outputs, opcheck, torch.compile
and argument errors."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quadmamba
from quadmamba._backend import core, view
from quadmamba.ops import quad_merge, quad_scan
from quadmamba.ops.reference import quad_merge_ref, quad_scan_ref

# ---------------------------------------------------------------------------
# Golden tables. A table lists, for each sequence slot, the raster tokens y*W + x of the
# un-rolled input summed into it (a permutation has exactly one per slot).
# ---------------------------------------------------------------------------
# 4x4 grid:           coarse quadrants (2x2, raster inside):
#   0  1  2  3          TL 0 1 4 5   TR 2 3 6 7   BL 8 9 12 13   BR 10 11 14 15
#   4  5  6  7        fine "quadtree": sub-quadrants of 1 token = the coarse order.
#   8  9 10 11        fine "official": 1x1 windows over the whole image = raster order.
#  12 13 14 15
COARSE_4 = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
QUADTREE_4 = {q: [[t] for t in COARSE_4] for q in range(4)}
# Official: slot p takes fine token p when p lies in the selected quadrant, plus the
# coarse token of slot p when slot p's block is not the selected quadrant.
OFFICIAL_4 = {
    0: [[0], [1], [], [], [2, 4], [3, 5], [6], [7], [8], [9], [12], [13], [10], [11], [14], [15]],
    1: [[0], [1], [2, 4], [3, 5], [], [], [6], [7], [8], [9], [12], [13], [10], [11], [14], [15]],
    2: [[0], [1], [4], [5], [2], [3], [6], [7], [8], [9], [], [], [10, 12], [11, 13], [14], [15]],
    3: [[0], [1], [4], [5], [2], [3], [6], [7], [8], [9], [10, 12], [11, 13], [], [], [14], [15]],
}
# Shift (1, 1): the rolled grid (torch.roll by one row and one column) reads
#  15 12 13 14
#   3  0  1  2
#   7  4  5  6
#  11  8  9 10
COARSE_4_S11 = [15, 12, 3, 0, 13, 14, 1, 2, 7, 4, 11, 8, 5, 6, 9, 10]
QUADTREE_4_S11 = {q: [[t] for t in COARSE_4_S11] for q in range(4)}
OFFICIAL_4_S11 = {
    0: [[15], [12], [], [], [3, 13], [0, 14], [1], [2], [7], [4], [11], [8], [5], [6], [9], [10]],
    1: [[15], [12], [3, 13], [0, 14], [], [], [1], [2], [7], [4], [11], [8], [5], [6], [9], [10]],
    2: [[15], [12], [3], [0], [13], [14], [1], [2], [7], [4], [], [], [5, 11], [6, 8], [9], [10]],
    3: [[15], [12], [3], [0], [13], [14], [1], [2], [7], [4], [5, 11], [6, 8], [], [], [9], [10]],
}

# 8x8 grid, token y*8 + x. Coarse blocks (4x4 quadrants, raster inside):
COARSE_8 = [
    [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27],  # TL
    [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31],  # TR
    [32, 33, 34, 35, 40, 41, 42, 43, 48, 49, 50, 51, 56, 57, 58, 59],  # BL
    [36, 37, 38, 39, 44, 45, 46, 47, 52, 53, 54, 55, 60, 61, 62, 63],  # BR
]
# Fine "quadtree" blocks: each quadrant's 2x2 sub-quadrants TL, TR, BL, BR.
FINE_8 = [
    [0, 1, 8, 9, 2, 3, 10, 11, 16, 17, 24, 25, 18, 19, 26, 27],
    [4, 5, 12, 13, 6, 7, 14, 15, 20, 21, 28, 29, 22, 23, 30, 31],
    [32, 33, 40, 41, 34, 35, 42, 43, 48, 49, 56, 57, 50, 51, 58, 59],
    [36, 37, 44, 45, 38, 39, 46, 47, 52, 53, 60, 61, 54, 55, 62, 63],
]
# Fine "official": the 2x2 windows of the whole image in raster order of windows.
OFFICIAL_FINE_8 = [
    0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
    16, 17, 24, 25, 18, 19, 26, 27, 20, 21, 28, 29, 22, 23, 30, 31,
    32, 33, 40, 41, 34, 35, 42, 43, 36, 37, 44, 45, 38, 39, 46, 47,
    48, 49, 56, 57, 50, 51, 58, 59, 52, 53, 60, 61, 54, 55, 62, 63,
]
QUADTREE_8 = {
    q: [[t] for k in range(4) for t in (FINE_8[k] if k == q else COARSE_8[k])] for q in range(4)
}
# Official with TL selected (spec 3.6): slots 0-7 the TL windows, 8-15 empty, 16-23
# TL + TR tokens, the rest coarse.
OFFICIAL_8_TL = (
    [[0], [1], [8], [9], [2], [3], [10], [11]]
    + [[]] * 8
    + [[4, 16], [5, 17], [6, 24], [7, 25], [12, 18], [13, 19], [14, 26], [15, 27]]
    + [[20], [21], [22], [23], [28], [29], [30], [31]]
    + [[t] for t in COARSE_8[2] + COARSE_8[3]]
)
# Shift (2, -2): the rolled grid. Row y holds row (y - 2) mod 8, columns 2..7, 0, 1.
ROLLED_8_S = [
    50, 51, 52, 53, 54, 55, 48, 49,
    58, 59, 60, 61, 62, 63, 56, 57,
    2, 3, 4, 5, 6, 7, 0, 1,
    10, 11, 12, 13, 14, 15, 8, 9,
    18, 19, 20, 21, 22, 23, 16, 17,
    26, 27, 28, 29, 30, 31, 24, 25,
    34, 35, 36, 37, 38, 39, 32, 33,
    42, 43, 44, 45, 46, 47, 40, 41,
]


def _quadrant8(t: int) -> int:
    return 2 * ((t // 8) >= 4) + ((t % 8) >= 4)


def _official_8(q: int) -> list[list[int]]:
    """The masked rule of spec 3.6 applied to the hand tables above (positions on the grid)."""
    coarse = [t for block in COARSE_8 for t in block]
    return [
        sorted(([OFFICIAL_FINE_8[p]] if _quadrant8(OFFICIAL_FINE_8[p]) == q else [])
               + ([coarse[p]] if p // 16 != q else []))
        for p in range(64)
    ]


def _rolled(table, grid):
    return [sorted(grid[t] for t in slot) for slot in table]


def _slot_tokens(seq: torch.Tensor) -> list[list[int]]:
    """seq (D = L, L) from the identity input: the tokens summed into each slot."""
    values = set(seq.unique().tolist())
    assert values <= {0.0, 1.0}, f"a token appears twice in one slot: values {values}"
    return [sorted(torch.nonzero(seq[:, p]).flatten().tolist()) for p in range(seq.shape[1])]


def _identity_tables(fn, height, width, q, shift, order):
    length = height * width
    x = torch.eye(length, dtype=torch.float64).view(1, length, height, width)
    decision = torch.nn.functional.one_hot(torch.tensor([q]), 4).double()
    out = fn(x, decision, shift, order)
    assert torch.equal(out[0, 1], out[0, 0].flip(-1)), "direction 1 is not the reverse of direction 0"
    return _slot_tokens(out[0, 0])


GOLDEN = [
    (4, 4, (0, 0), "quadtree", lambda q: QUADTREE_4[q]),
    (4, 4, (0, 0), "official", lambda q: OFFICIAL_4[q]),
    (4, 4, (1, 1), "quadtree", lambda q: QUADTREE_4_S11[q]),
    (4, 4, (1, 1), "official", lambda q: OFFICIAL_4_S11[q]),
    (4, 4, (-3, -3), "official", lambda q: OFFICIAL_4_S11[q]),  # -3 == 1 (mod 4)
    (8, 8, (0, 0), "quadtree", lambda q: QUADTREE_8[q]),
    (8, 8, (0, 0), "official", _official_8),
    (8, 8, (2, -2), "quadtree", lambda q: _rolled(QUADTREE_8[q], ROLLED_8_S)),
    (8, 8, (2, -2), "official", lambda q: _rolled(_official_8(q), ROLLED_8_S)),
]


@pytest.mark.parametrize("fn", [quad_scan, quad_scan_ref], ids=["kernel", "reference"])
@pytest.mark.parametrize("height,width,shift,order,expected", GOLDEN,
                         ids=[f"{h}x{w}-{s[0]},{s[1]}-{o}" for h, w, s, o, _ in GOLDEN])
@pytest.mark.parametrize("q", range(4))
def test_golden_tables(fn, height, width, shift, order, expected, q):
    got = _identity_tables(fn, height, width, q, shift, order)
    want = expected(q)
    bad = [(p, got[p], want[p]) for p in range(len(want)) if got[p] != want[p]]
    assert not bad, f"slots (slot, got, expected) differ: {bad[:8]}"


def test_official_8x8_tl_matches_spec_example():
    assert _official_8(0) == [sorted(s) for s in OFFICIAL_8_TL]
    got = _identity_tables(quad_scan, 8, 8, 0, (0, 0), "official")
    assert all(got[p] == [] for p in range(8, 16)), got[8:16]
    assert all(len(got[p]) == 2 for p in range(16, 24)), got[16:24]


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------
def _authors_scan(x, decision, shift, order):
    """The authors' composition, transcribed independently of reference.py: two masked
    copies, two permute/reshape orderings, a sum and a flip."""
    batch, channels, height, width = x.shape
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    mask = decision.view(batch, 1, 2, 1, 2, 1).expand(batch, 1, 2, height // 2, 2, width // 2)
    mask = mask.reshape(batch, 1, height, width)
    coarse = (x * (1 - mask)).view(batch, channels, 2, height // 2, 2, width // 2)
    coarse = coarse.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, -1)
    if order == "official":  # H/4 x W/4 windows of the whole image, windows in raster order
        fine = (x * mask).view(batch, channels, 4, height // 4, 4, width // 4)
        fine = fine.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, -1)
    else:  # (q1, q3, r, q2, q4, c) -> (q1, q2, q3, q4, r, c)
        fine = (x * mask).view(batch, channels, 2, 2, height // 4, 2, 2, width // 4)
        fine = fine.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(batch, channels, -1)
    seq = fine + coarse
    return torch.stack([seq, seq.flip(-1)], dim=1)


grids = st.tuples(st.integers(1, 16), st.integers(1, 16)).map(lambda hw: (4 * hw[0], 4 * hw[1]))


@settings(max_examples=25, deadline=None)
@given(hw=grids, q=st.integers(0, 3), data=st.data())
def test_quadtree_is_bijection_and_merge_inverts(hw, q, data):
    height, width = hw
    sy = data.draw(st.integers(-height + 1, height - 1), label="sy")
    sx = data.draw(st.integers(-width + 1, width - 1), label="sx")
    length = height * width
    x = torch.arange(length, dtype=torch.float64).view(1, 1, height, width) + 1
    decision = torch.nn.functional.one_hot(torch.tensor([q]), 4).double()
    out = quad_scan(x, decision, (sy, sx), "quadtree")
    assert torch.equal(out[0, 0].sort(-1).values, x.flatten(1)), f"not a permutation for {hw}, shift {(sy, sx)}"
    merged = quad_merge(out, decision, (height, width), (sy, sx), "quadtree")
    assert torch.equal(merged, 2 * x), f"merge(scan(x)) != 2x for {hw}, shift {(sy, sx)}"
    assert torch.equal(out, _authors_scan(x, decision, (sy, sx), "quadtree"))


@settings(max_examples=25, deadline=None)
@given(hw=grids, q=st.integers(0, 3), data=st.data())
def test_official_matches_authors_composition(hw, q, data):
    height, width = hw
    sy = data.draw(st.integers(-height + 1, height - 1), label="sy")
    sx = data.draw(st.integers(-width + 1, width - 1), label="sx")
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    decision = torch.nn.functional.one_hot(torch.tensor([q, (q + 1) % 4]), 4).double()
    out = quad_scan(x, decision, (sy, sx), "official")
    want = _authors_scan(x, decision, (sy, sx), "official")
    assert torch.equal(out, want), f"max diff {(out - want).abs().max().item()} for {hw}, shift {(sy, sx)}"
    # 1/8 of the slots are empty and 1/8 hold two tokens.
    ones = _authors_scan(torch.ones_like(x), decision, (sy, sx), "official")[:, 0]
    assert (ones == 0).sum().item() == ones.numel() // 8
    assert (ones == 2).sum().item() == ones.numel() // 8


# ---------------------------------------------------------------------------
# Kernels against the references, every device
# ---------------------------------------------------------------------------
def _one_hot(batch, device, dtype=torch.float32):
    return torch.nn.functional.one_hot(torch.randint(0, 4, (batch,)), 4).to(device=device, dtype=dtype)


CASES = [
    # (B, D, H, W, shift, order)
    (2, 3, 8, 8, (0, 0), "quadtree"),
    (2, 5, 12, 8, (3, -5), "quadtree"),
    (3, 4, 8, 20, (-7, 9), "official"),
    (1, 2, 16, 12, (0, 0), "official"),
    (2, 3, 4, 4, (2, -1), "quadtree"),
    (1, 3, 8, 44, (3, -13), "quadtree"),  # runs of 11: several vector chunks with an overlapping tail
    (2, 2, 8, 64, (-3, 21), "official"),  # runs of 16, split where the shift wraps
    (1, 3, 48, 48, (5, -7), "quadtree"),  # rows longer than 2048: float rows in blocks of 2, then a single row
]


@pytest.mark.parametrize("batch,channels,height,width,shift,order", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_reference(device, batch, channels, height, width, shift, order, dtype):
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype, requires_grad=True)
    decision = _one_hot(batch, device, dtype).requires_grad_()
    out = quad_scan(x, decision, shift, order)
    ref = quad_scan_ref(x, decision, shift, order)
    assert torch.equal(out, ref), f"forward max diff {(out - ref).abs().max().item()}"
    g = torch.randn_like(out)
    dx, dd = torch.autograd.grad(out, (x, decision), g)
    rdx, rdd = torch.autograd.grad(ref, (x, decision), g)
    torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dd, rdd, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-4)

    ys = torch.randn(batch, 2, channels, height * width, device=device, dtype=dtype, requires_grad=True)
    y = quad_merge(ys, decision, (height, width), shift, order)
    yref = quad_merge_ref(ys, decision, (height, width), shift, order)
    torch.testing.assert_close(y, yref, rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(y)
    dys, dd = torch.autograd.grad(y, (ys, decision), gy)
    rdys, rdd = torch.autograd.grad(yref, (ys, decision), gy)
    torch.testing.assert_close(dys, rdys, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dd, rdd, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-4)


def test_tensors_larger_than_the_caches():
    """Float CPU tensors of over 8 MB take the prefetching, streaming-store row path (single rows
    assembled in scratch and written with non-temporal stores); it must match the reference like
    the cached paths. 136 channels of 128 x 128: every pass reads over 8 MB."""
    batch, channels, height, width, shift = 1, 136, 128, 128, (19, -45)
    x = torch.randn(batch, channels, height, width, requires_grad=True)
    decision = torch.tensor([[0.0, 0.0, 1.0, 0.0]], requires_grad=True)
    out = quad_scan(x, decision, shift)
    ref = quad_scan_ref(x, decision, shift)
    assert torch.equal(out, ref), f"forward max diff {(out - ref).abs().max().item()}"
    g = torch.randn_like(out)
    dx, dd = torch.autograd.grad(out, (x, decision), g)
    rdx, rdd = torch.autograd.grad(ref, (x, decision), g)
    torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dd, rdd, rtol=1e-4, atol=1e-2)

    ys = torch.randn(batch, 2, channels, height * width, requires_grad=True)
    y = quad_merge(ys, decision, (height, width), shift)
    yref = quad_merge_ref(ys, decision, (height, width), shift)
    torch.testing.assert_close(y, yref, rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(y)
    dys, dd = torch.autograd.grad(y, (ys, decision), gy)
    rdys, rdd = torch.autograd.grad(yref, (ys, decision), gy)
    torch.testing.assert_close(dys, rdys, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dd, rdd, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["quadtree", "official"])
def test_reduced_precision_within_twice_reference_error(device, dtype, order):
    batch, channels, height, width, shift = 2, 16, 8, 12, (2, -3)
    x64 = torch.randn(batch, channels, height, width, device=device, dtype=torch.float64)
    ys64 = torch.randn(batch, 2, channels, height * width, device=device, dtype=torch.float64)
    decision = _one_hot(batch, device, torch.float64)

    def run(fn, tensor, dt, *args):
        t = tensor.to(dt).requires_grad_()
        dec = decision.to(dt).requires_grad_()
        out = fn(t, dec, *args)
        g = torch.ones_like(out)  # exactly representable upstream gradient
        grads = torch.autograd.grad(out, (t, dec), g)
        return [v.double() for v in (out, *grads)]

    for fn, ref, tensor, args in [
        (quad_scan, quad_scan_ref, x64, (shift, order)),
        (quad_merge, quad_merge_ref, ys64, ((height, width), shift, order)),
    ]:
        exact = run(ref, tensor, torch.float64, *args)
        kernel = run(fn, tensor, dtype, *args)
        plain = run(ref, tensor, dtype, *args)
        for name, k, p, e in zip(["out", "d_in", "d_decision"], kernel, plain, exact):
            assert k.dtype == e.dtype and torch.isfinite(k).all(), name
            err_k = (k - e).abs().max().item()
            err_p = (p - e).abs().max().item()
            # Twice the plain reference's error, and never less than one unit in the last place
            # of the largest exact value in `dtype` (what storing a correctly rounded result
            # costs; a lucky low-precision reference can otherwise fall below it).
            tol = 2 * err_p + torch.finfo(dtype).eps * e.abs().max().item()
            assert err_k <= tol, f"{fn.__name__} {name}: kernel error {err_k} > 2 x reference error {err_p} + 1 ulp"


def test_outputs_keep_dtype_and_noncontiguous_inputs(device):
    x = torch.randn(2, 8, 12, 3, device=device).permute(0, 3, 1, 2)  # (2, 3, 8, 12), non-contiguous
    decision = _one_hot(2, device)
    assert not x.is_contiguous()
    out = quad_scan(x, decision, (1, 2), "quadtree")
    assert torch.equal(out, quad_scan_ref(x, decision, (1, 2), "quadtree"))
    ys = out.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(quad_merge(ys, decision, (8, 12), (1, 2)), quad_merge_ref(ys, decision, (8, 12), (1, 2)))
    for dtype in (torch.float16, torch.bfloat16):
        assert quad_scan(x.to(dtype), decision, (1, 2)).dtype == dtype


# ---------------------------------------------------------------------------
# Gradcheck (fp64, through the custom ops: the decision is perturbed off one-hot)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["quadtree", "official"])
@pytest.mark.parametrize("shift", [(0, 0), (3, -2)])
def test_gradcheck(order, shift):
    x = torch.randn(2, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    decision = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)  # any value: the formula is linear in M
    ys = torch.randn(2, 2, 2, 32, dtype=torch.float64, requires_grad=True)
    sy, sx = shift
    assert torch.autograd.gradcheck(lambda a, d: torch.ops.quadmamba.quad_scan(a, d, sy, sx, order), (x, decision))
    assert torch.autograd.gradcheck(
        lambda a, d: torch.ops.quadmamba.quad_merge(a, d, 8, 4, sy, sx, order), (ys, decision)
    )
    # the non-one-hot forward is the formula of the reference too
    torch.testing.assert_close(
        torch.ops.quadmamba.quad_scan(x, decision, sy, sx, order), quad_scan_ref(x, decision, shift, order)
    )
    torch.testing.assert_close(
        torch.ops.quadmamba.quad_merge(ys, decision, 8, 4, sy, sx, order),
        quad_merge_ref(ys, decision, (8, 4), shift, order),
    )


@pytest.mark.parametrize("order", ["quadtree", "official"])
def test_data_gradient_only_paths(order):
    # A non-square grid and a shift with unequal, signed components: swapped sizes or shift
    # components in these backward paths change the result.
    shift = (1, -2)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, requires_grad=True)
    decision = _one_hot(2, "cpu", torch.float64)  # no grad: the backward is the plain merge / scan
    out = quad_scan(x, decision, shift, order)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    (rdx,) = torch.autograd.grad(quad_scan_ref(x, decision, shift, order), x, g)
    assert torch.equal(dx, rdx)
    ys = torch.randn(2, 2, 3, 96, dtype=torch.float64, requires_grad=True)
    y = quad_merge(ys, decision, (8, 12), shift, order)
    gy = torch.randn_like(y)
    (dys,) = torch.autograd.grad(y, ys, gy)
    (rdys,) = torch.autograd.grad(quad_merge_ref(ys, decision, (8, 12), shift, order), ys, gy)
    assert torch.equal(dys, rdys)


def test_decision_gradient_is_deterministic_across_threads():
    x = torch.randn(4, 64, 16, 16)
    g = torch.randn(4, 2, 64, 256)
    decision = _one_hot(4, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(torch.ops.quadmamba.quad_scan_bwd(g, x, decision, 3, 5, "quadtree")[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2]), results


# ---------------------------------------------------------------------------
# Poisoned outputs: every slot written, by each core entry point
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["quadtree", "official"])
def test_poisoned_outputs(device, order):
    B, D, H, W, (sy, sx) = 2, 3, 8, 12, (-3, 5)
    x = torch.randn(B, D, H, W, device=device)
    ys = torch.randn(B, 2, D, H * W, device=device)
    decision = _one_hot(B, device)
    stream = quadmamba._backend.stream(x)
    C = core()

    def nan(*shape):
        return torch.full(shape, float("nan"), device=device)

    out = nan(B, 2, D, H * W)
    C.quad_scan_fwd(view(x), view(decision), view(out), H, W, sy, sx, order, stream)
    assert torch.equal(out, quad_scan_ref(x, decision, (sy, sx), order))

    y = nan(B, D, H, W)
    C.quad_merge_fwd(view(ys), view(decision), view(y), H, W, sy, sx, order, stream)
    torch.testing.assert_close(y, quad_merge_ref(ys, decision, (H, W), (sy, sx), order))

    dx, dd, ws = nan(B, D, H, W), nan(B, 4), nan(B, D, 4)
    C.quad_scan_bwd(view(x), view(decision), view(ys), view(dx), view(dd), view(ws), H, W, sy, sx, order, stream)
    assert torch.isfinite(dx).all() and torch.isfinite(dd).all()
    torch.testing.assert_close(dx, quad_merge_ref(ys, decision, (H, W), (sy, sx), order))

    dys, dd, ws = nan(B, 2, D, H * W), nan(B, 4), nan(B, D, 4)
    C.quad_merge_bwd(view(ys), view(decision), view(x), view(dys), view(dd), view(ws), H, W, sy, sx, order, stream)
    assert torch.isfinite(dys).all() and torch.isfinite(dd).all()
    torch.testing.assert_close(dys, quad_scan_ref(x, decision, (sy, sx), order))


# ---------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------
def test_opcheck(device):
    x = torch.randn(2, 3, 8, 12, device=device, requires_grad=True)
    ys = torch.randn(2, 2, 3, 96, device=device, requires_grad=True)
    decision = _one_hot(2, device).requires_grad_()
    torch.library.opcheck(torch.ops.quadmamba.quad_scan.default, (x, decision, 1, -2, "quadtree"))
    torch.library.opcheck(torch.ops.quadmamba.quad_merge.default, (ys, decision, 8, 12, 1, -2, "official"))
    gout = torch.randn(2, 2, 3, 96, device=device)
    torch.library.opcheck(torch.ops.quadmamba.quad_scan_bwd.default, (gout, x.detach(), decision.detach(), 1, 2, "quadtree"))
    torch.library.opcheck(
        torch.ops.quadmamba.quad_merge_bwd.default, (x.detach(), ys.detach(), decision.detach(), 1, 2, "official")
    )


def test_torch_compile_fullgraph():
    def f(x, decision):
        seq = quad_scan(x, decision, (1, -1), "quadtree")
        return quad_merge(seq * 2, decision, (8, 8), (1, -1), "quadtree")

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    decision = _one_hot(2, "cpu").requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, decision)
    assert torch.equal(out, 4 * x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))
    ref = torch.autograd.grad(f(x, decision).sum(), decision)[0]
    torch.testing.assert_close(decision.grad, ref)


def test_torch_export_one_node_per_op(export_targets):
    class ScanMerge(torch.nn.Module):
        def forward(self, x, decision):
            seq = quad_scan(x, decision, (1, -1), "quadtree")
            return quad_merge(seq * 2, decision, (8, 12), (1, -1), "quadtree")

    x, decision = torch.randn(2, 3, 8, 12), _one_hot(2, "cpu")
    program = torch.export.export(ScanMerge(), (x, decision))
    assert export_targets(program) == ["quadmamba.quad_scan.default", "aten.mul.Tensor", "quadmamba.quad_merge.default"]
    assert torch.equal(program.module()(x, decision), 4 * x)


def test_torch_export_with_dynamic_height_width_and_shift(export_targets):
    """Sizes and shifts derived from a dynamic (H, W): symbolic ints pass the argument checks."""
    class ScanMerge(torch.nn.Module):
        def forward(self, x, decision):
            shift = (x.shape[2] // 8, -(x.shape[3] // 8))
            seq = quad_scan(x, decision, shift, "quadtree")
            return quad_merge(seq * 2, decision, (x.shape[2], x.shape[3]), shift, "quadtree")

    height, width = 4 * torch.export.Dim("h", min=1, max=32), 4 * torch.export.Dim("w", min=1, max=32)
    decision = _one_hot(2, "cpu")
    program = torch.export.export(ScanMerge(), (torch.randn(2, 3, 8, 12), decision),
                                  dynamic_shapes={"x": {2: height, 3: width}, "decision": None})
    assert [t for t in export_targets(program) if t.startswith("quadmamba")] == [
        "quadmamba.quad_scan.default", "quadmamba.quad_merge.default"]
    x = torch.randn(2, 3, 16, 4)
    assert torch.equal(program.module()(x, decision), 4 * x)


@pytest.mark.parametrize("batch,channels", [(0, 3), (2, 0)], ids=["no batch", "no channels"])
def test_empty_inputs_give_empty_outputs(batch, channels):
    x = torch.randn(batch, channels, 8, 4, requires_grad=True)
    decision = _one_hot(batch, "cpu").requires_grad_()
    seq = quad_scan(x, decision, (1, 1))
    assert seq.shape == quad_scan_ref(x, decision, (1, 1)).shape == (batch, 2, channels, 32)
    y = quad_merge(seq, decision, (8, 4), (1, 1))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert decision.grad.shape == (batch, 4) and not decision.grad.any()  # no channels: no gradient


# ---------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    dec = _one_hot(2, "cpu")
    ys = torch.randn(2, 2, 3, 64)
    cases = [
        (lambda: quad_scan(x.numpy(), dec), TypeError, "x must be a torch.Tensor"),
        (lambda: quad_scan(x[0], dec), ValueError, "x must have 4 dims"),
        (lambda: quad_scan(x.long(), dec), TypeError, "x must be float32"),
        (lambda: quad_scan(torch.randn(2, 3, 6, 8), dec), ValueError, "multiples of 4"),
        (lambda: quad_scan(torch.randn(2, 3, 8, 10), dec), ValueError, "multiples of 4"),
        (lambda: quad_scan(torch.randn(2, 3, 0, 8), dec), ValueError, "positive multiples of 4 for the quadtree scan (pad"),
        (lambda: quad_scan(x, dec[:1]), ValueError, "decision must have shape"),
        (lambda: quad_scan(x, torch.randn(2, 3)), ValueError, "decision must have shape"),
        (lambda: quad_scan(x, dec.long()), TypeError, "decision must be a floating"),
        (lambda: quad_scan(x, dec * 0.5), ValueError, "one-hot"),
        (lambda: quad_scan(x, torch.ones(2, 4)), ValueError, "one-hot"),
        (lambda: quad_scan(x, torch.zeros(2, 4)), ValueError, "one-hot"),
        (lambda: quad_scan(x, dec, order="zigzag"), ValueError, "order must be one of"),
        (lambda: quad_scan(x, dec, shift=(8, 0)), ValueError, "|sy| < H"),
        (lambda: quad_scan(x, dec, shift=(0, -8)), ValueError, "|sy| < H"),
        (lambda: quad_scan(x, dec, shift=(1.5, 0)), TypeError, "shift must be a pair of ints"),
        (lambda: quad_scan(x, dec, shift=3), TypeError, "shift must be a pair of ints"),
        (lambda: quad_merge(ys, dec, (8, 4)), ValueError, "ys must have shape"),
        (lambda: quad_merge(torch.randn(2, 2, 3, 72), dec, (6, 12)), ValueError, "multiples of 4"),
        (lambda: quad_merge(ys, dec, 64), TypeError, "size must be a pair"),
        (lambda: quad_merge(ys[:, :1], dec, (8, 8)), ValueError, "ys must have shape"),
        (lambda: quad_merge(ys, dec, (8, 8), order="raster"), ValueError, "order must be one of"),
        (lambda: quad_merge(ys, dec, (8, 8), shift=(0, 9)), ValueError, "|sy| < H"),
    ]
    if torch.cuda.is_available():
        cases.append((lambda: quad_scan(x, dec.cuda()), ValueError, "decision must be on"))
    for fn, exc, text in cases:
        with pytest.raises(exc, match=re.escape(text)):
            fn()


def test_core_rejects_mismatched_views():
    x = torch.randn(2, 3, 8, 8)
    dec = _one_hot(2, "cpu")
    out = torch.empty(2, 2, 3, 60)
    with pytest.raises(ValueError, match="out has size 60"):
        core().quad_scan_fwd(view(x), view(dec), view(out), 8, 8, 0, 0, "quadtree", 0)
    with pytest.raises(ValueError, match="decision must be float64"):
        core().quad_scan_fwd(view(x.double()), view(dec), view(torch.empty(2, 2, 3, 64).double()), 8, 8, 0, 0,
                             "quadtree", 0)
    with pytest.raises(ValueError, match="order must be"):
        core().quad_scan_fwd(view(x), view(dec), view(torch.empty(2, 2, 3, 64)), 8, 8, 0, 0, "spiral", 0)


@pytest.mark.skipif(quadmamba.cuda_built(), reason="CPU-only build behaviour")
def test_cuda_tensors_in_cpu_build_raise():
    fake = (0, 0, 0, (1, 1, 4, 4), (16, 16, 4, 1))
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        core().quad_scan_fwd(fake, (0, 0, 0, (1, 4), (4, 1)), (0, 0, 0, (1, 2, 1, 16), (32, 16, 16, 1)),
                             4, 4, 0, 0, "quadtree", 0)


@pytest.mark.parametrize("path", ["sse2", "portable"])
def test_portable_cpu_kernels_match_reference(run_on_cpu_path, path):
    """The kernels without their AVX paths ("sse2": what x86 CPUs without AVX run) and without
    any x86 intrinsics ("portable": what non-x86 builds run) pass the same checks: a subprocess
    on that CPU path (QUADMAMBA_CPU_GENERIC=1 or 2) runs the kernel-vs-reference tests of this file."""
    proc = run_on_cpu_path(__file__, "cpu and not portable", path)
    assert proc.returncode == 0, f"portable kernels failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout, proc.stdout[-2000:]
