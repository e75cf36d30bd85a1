"""quadmamba.ops.selective_scan against its references (selective_scan_ref, and
selective_scan_chunked_ref where the sequential reference's autograd is too slow)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import quadmamba
from quadmamba import _backend
from quadmamba.ops import selective_scan
from quadmamba.ops.reference import project_delta, selective_scan_chunked_ref, selective_scan_ref
from cpu_paths import path_env

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def _seed() -> int:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    return seed


def make_inputs(batch, groups, per_group, dstate, length, params="both", softplus=True,
                dtype=torch.float64, device="cpu"):
    """Fresh random inputs in a well-conditioned range: decays in (0, 1), dl around 0.1..1."""
    channels = groups * per_group
    u = torch.randn(batch, channels, length, dtype=dtype)
    if softplus:
        delta = torch.randn(batch, channels, length, dtype=dtype) * 0.5 - 1.0
    else:
        delta = torch.rand(batch, channels, length, dtype=dtype) * 0.5 + 0.05
    A = -(torch.rand(channels, dstate, dtype=dtype) * 2.0 + 0.2)
    B = torch.randn(batch, groups, dstate, length, dtype=dtype)
    C = torch.randn(batch, groups, dstate, length, dtype=dtype)
    D = torch.randn(channels, dtype=dtype) if params in ("both", "D") else None
    # Without softplus dl = delta + bias must stay positive (else the state grows without bound).
    bias_raw = torch.randn(channels, dtype=dtype) if softplus else torch.rand(channels, dtype=dtype)
    bias = bias_raw * 0.3 if params in ("both", "bias") else None
    return [None if t is None else t.to(device) for t in (u, delta, A, B, C, D, bias)]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close(actual, expected, name, *, rtol, atol_scale, extra=""):
    """|actual - expected| <= atol_scale * max|expected| + rtol * |expected|, NaN never passes."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {extra}"
    scale = max(expected.abs().max().item(), 1e-30)
    bound = atol_scale * scale + rtol * expected.abs()
    err = (actual - expected).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, (
        f"{name}: max abs err {err.max().item():.3e} exceeds tolerance (scale {scale:.3e}, "
        f"rtol {rtol}, atol {atol_scale}*scale) {extra}"
    )


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wrt, grad_out))
    return y.detach(), [next(grads) if t is not None else None for t in leaves]


# (L, N, K, B, D per group, params, softplus): every value of every axis appears;
# D per group covers a partial lane group (< 8), exactly 8, 8 + 1 and 16.
CASES = [
    (1, 1, 1, 1, 1, "both", True),
    (2, 4, 2, 3, 3, "none", True),
    (3, 16, 4, 1, 2, "D", False),
    (17, 1, 2, 3, 9, "bias", False),
    (127, 4, 4, 1, 8, "both", True),
    (128, 16, 1, 3, 5, "both", True),
    (129, 1, 4, 3, 16, "none", True),
    (2047, 4, 1, 1, 9, "bias", False),
    (2048, 1, 2, 1, 8, "both", True),
    (2049, 16, 2, 1, 3, "D", True),
    (5000, 1, 4, 1, 4, "both", False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-N{}-K{}-B{}-Dg{}-{}-{}".format(
    c[0], c[1], c[2], c[3], c[4], c[5], "softplus" if c[6] else "linear"))
def test_forward_and_gradients_match_reference(case):
    length, dstate, groups, batch, per_group, params, softplus = case
    seed = _seed()
    inputs = make_inputs(batch, groups, per_group, dstate, length, params, softplus)
    grad_out = torch.randn(batch, groups * per_group, length, dtype=torch.float64)
    extra = f"(seed {seed}, case {case})"
    # Truth: float64 autograd through the sequential reference; at long L through the
    # chunked reference (an independent formulation, checked against the sequential one below).
    if length <= 512:
        ref = lambda *x: selective_scan_ref(*x, delta_softplus=softplus)  # noqa: E731
    else:
        ref = lambda *x: selective_scan_chunked_ref(*x, delta_softplus=softplus)  # noqa: E731
    y_ref, g_ref = _grads(ref, inputs, grad_out)
    op = lambda *x: selective_scan(*x, delta_softplus=softplus)  # noqa: E731
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-5)):
        cast = [None if t is None else t.to(dtype) for t in inputs]
        y, grads = _grads(op, cast, grad_out.to(dtype))
        assert y.dtype == dtype
        assert_close(y, y_ref, f"y[{dtype}]", rtol=rtol, atol_scale=atol, extra=extra)
        for name, g, gr in zip(NAMES, grads, g_ref):
            if gr is None:
                continue
            assert g.dtype == dtype, f"d{name} has dtype {g.dtype}"
            assert_close(g, gr, f"d{name}[{dtype}]", rtol=rtol, atol_scale=atol, extra=extra)


