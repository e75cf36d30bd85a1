"""Function transforms over the ops. Forward-mode AD reaching an op: refused with a clear error
(PyTorch would drop a custom op's tangents and give a zero jvp); reverse mode inside an open dual
level still works. torch.func.vmap over the data: the per-sample results; over an argument whose
values the op checks (decision, A): refused with an error that names it."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp, vmap

from quadmamba.ops import cross_merge, cross_scan, quad_merge, quad_scan, selective_scan


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    decision = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    A = -torch.rand(4, 1, generator=g, dtype=torch.float64)
    return {
        # name: (function of the differentiated tensor, that tensor)
        "cross_scan": (cross_scan, r(1, 2, 4, 4)),
        "cross_merge": (lambda ys: cross_merge(ys, (4, 4)), r(1, 4, 2, 16)),
        "quad_scan": (lambda x: quad_scan(x, decision, (1, -2)), r(1, 2, 4, 8)),
        "quad_scan decision": (lambda d: quad_scan(r(1, 2, 4, 8), d), decision),
        "quad_merge": (lambda ys: quad_merge(ys, decision, (4, 8)), r(1, 2, 2, 32)),
        "selective_scan": (lambda u: selective_scan(u, r(1, 4, 5), A, r(1, 2, 1, 5), r(1, 2, 1, 5)), r(1, 4, 5)),
        "selective_scan A": (lambda a: selective_scan(r(1, 4, 5), r(1, 4, 5), a, r(1, 2, 1, 5), r(1, 2, 1, 5)), A),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_forward_mode_ad_is_refused(name):
    fn, t = _cases()[name]
    op = name.split()[0]
    with pytest.raises(NotImplementedError, match=f"{op}: forward-mode AD"):
        jvp(fn, (t,), (torch.ones_like(t),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"{op}: forward-mode AD"):
        fn(fwAD.make_dual(t, torch.ones_like(t)))
    if name == "cross_scan":   # a transform that cannot unpack the tangent (vmap inside jvp)
        batch = torch.stack([t, t])
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            jvp(vmap(fn), (batch,), (torch.ones_like(batch),))


def test_plain_tensors_inside_a_dual_level_still_work():
    fn, t = _cases()["quad_scan"]
    expected = fn(t)
    with fwAD.dual_level():
        leaf = t.clone().requires_grad_()
        out = fn(leaf)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == t.shape


def test_vmap_over_the_data_matches_a_loop_and_over_checked_arguments_is_refused():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 2, 4, 8, generator=g)
    decision = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    got = vmap(lambda t: quad_scan(t, decision, (1, 2)))(x)
    torch.testing.assert_close(got, torch.stack([quad_scan(t, decision, (1, 2)) for t in x]), rtol=0, atol=0)
    u = torch.randn(3, 1, 4, 6, generator=g)
    delta, B, C = torch.randn(1, 4, 6, generator=g), torch.randn(1, 2, 1, 6, generator=g), torch.randn(1, 2, 1, 6, generator=g)
    A = -torch.rand(4, 1, generator=g)
    got = vmap(lambda t: selective_scan(t, delta, A, B, C))(u)
    torch.testing.assert_close(got, torch.stack([selective_scan(t, delta, A, B, C) for t in u]))
    decisions = torch.stack([decision, decision])
    with pytest.raises(NotImplementedError, match="decision: its values cannot be read"):
        vmap(lambda d: quad_scan(x[0], d))(decisions)
    with pytest.raises(NotImplementedError, match="decision: its values cannot be read"):
        vmap(lambda d: quad_merge(quad_scan(x[0], decision), d, (4, 8)))(decisions)
    with pytest.raises(NotImplementedError, match="A's values cannot be read"):
        vmap(lambda a: selective_scan(u[0], delta, a, B, C))(torch.stack([A, A]))
