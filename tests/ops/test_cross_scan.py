"""cross_scan / cross_merge: hand-written direction tables, properties, kernels against
the references on every device, gradients, poisoned outputs, opcheck, torch.compile and
argument errors."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quadmamba
from quadmamba._backend import core, view
from quadmamba.ops import cross_merge, cross_scan
from quadmamba.ops.reference import cross_merge_ref, cross_scan_ref

# 3x4 grid, token y*4 + x:
#   0  1  2  3
#   4  5  6  7
#   8  9 10 11
ROWS_3x4 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
COLS_3x4 = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
GOLDEN_3x4 = [ROWS_3x4, COLS_3x4, ROWS_3x4[::-1], COLS_3x4[::-1]]


@pytest.mark.parametrize("fn", [cross_scan, cross_scan_ref], ids=["kernel", "reference"])
def test_golden_directions(fn):
    x = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    out = fn(x)
    for k in range(4):
        assert out[0, k, 0].long().tolist() == GOLDEN_3x4[k], f"direction {k}: {out[0, k, 0].tolist()}"


@settings(max_examples=50, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), channels=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_merge_of_scan_is_four_x(height, width, channels, dtype):
    x = torch.randn(2, channels, height, width, dtype=dtype)
    out = cross_scan(x)
    assert torch.equal(out, cross_scan_ref(x))
    assert torch.equal(cross_merge(out, (height, width)), 4 * x)


CASES = [(2, 3, 8, 8), (1, 5, 7, 13), (3, 2, 1, 9), (2, 4, 56, 56)]


@pytest.mark.parametrize("batch,channels,height,width", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_reference(device, batch, channels, height, width, dtype):
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype, requires_grad=True)
    out = cross_scan(x)
    ref = cross_scan_ref(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    (rdx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=1e-6)

    ys = torch.randn(batch, 4, channels, height * width, device=device, dtype=dtype, requires_grad=True)
    y = cross_merge(ys, (height, width))
    yref = cross_merge_ref(ys, (height, width))
    torch.testing.assert_close(y, yref, rtol=1e-6, atol=1e-6)
    gy = torch.randn_like(y)
    (dys,) = torch.autograd.grad(y, ys, gy)
    (rdys,) = torch.autograd.grad(yref, ys, gy)
    assert torch.equal(dys, rdys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_within_twice_reference_error(device, dtype):
    ys64 = torch.randn(2, 4, 8, 35, device=device, dtype=torch.float64)
    exact = cross_merge_ref(ys64, (5, 7))
    kernel = cross_merge(ys64.to(dtype), (5, 7))
    plain = cross_merge_ref(ys64.to(dtype), (5, 7))
    assert kernel.dtype == dtype
    err_k = (kernel.double() - exact).abs().max().item()
    err_p = (plain.double() - exact).abs().max().item()
    assert err_k <= 2 * err_p + 1e-6, f"kernel error {err_k} > 2 x reference error {err_p}"
    x = torch.randn(2, 8, 5, 7, device=device).to(dtype)
    assert torch.equal(cross_scan(x), cross_scan_ref(x))


def test_noncontiguous_input(device):
    x = torch.randn(2, 9, 6, 3, device=device).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    assert torch.equal(cross_scan(x), cross_scan_ref(x))


def test_gradcheck():
    x = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(2, 4, 2, 15, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_scan, (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, (3, 5)), (ys,))
    assert torch.autograd.gradgradcheck(cross_scan, (x,))


def test_poisoned_outputs(device):
    x = torch.randn(2, 3, 5, 6, device=device)
    ys = torch.randn(2, 4, 3, 30, device=device)
    stream = quadmamba._backend.stream(x)
    out = torch.full((2, 4, 3, 30), float("nan"), device=device)
    core().cross_scan_fwd(view(x), view(out), stream)
    assert torch.equal(out, cross_scan_ref(x))
    y = torch.full((2, 3, 5, 6), float("nan"), device=device)
    core().cross_merge_fwd(view(ys), view(y), stream)
    torch.testing.assert_close(y, cross_merge_ref(ys, (5, 6)))


def test_opcheck(device):
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    ys = torch.randn(2, 4, 3, 30, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.quadmamba.cross_scan.default, (x,))
    torch.library.opcheck(torch.ops.quadmamba.cross_merge.default, (ys, 5, 6))


def test_torch_compile_fullgraph():
    def f(x):
        return cross_merge(cross_scan(x) * 3, (4, 6))

    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    out = torch.compile(f, fullgraph=True)(x)
    assert torch.equal(out, 12 * x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 12.0))


def test_torch_export_one_node_per_op(export_targets):
    class ScanMerge(torch.nn.Module):
        def forward(self, x):
            return cross_merge(cross_scan(x) * 3, (4, 6))

    x = torch.randn(2, 3, 4, 6)
    program = torch.export.export(ScanMerge(), (x,))
    assert export_targets(program) == ["quadmamba.cross_scan.default", "aten.mul.Tensor", "quadmamba.cross_merge.default"]
    assert torch.equal(program.module()(x), 12 * x)


def test_torch_export_with_dynamic_height_and_width(export_targets):
    class ScanMerge(torch.nn.Module):
        def forward(self, x):
            return cross_merge(cross_scan(x) * 3, (x.shape[2], x.shape[3]))

    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    program = torch.export.export(ScanMerge(), (torch.randn(2, 3, 4, 6),),
                                  dynamic_shapes={"x": {2: height, 3: width}})
    assert [t for t in export_targets(program) if t.startswith("quadmamba")] == [
        "quadmamba.cross_scan.default", "quadmamba.cross_merge.default"]
    x = torch.randn(2, 3, 5, 9)
    assert torch.equal(program.module()(x), 12 * x)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)], ids=["no batch", "no channels"])
def test_empty_inputs_give_empty_outputs(shape):
    x = torch.randn(shape, requires_grad=True)
    ys = cross_scan(x)
    assert ys.shape == cross_scan_ref(x).shape == (shape[0], 4, shape[1], 20)
    y = cross_merge(ys, (4, 5))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 5)
    ys = torch.randn(2, 4, 3, 20)
    cases = [
        (lambda: cross_scan([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: cross_scan(x[0]), ValueError, "x must have 4 dims"),
        (lambda: cross_scan(x.int()), TypeError, "x must be float32"),
        (lambda: cross_scan(torch.randn(2, 3, 0, 5)), ValueError, "x's (H, W) must be positive, got (0, 5)"),
        (lambda: cross_merge(ys, (5, 5)), ValueError, "ys must have shape"),
        (lambda: cross_merge(ys[:, :2], (4, 5)), ValueError, "ys must have shape"),
        (lambda: cross_merge(ys, (4, -5)), ValueError, "size must be positive"),
        (lambda: cross_merge(ys, 20), TypeError, "size must be a pair"),
        (lambda: cross_merge(ys[0], (4, 5)), ValueError, "ys must have 4 dims"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=re.escape(text)):
            fn()