# ---- low-rank delta (delta_proj) ------------------------------------------------------
def make_low_rank(batch, groups, per_group, rank, length, dtype=torch.float64):
    """A low-rank delta (B, K, R, L) and delta_proj (KD, R), both positive, whose projection
    lies in (0, 0.5): bounded decays with and without softplus."""
    low = torch.rand(batch, groups, rank, length, dtype=dtype) * 0.95 + 0.05
    proj = torch.rand(groups * per_group, rank, dtype=dtype) * (0.5 / rank)
    return low, proj


# (L, N, K, B, D per group, R, params, softplus): rows of one to 17 tiles (the backward keeps
# a_t, h_t up to 16), partial and full lane groups, R = 1 .. 16.
LOW_RANK_CASES = [
    (1, 1, 1, 1, 1, 1, "both", True),
    (17, 4, 2, 3, 9, 3, "none", False),
    (200, 1, 4, 2, 8, 16, "both", True),
    (1100, 1, 2, 1, 5, 4, "bias", True),
    (1024, 2, 1, 2, 16, 2, "D", False),
]


@pytest.mark.parametrize("case", LOW_RANK_CASES, ids=lambda c: "L{}-N{}-K{}-B{}-Dg{}-R{}-{}-{}".format(
    *c[:7], "softplus" if c[7] else "linear"))
def test_low_rank_delta_matches_its_projection(case):
    """delta_proj: the op's y and every gradient (the low-rank delta's and delta_proj's
    included) are those of the scan of project_delta(delta, delta_proj), float64 autograd."""
    length, dstate, groups, batch, per_group, rank, params, softplus = case
    seed = _seed()
    u, _, A, B, C, D, bias = make_inputs(batch, groups, per_group, dstate, length, params, softplus)
    low, proj = make_low_rank(batch, groups, per_group, rank, length)
    inputs = [u, low, A, B, C, D, bias, proj]
    grad_out = torch.randn(batch, groups * per_group, length, dtype=torch.float64)
    scan = selective_scan_ref if length <= 512 else selective_scan_chunked_ref

    def truth(u, low, A, B, C, D, bias, proj):
        return scan(u, project_delta(low, proj), A, B, C, D, bias, delta_softplus=softplus)

    y_ref, g_ref = _grads(truth, inputs, grad_out)
    extra = f"(seed {seed}, case {case})"
    names = NAMES + ("delta_proj",)
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-5)):
        cast = [None if t is None else t.to(dtype) for t in inputs]
        y, grads = _grads(lambda *x: selective_scan(*x[:7], delta_softplus=softplus, delta_proj=x[7]), cast,
                          grad_out.to(dtype))
        assert_close(y, y_ref, f"y[{dtype}]", rtol=rtol, atol_scale=atol, extra=extra)
        for name, g, gr, t in zip(names, grads, g_ref, cast):
            if gr is None:
                continue
            assert g.dtype == t.dtype and g.shape == t.shape, f"d{name}: {g.dtype} {tuple(g.shape)}"
            assert_close(g, gr, f"d{name}[{dtype}]", rtol=rtol, atol_scale=atol, extra=extra)
    # The reference takes delta_proj too, as the same projection.
    if length <= 512:
        y_ref2 = selective_scan_ref(u, low, A, B, C, D, bias, delta_softplus=softplus, delta_proj=proj)
        assert_close(y_ref2, y_ref, "selective_scan_ref(delta_proj)", rtol=1e-12, atol_scale=1e-12, extra=extra)


def test_low_rank_delta_gradcheck_and_opcheck():
    _seed()
    u, _, A, B, C, D, bias = make_inputs(2, 2, 3, 2, 6, "both", True)
    low, proj = make_low_rank(2, 2, 3, 2, 6)
    inputs = [t.requires_grad_() for t in (u, low, A, B, C, D, bias, proj)]
    assert torch.autograd.gradcheck(lambda *x: selective_scan(*x[:7], delta_proj=x[7]), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.quadmamba.selective_scan.default, f32[:7] + [True, False, f32[7]])
    dy = torch.randn_like(f32[0])
    bwd_args = (dy, *[t.detach() for t in f32[:7]], True, f32[7].detach())
    grads = torch.ops.quadmamba.selective_scan_bwd(*bwd_args)
    assert grads[1].shape == u.shape and grads[1].dtype == torch.float32   # ddelta of the projection
    torch.library.opcheck(torch.ops.quadmamba.selective_scan_bwd.default, bwd_args)


def test_project_delta_rejects_mismatched_shapes():
    low, proj = make_low_rank(2, 2, 3, 4, 5)
    assert project_delta(low, proj).shape == (2, 6, 5)
    for bad_low, bad_proj, match in ((low[0], proj, "must be \\(B, K, R, L\\)"),
                                     (low, proj[:, :3], "R = 4"),
                                     (low, proj[:5], "K = 2 dividing")):
        with pytest.raises(ValueError, match=match):
            project_delta(bad_low, bad_proj)


def test_low_rank_delta_flops():
    batch, groups, per_group, dstate, length, rank = 2, 2, 3, 4, 10, 5
    u, _, A, B, C, D, bias = make_inputs(batch, groups, per_group, dstate, length, "both", True, dtype=torch.float32)
    low, proj = make_low_rank(batch, groups, per_group, rank, length, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        selective_scan(u, low, A, B, C, D, bias, delta_proj=proj)
    channels = groups * per_group
    expected = 2 * (9 * batch * length * channels * dstate + batch * channels * length * (1 + rank))
    assert counter.get_total_flops() == expected, f"{counter.get_total_flops()} != {expected}"


def test_low_rank_delta_on_every_device(device):
    """float32 on the device (CUDA projects before its kernels) against float64 autograd."""
    seed = _seed()
    batch, groups, per_group, dstate, length, rank = 2, 2, 8, 1, 1030, 4
    u, _, A, B, C, D, bias = make_inputs(batch, groups, per_group, dstate, length, "both", True)
    low, proj = make_low_rank(batch, groups, per_group, rank, length)
    inputs = [u, low, A, B, C, D, bias, proj]
    grad_out = torch.randn(batch, groups * per_group, length, dtype=torch.float64)
    y64, g64 = _grads(lambda *x: selective_scan_chunked_ref(x[0], project_delta(x[1], x[7]), *x[2:7]),
                      inputs, grad_out)
    on_device = [t.float().to(device) for t in inputs]
    y, grads = _grads(lambda *x: selective_scan(*x[:7], delta_proj=x[7]), on_device, grad_out.float().to(device))
    extra = f"(seed {seed}, {device})"
    assert_close(y, y64, "y", rtol=1e-4, atol_scale=1e-5, extra=extra)
    for name, g, gr in zip(NAMES + ("delta_proj",), grads, g64):
        assert_close(g, gr, f"d{name}", rtol=1e-4, atol_scale=1e-5, extra=extra)


@pytest.mark.parametrize("length,chunk", [(1, 32), (33, 32), (300, 16)])
def test_chunked_reference_matches_sequential(length, chunk):
    seed = _seed()
    inputs = make_inputs(2, 2, 3, 4, length, "both", True)
    grad_out = torch.randn(2, 6, length, dtype=torch.float64)
    y1, g1 = _grads(selective_scan_ref, inputs, grad_out)
    y2, g2 = _grads(lambda *x: selective_scan_chunked_ref(*x, chunk=chunk), inputs, grad_out)
    assert_close(y2, y1, "y", rtol=1e-10, atol_scale=1e-10, extra=f"seed {seed}")
    for name, a, b in zip(NAMES, g2, g1):
        assert_close(a, b, f"d{name}", rtol=1e-10, atol_scale=1e-10, extra=f"seed {seed}")


def test_hand_computed_two_steps():
    # N = 1, one channel, no softplus: dl = (0.5, 1), A = -1, B = (2, 1), C = (1, 3), u = (1, 2), D = 0.5
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 1.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[[2.0, 1.0]]]], dtype=torch.float64)
    C = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    h0 = 0.5 * 2.0 * 1.0  # exp(-0.5) * 0 + 0.5 * 1 * 2
    h1 = math.exp(-1.0) * h0 + 1.0 * 2.0 * 1.0
    expected = torch.tensor([[[1.0 * h0 + 0.5 * 1.0, 3.0 * h1 + 0.5 * 2.0]]], dtype=torch.float64)
    y = selective_scan(u, delta, A, B, C, D, None, delta_softplus=False)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_softplus_threshold_and_extremes():
    seed = _seed()
    inputs = make_inputs(1, 2, 8, 1, 64, "both", True)
    delta = inputs[1]
    delta[0, :, :8] = 25.0  # softplus(x) = x branch
    delta[0, :, 8:16] = torch.linspace(19.5, 20.5, 8, dtype=torch.float64)
    delta[0, :, 16:24] = -40.0  # softplus ~ 0
    inputs[2] = -(torch.rand(16, 1, dtype=torch.float64) * 0.05 + 0.01)  # keep decays moderate at large dl
    grad_out = torch.randn(1, 16, 64, dtype=torch.float64)
    y_ref, g_ref = _grads(selective_scan_ref, inputs, grad_out)
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-5)):
        y, grads = _grads(selective_scan, [t.to(dtype) for t in inputs], grad_out.to(dtype))
        assert_close(y, y_ref, f"y[{dtype}]", rtol=rtol, atol_scale=atol, extra=f"seed {seed}")
        for name, g, gr in zip(NAMES, grads, g_ref):
            assert_close(g, gr, f"d{name}[{dtype}]", rtol=rtol, atol_scale=atol, extra=f"seed {seed}")


@pytest.mark.parametrize("softplus", [True, False])
def test_gradcheck_float64(softplus):
    _seed()
    inputs = make_inputs(2, 2, 2, 2, 5, "both", softplus)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(
        lambda *x: selective_scan(*x, delta_softplus=softplus), inputs, eps=1e-6, atol=1e-7, rtol=1e-6
    )


def test_opcheck():
    _seed()
    inputs = make_inputs(2, 2, 3, 2, 7, "both", True, dtype=torch.float32)
    args = [t.requires_grad_() for t in inputs] + [True, False]
    torch.library.opcheck(torch.ops.quadmamba.selective_scan.default, args)
    no_params = make_inputs(1, 1, 2, 1, 4, "none", False, dtype=torch.float32)
    torch.library.opcheck(torch.ops.quadmamba.selective_scan.default, no_params + [False, False])
    # bfloat16 inputs, float32 output.
    half = [t.to(torch.bfloat16) if i in (0, 1, 3, 4) else t for i, t in enumerate(inputs)]
    torch.library.opcheck(torch.ops.quadmamba.selective_scan.default,
                          [t.detach().requires_grad_() for t in half] + [True, True])


def test_backward_op_returns_each_gradient_in_its_inputs_dtype():
    """The raw backward op (autograd would cast a wrong dtype back silently): float32 data with
    float64 parameters."""
    _seed()
    u, delta, A, B, C, D, bias = make_inputs(2, 2, 3, 1, 9, "both", True, dtype=torch.float32)
    A, D, bias = A.double(), D.double(), bias.double()
    dy = torch.randn_like(u)
    grads = torch.ops.quadmamba.selective_scan_bwd(dy, u, delta, A, B, C, D, bias, True)
    assert [g.dtype for g in grads] == [t.dtype for t in (u, delta, A, B, C, D, bias)]
    torch.library.opcheck(torch.ops.quadmamba.selective_scan_bwd.default, (dy, u, delta, A, B, C, D, bias, True))


def test_raw_op_outputs_are_contiguous_for_any_input_layout():
    """The custom ops write contiguous outputs whatever the inputs' strides, and their fake
    implementations say so (torch.compile plans views of the outputs on them)."""
    _seed()
    inputs = make_inputs(2, 2, 3, 2, 7, "both", True, dtype=torch.float32)
    u = inputs[0].transpose(0, 1).contiguous().transpose(0, 1)              # (B, KD, L), batch innermost-but-one
    B = inputs[3].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)       # (B, K, N, L), N innermost
    args = [u, inputs[1], inputs[2], B, *inputs[4:]]
    assert not u.is_contiguous() and not B.is_contiguous()
    op = torch.ops.quadmamba.selective_scan
    y = op(*args, True, False)
    assert y.is_contiguous()
    torch.testing.assert_close(y, selective_scan(*[t.contiguous() for t in args]), rtol=0, atol=0)
    flat = torch.compile(lambda *a: op(*a, True, False).view(-1), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(flat(*args), y.view(-1), rtol=0, atol=0)
    torch.library.opcheck(op.default, [t.detach().requires_grad_() for t in args] + [True, False])


@pytest.mark.parametrize("batch,channels", [(0, 4), (2, 0)], ids=["no batch", "no channels"])
def test_empty_inputs_give_empty_outputs(batch, channels):
    """As the reference: empty outputs, and gradients that are empty sums (zeros)."""
    _seed()
    u, delta = torch.randn(batch, channels, 7), torch.randn(batch, channels, 7)
    A, B, C = -torch.rand(channels, 3), torch.randn(batch, 2, 3, 7), torch.randn(batch, 2, 3, 7)
    D, bias = torch.randn(channels), torch.randn(channels)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]
    y = selective_scan(*leaves)
    assert y.shape == selective_scan_ref(*leaves).shape == (batch, channels, 7)
    grads = torch.autograd.grad(y.sum(), leaves)
    for name, g, t in zip(NAMES, grads, leaves):
        assert g.shape == t.shape and not g.any(), name


def test_torch_compile_fullgraph_forward_backward():
    _seed()
    inputs = make_inputs(2, 2, 3, 1, 9, "both", True, dtype=torch.float32)

    def loss(u, delta, A, B, C, D, bias):
        return (selective_scan(u * 2.0, delta, A, B, C, D, bias) ** 2).sum()

    leaves = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(loss, fullgraph=True)
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref = loss(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"d{name}: {m}")


def test_torch_export_one_op_with_dynamic_batch_and_length(export_targets):
    _seed()
    inputs = make_inputs(2, 2, 4, 1, 16, "both", True, dtype=torch.float32)

    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, C, D, bias):
            return selective_scan(u, delta, A, B, C, D, bias)

    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    seq, grouped = {0: batch, 2: length}, {0: batch, 3: length}
    program = torch.export.export(Scan(), tuple(inputs), dynamic_shapes=(seq, seq, None, grouped, grouped, None, None))
    assert export_targets(program) == ["quadmamba.selective_scan.default"]
    other = make_inputs(3, 2, 4, 1, 37, "both", True, dtype=torch.float32)
    other[2], other[5], other[6] = inputs[2], inputs[5], inputs[6]  # the parameters are fixed
    assert torch.equal(program.module()(*other), Scan()(*other))


def test_non_contiguous_inputs():
    seed = _seed()
    batch, groups, per_group, dstate, length = 2, 2, 5, 3, 37
    channels = groups * per_group
    u = torch.randn(batch, length, channels, dtype=torch.float64).transpose(1, 2)
    delta = (torch.randn(batch, length, channels, dtype=torch.float64) * 0.5 - 1).transpose(1, 2)
    A = -(torch.rand(dstate, channels, dtype=torch.float64) + 0.2).t()
    B = torch.randn(batch, length, groups, dstate, dtype=torch.float64).permute(0, 2, 3, 1)
    C = torch.randn(batch, groups, dstate, 2 * length, dtype=torch.float64)[..., ::2]
    D = torch.randn(2 * channels, dtype=torch.float64)[::2]
    bias = torch.randn(channels, 2, dtype=torch.float64)[:, 0]
    inputs = [u, delta, A, B, C, D, bias]
    assert not any(t.is_contiguous() for t in inputs)
    grad_out = torch.randn(batch, channels, length, dtype=torch.float64)
    y, grads = _grads(selective_scan, inputs, grad_out)
    y_ref, g_ref = _grads(selective_scan_ref, [t.contiguous() for t in inputs], grad_out)
    assert_close(y, y_ref, "y", rtol=1e-10, atol_scale=1e-10, extra=f"seed {seed}")
    for name, a, b in zip(NAMES, grads, g_ref):
        assert_close(a, b, f"d{name}", rtol=1e-10, atol_scale=1e-10, extra=f"seed {seed}")


def test_poisoned_outputs_are_fully_written():
    """Outputs pre-filled with NaN: every slot must be overwritten (CPU core, both dtypes)."""
    core = _backend.core()
    v = _backend.view
    for dtype in (torch.float32, torch.float64):
        seed = _seed()
        u, delta, A, B, C, D, bias = make_inputs(2, 2, 11, 3, 70, "both", True, dtype=dtype)
        y = torch.full_like(u, float("nan"))
        core.selective_scan_fwd(v(u), v(delta), v(A), v(B), v(C), v(D), v(bias), True, v(y), 0)
        assert_close(y, selective_scan_ref(u, delta, A, B, C, D, bias), "y", rtol=1e-4, atol_scale=1e-5,
                     extra=f"seed {seed}")
        dy = torch.randn_like(u)
        outs = [torch.full_like(t, float("nan")) for t in (u, delta, A, B, C, D, bias)]
        core.selective_scan_bwd(v(u), v(delta), v(A), v(B), v(C), v(D), v(bias), True, v(dy),
                                *[v(t) for t in outs], None, None, None, 0)
        _, g_ref = _grads(selective_scan_ref, [u, delta, A, B, C, D, bias], dy)
        for name, g, gr in zip(NAMES, outs, g_ref):
            assert_close(g, gr, f"d{name}", rtol=1e-4, atol_scale=1e-5, extra=f"seed {seed} {dtype}")


def test_cpu_backward_is_deterministic():
    _seed()
    inputs = make_inputs(2, 2, 40, 2, 300, "both", True, dtype=torch.float32)
    grad_out = torch.randn(2, 80, 300)
    _, g1 = _grads(selective_scan, inputs, grad_out)
    _, g2 = _grads(selective_scan, inputs, grad_out)
    for name, a, b in zip(NAMES, g1, g2):
        assert torch.equal(a, b), f"d{name} differs between two identical runs"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_on_cpu(dtype):
    """Half inputs: error against float64 at most 2x that of the reference run in the same precision."""
    seed = _seed()
    inputs = make_inputs(2, 2, 5, 4, 300, "both", True)
    half = [t.to(dtype) if i in (0, 1, 3, 4) else t.float() for i, t in enumerate(inputs)]
    truth_inputs = [t.double() for t in half]
    grad_out = torch.randn(2, 10, 300, dtype=torch.float64).to(dtype)
    y64, g64 = _grads(selective_scan_ref, truth_inputs, grad_out.double())
    y_ref, g_ref = _grads(selective_scan_ref, half, grad_out)
    y, grads = _grads(selective_scan, half, grad_out)
    assert y.dtype == dtype
    for name, a, r, t in zip(("y",) + tuple("d" + n for n in NAMES), [y] + grads, [y_ref] + g_ref, [y64] + g64):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype}, reference {r.dtype}"
        scale = t.abs().max().item()
        err, err_ref = _max_err(a, t), _max_err(r, t)
        assert err <= 2 * err_ref + 1e-5 * scale, f"{name}: error {err:.3e} vs reference's {err_ref:.3e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_output_of_half_inputs(device, dtype):
    """out_dtype=torch.float32: y unrounded (float32 accuracy on the values the kernel sees);
    its float32 gradient is used unrounded too (float32 gradients at float32 accuracy, 16-bit
    ones rounded once), and the reference agrees."""
    seed = _seed()
    inputs = make_inputs(2, 2, 3, 1, 300, "both", True)
    seen = [t.to(dtype) if i in (0, 1, 3, 4) else t.float() for i, t in enumerate(inputs)]
    grad_out = torch.randn(2, 6, 300, dtype=torch.float64)
    y64, g64 = _grads(selective_scan_chunked_ref, [t.double() for t in seen], grad_out.double())
    on_device = [t.to(device) for t in seen]
    y, grads = _grads(lambda *x: selective_scan(*x, out_dtype=torch.float32), on_device,
                      grad_out.float().to(device))
    assert y.dtype == torch.float32
    extra = f"(seed {seed}, {device}, {dtype})"
    assert_close(y, y64, "y", rtol=1e-4, atol_scale=1e-5, extra=extra)
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11     # the rounding of one 16-bit result
    for name, g, t, gt in zip(NAMES, grads, on_device, g64):
        assert g.dtype == t.dtype, name
        scale = gt.abs().max().item()
        bound = 1e-4 if g.dtype == torch.float32 else 2 * unit       # (dy rounded to 16 bits: about 1e-3 in dA)
        assert _max_err(g, gt) <= bound * scale, f"d{name}: {_max_err(g, gt) / scale:.2e} of the scale {extra}"
    y_ref = selective_scan_ref(*on_device, out_dtype=torch.float32)
    assert y_ref.dtype == torch.float32
    assert_close(y_ref, y64, "reference y", rtol=1e-4, atol_scale=1e-5, extra=extra)
    if device.type == "cpu":  # the CPU runs float32 on the upcast values: identical
        assert torch.equal(y, selective_scan(*[t.float() for t in seen]))


def test_out_dtype_must_be_inputs_or_float32():
    inputs = make_inputs(1, 1, 2, 1, 4, "both", True, dtype=torch.float32)
    assert selective_scan(*inputs, out_dtype=torch.float32).dtype == torch.float32
    assert selective_scan(*[t.double() for t in inputs], out_dtype=torch.float32).dtype == torch.float32
    for fn in (selective_scan, selective_scan_ref):
        with pytest.raises(TypeError, match="out_dtype must be None, u's dtype"):
            fn(*inputs, out_dtype=torch.float16)


def test_autocast_leaves_dtype_alone():
    inputs = make_inputs(1, 2, 3, 1, 8, "both", True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(*inputs)
    assert y.dtype == torch.float32


def test_flop_counter():
    batch, groups, per_group, dstate, length = 2, 2, 3, 4, 10
    inputs = make_inputs(batch, groups, per_group, dstate, length, "both", True, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        selective_scan(*inputs)
    channels = groups * per_group
    expected = 2 * (9 * batch * length * channels * dstate + batch * channels * length)
    assert counter.get_total_flops() == expected, f"{counter.get_total_flops()} != {expected}"


def _bad(mutate):
    inputs = dict(zip(NAMES, make_inputs(2, 2, 3, 4, 6, "both", True, dtype=torch.float32)))
    mutate(inputs)
    return inputs


BAD_INPUTS = [
    ("u-rank", lambda x: x.update(u=x["u"][0]), ValueError, "u must be"),
    ("u-not-tensor", lambda x: x.update(u=[1.0]), TypeError, "u must be a torch.Tensor"),
    ("delta-shape", lambda x: x.update(delta=x["delta"][:, :, :5]), ValueError, "delta must have"),
    ("A-rows", lambda x: x.update(A=x["A"][:5]), ValueError, "A must be"),
    ("N-too-big", lambda x: x.update(A=torch.zeros(6, 17) - 1), ValueError, "N must be in"),
    ("N-zero", lambda x: x.update(A=torch.zeros(6, 0)), ValueError, "N must be in"),
    ("B-length", lambda x: x.update(B=x["B"][..., :5]), ValueError, "B must be"),
    ("C-state", lambda x: x.update(C=x["C"][:, :, :3]), ValueError, "C must be"),
    ("K-not-dividing", lambda x: x.update(B=torch.zeros(2, 4, 4, 6), C=torch.zeros(2, 4, 4, 6)), ValueError,
     "K = 4 must divide KD = 6"),
    ("L-zero", lambda x: x.update(u=x["u"][..., :0], delta=x["delta"][..., :0]), ValueError, "L = 0"),
    ("delta-dtype", lambda x: x.update(delta=x["delta"].double()), TypeError, "delta must have u's dtype"),
    ("u-int", lambda x: x.update(u=x["u"].long(), delta=x["delta"].long(), B=x["B"].long(),
                                 C=x["C"].long()), TypeError, "u must be float32"),
    ("A-half", lambda x: x.update(A=x["A"].half()), TypeError, "A must be float32 or float64"),
    ("A-inf", lambda x: x["A"].__setitem__((0, 0), float("-inf")), ValueError, "A has non-finite"),
    ("A-nan", lambda x: x["A"].__setitem__((1, 2), float("nan")), ValueError, "A has non-finite"),
    ("D-shape", lambda x: x.update(D=x["D"][:4]), ValueError, "D must be"),
    ("bias-shape", lambda x: x.update(delta_bias=x["delta_bias"][None]), ValueError, "delta_bias must be"),
    ("C-device", lambda x: x.update(C=x["C"].to("meta")), ValueError, "C is on meta"),
    ("proj-full-delta", lambda x: x.update(delta_proj=torch.ones(6, 3)), ValueError,
     r"delta must be of shape \(B, K, R, L\) with delta_proj"),
    ("proj-rows", lambda x: x.update(delta=torch.ones(2, 2, 3, 6), delta_proj=torch.ones(5, 3)), ValueError,
     "delta_proj must be"),
    ("proj-rank", lambda x: x.update(delta=torch.ones(2, 2, 3, 6), delta_proj=torch.ones(6, 2)), ValueError,
     r"with delta_proj, delta must be \(B, K, R, L\)"),
    ("proj-int", lambda x: x.update(delta=torch.ones(2, 2, 3, 6), delta_proj=torch.ones(6, 3, dtype=torch.long)),
     TypeError, "delta_proj must be float32 or float64"),
    ("proj-rank1-tensor", lambda x: x.update(delta=torch.ones(2, 2, 3, 6), delta_proj=torch.ones(6)), ValueError,
     "delta_proj must be of shape"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, mutate, exc, match):
    inputs = _bad(mutate)
    with pytest.raises(exc, match=match):
        selective_scan(**inputs)


def test_cuda_tensors_without_cuda_build_raise():
    if quadmamba.cuda_built():
        pytest.skip("this build has CUDA kernels")
    core = _backend.core()
    u, delta, A, B, C, D, bias = make_inputs(1, 1, 2, 1, 4, "both", True, dtype=torch.float32)
    fake = lambda t: (t.data_ptr(), 0, 0, tuple(t.shape), tuple(t.stride()))  # noqa: E731  device 0
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        core.selective_scan_fwd(fake(u), fake(delta), fake(A), fake(B), fake(C), None, None, True, fake(u), 0)


# ---- every device (CUDA when built and present) ----------------------------------
DEVICE_CASES = [
    # (L, N, K, B, Dg): odd L (scalar loads), chunk boundaries of the CUDA kernels
    # (1024 backward, 2048 forward) +- 1, a model shape with even L (vector loads).
    (1023, 1, 2, 2, 5),
    (2049, 16, 4, 1, 2),
    (3136, 1, 2, 1, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DEVICE_CASES, ids=lambda c: "L{}-N{}-K{}-B{}-Dg{}".format(*c))
def test_devices_and_dtypes(device, dtype, case):
    length, dstate, groups, batch, per_group = case
    seed = _seed()
    inputs = make_inputs(batch, groups, per_group, dstate, length, "both", True)
    # The values the kernel sees: u, delta, B, C rounded to dtype; A, D, bias float32.
    seen = [t.to(dtype) if i in (0, 1, 3, 4) else t.float() for i, t in enumerate(inputs)]
    grad_out = torch.randn(batch, groups * per_group, length, dtype=torch.float64).to(dtype)
    y64, g64 = _grads(selective_scan_chunked_ref, [t.double() for t in seen], grad_out.double())
    on_device = [t.to(device) for t in seen]
    y, grads = _grads(selective_scan, on_device, grad_out.to(device))
    assert y.device.type == device.type and y.dtype == dtype
    extra = f"(seed {seed}, {device}, {dtype}, case {case})"
    if dtype == torch.float32:
        assert_close(y, y64, "y", rtol=1e-4, atol_scale=1e-5, extra=extra)
        for name, g, gr in zip(NAMES, grads, g64):
            assert g.dtype == seen[NAMES.index(name)].dtype
            assert_close(g, gr, f"d{name}", rtol=1e-4, atol_scale=1e-5, extra=extra)
        return
    y_ref, g_ref = _grads(selective_scan_chunked_ref, on_device, grad_out.to(device))
    for name, a, r, t in zip(("y",) + tuple("d" + n for n in NAMES), [y] + grads, [y_ref] + g_ref, [y64] + g64):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype}, reference {r.dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite {extra}"
        scale = t.abs().max().item()
        err, err_ref = _max_err(a, t), _max_err(r, t)
        assert err <= 2 * err_ref + 1e-5 * scale, f"{name}: error {err:.3e} vs reference's {err_ref:.3e} {extra}"


def test_deterministic_algorithms_give_bitwise_repeatable_gradients(device):
    """Under torch.use_deterministic_algorithms(True) every gradient repeats bitwise (CUDA
    switches from atomics to fixed-order reductions; the CPU kernels always are) and
    still matches the float64 reference."""
    seed = _seed()
    inputs = [t.float().to(device) for t in make_inputs(3, 2, 12, 2, 1500, "both", True)]
    grad_out = torch.randn(3, 24, 1500, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, first = _grads(selective_scan, inputs, grad_out)
        _, second = _grads(selective_scan, inputs, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    _, g64 = _grads(selective_scan_chunked_ref, [t.double().cpu() for t in inputs], grad_out.double().cpu())
    for name, a, b, r in zip(NAMES, first, second, g64):
        assert torch.equal(a, b), f"d{name} differs between two runs (seed {seed}, {device})"
        assert_close(a.cpu(), r, f"d{name}", rtol=1e-4, atol_scale=1e-5, extra=f"seed {seed} {device}")


def test_long_sequence(device):
    """L = 100k: float32 on the device against the float64 CPU kernel (forward and gradients)."""
    seed = _seed()
    length = 100_000
    inputs = make_inputs(1, 2, 2, 1, length, "both", True)
    grad_out = torch.randn(1, 4, length, dtype=torch.float64)
    y64, g64 = _grads(selective_scan, inputs, grad_out)
    y, grads = _grads(selective_scan, [t.float().to(device) for t in inputs], grad_out.float().to(device))
    extra = f"(seed {seed}, {device})"
    assert_close(y, y64, "y", rtol=1e-4, atol_scale=1e-5, extra=extra)
    for name, g, gr in zip(NAMES, grads, g64):
        assert_close(g, gr, f"d{name}", rtol=1e-4, atol_scale=1e-5, extra=extra)


@pytest.mark.parametrize("path", ["sse2", "avx2"])
def test_other_cpu_kernels_match_reference(run_on_cpu_path, path):
    """The kernel copies this CPU does not pick pass the same checks: the portable one (what
    CPUs without AVX2/FMA run; QUADMAMBA_CPU_GENERIC=1) and, where the native copy is AVX-512,
    the AVX2 one (QUADMAMBA_CPU_NO_AVX512=1). A subprocess runs a subset of this file on each,
    after a check that the environment selects that copy."""
    expected = {"sse2": "portable", "avx2": "avx2"}[path]
    if path == "avx2" and _backend.core().cpu_isa()["selective_scan"] != "avx512":
        pytest.skip("the native copy is not AVX-512, so the native runs test the AVX2 copy")
    probe = subprocess.run(
        [sys.executable, "-c", "from quadmamba._backend import core; print(core().cpu_isa()['selective_scan'])"],
        env=path_env(path), capture_output=True, text=True)
    assert probe.stdout.strip() == expected, (probe.stdout, probe.stderr[-2000:])
    selection = ("match_reference and (L3- or L17- or L129- or L2049-) or softplus_threshold or gradcheck"
                 " or low_rank_delta_matches")
    proc = run_on_cpu_path(__file__, selection, path)
    assert proc.returncode == 0, f"{path} kernels failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "13 passed" in proc.stdout, proc.stdout[-2000:]


def test_kernels_use_torchs_thread_count():
    """The CPU kernels run on as many threads as torch.set_num_threads allows: through the shared
    OpenMP runtime, or (builds without OpenMP) through the count the op wrappers pass on."""
    from quadmamba._backend import core

    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert core().num_threads() == n, (n, core().num_threads(), core().openmp())
    finally:
        torch.set_num_threads(threads)
