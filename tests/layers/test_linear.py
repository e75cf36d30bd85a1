"""quadmamba.layers.common.Linear: nn.Linear (+ exact GELU) whose float32 eager CPU work goes
through oneDNN's fused linear (inference and training); every other case must be F.linear
exactly."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from quadmamba.layers.common import (
    ONEDNN_LINEAR_ENV, Linear, Mlp, _OneDNNLinear, eager_cpu, eager_cpu_inference, onednn_linear_works,
)
from quadmamba.layers.predictor import ScorePredictor

ONEDNN = "mkldnn::_linear_pointwise"
needs_onednn = pytest.mark.skipif(not onednn_linear_works(), reason="this torch build has no oneDNN fused linear")


@pytest.fixture
def any_size(monkeypatch):
    """oneDNN for products of any size (the tests' shapes are under MIN_FUSED_MACS)."""
    monkeypatch.setattr(Linear, "MIN_FUSED_MACS", 0)


def _ops_called(fn, *args):
    """(result, {name: calls} of the aten/mkldnn ops the call ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, {event.key: event.count for event in prof.key_averages()}


def _expected(layer, x):
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if layer.gelu else y


def _inputs():
    torch.manual_seed(0)
    yield "2d", torch.randn(37, 24)
    yield "3d", torch.randn(2, 5, 7, 24)
    yield "permuted", torch.randn(2, 24, 5, 7).permute(0, 2, 3, 1)    # channels-first memory
    yield "row stride", torch.randn(37, 48)[:, 5:29]
    yield "one token", torch.randn(1, 24)
    yield "no tokens", torch.randn(0, 24)


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_takes_onednn_and_matches_f_linear(any_size, gelu, bias):
    torch.manual_seed(1)
    layer = Linear(24, 40, bias=bias, gelu=gelu).eval()
    for name, x in _inputs():
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                got, ops = _ops_called(layer, x)
                want = _expected(layer, x)
            assert ONEDNN in ops, (name, sorted(ops))
            assert got.shape == want.shape == x.shape[:-1] + (40,), name
            assert got.dtype == torch.float32
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (name, (got - want).abs().max())


@needs_onednn
@pytest.mark.parametrize("dw_route", ["mm", "onednn"])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_training_takes_onednn_with_f_linear_gradients(any_size, monkeypatch, dw_route, gelu, bias):
    monkeypatch.setattr(_OneDNNLinear, "MIN_ONEDNN_DW_INPUTS", 0 if dw_route == "onednn" else 10**9)
    torch.manual_seed(2)
    layer = Linear(24, 40, bias=bias, gelu=gelu)
    ref = nn.Linear(24, 40, bias=bias)
    ref.load_state_dict(layer.state_dict())
    for name, x in _inputs():
        x = x.clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = torch.randn(x.shape[:-1] + (40,))
        y, ops = _ops_called(layer, x)
        y_ref = F.gelu(ref(x_ref)) if gelu else ref(x_ref)
        assert ONEDNN in ops, name
        assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5), name
        layer.zero_grad()
        ref.zero_grad()
        _, backward_ops = _ops_called(y.backward, dy)                # dx, and dW on "onednn"
        expected = 2 if dw_route == "onednn" and x.numel() else 1          # no tokens: torch.mm
        assert backward_ops.get(ONEDNN, 0) == expected, (name, backward_ops)
        y_ref.backward(dy)
        pairs = [(x.grad, x_ref.grad), (layer.weight.grad, ref.weight.grad)]
        pairs += [(layer.bias.grad, ref.bias.grad)] if bias else []
        for got, want in pairs:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (name, (got - want).abs().max())

    frozen = Linear(24, 40, bias=bias, gelu=gelu).requires_grad_(False)     # input gradient only
    x = torch.randn(5, 24, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad.shape == x.shape and frozen.weight.grad is None


@needs_onednn
def test_double_backward_through_the_onednn_route(any_size):
    """create_graph: the backward runs differentiable ops, so second derivatives are F.linear's."""
    torch.manual_seed(5)
    layer = Linear(6, 20, gelu=True)
    x = torch.randn(4, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    def penalty(y, inp):
        (grad,) = torch.autograd.grad(y.square().sum(), inp, create_graph=True)
        return grad.square().sum()

    penalty(layer(x), x).backward()
    got_w, got_x = layer.weight.grad.clone(), x.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", enabled=False):
        y_ref = F.gelu(F.linear(x_ref, layer.weight, layer.bias))
    penalty(y_ref, x_ref).backward()
    assert torch.allclose(got_x, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got_w, layer.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")   # mkldnn.flags' note
@pytest.mark.parametrize("gelu", [False, True])
def test_everything_else_is_f_linear(any_size, gelu):
    """Autocast, float64, fused=False, narrow outputs, FLOP counting, torch.func, a strided
    bias, oneDNN turned off: plain PyTorch, bitwise, with autocast's dtype and the counted
    FLOPs."""
    torch.manual_seed(2)
    layer = Linear(24, 40, gelu=gelu)
    x = torch.randn(9, 24)

    grads = torch.func.grad(lambda inp: layer(inp).sum())(x)
    expected = torch.func.grad(lambda inp: _expected(layer, inp).sum())(x)
    assert torch.equal(grads, expected)
    (y,), ops = _ops_called(torch.func.vmap(layer), x[None])
    assert ONEDNN not in ops and torch.equal(y, _expected(layer, x))

    for plain in (Linear(24, 40, gelu=gelu, fused=False), Linear(24, 2, gelu=gelu)):
        y, ops = _ops_called(plain, x.requires_grad_())               # training too
        assert ONEDNN not in ops and torch.equal(y, _expected(plain, x)), plain
        x.requires_grad_(False)

    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, ops = _ops_called(layer, x)
        assert ONEDNN not in ops and y.dtype == torch.bfloat16

        double = Linear(24, 40, gelu=gelu).double()
        y, ops = _ops_called(double, x.double())
        assert ONEDNN not in ops and torch.equal(y, _expected(double, x.double()))

        for plain in (Linear(24, 40, gelu=gelu, fused=False), Linear(24, 2, gelu=gelu)):
            y, ops = _ops_called(plain, x)
            assert ONEDNN not in ops and torch.equal(y, _expected(plain, x)), plain

        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == 2 * 9 * 24 * 40

        strided = Linear(24, 40, gelu=gelu)                             # a bias oneDNN misreads
        strided.bias = nn.Parameter(torch.randn(80)[::2])
        y, ops = _ops_called(strided, x)
        assert ONEDNN not in ops and torch.equal(y, _expected(strided, x))

        with torch.backends.mkldnn.flags(enabled=False):
            y, ops = _ops_called(layer, x)
            assert ONEDNN not in ops and torch.equal(y, _expected(layer, x))


@needs_onednn
def test_small_products_take_f_linear():
    layer = Linear(24, 40)
    tokens = -(-Linear.MIN_FUSED_MACS // (24 * 40))                   # the first size routed
    with torch.no_grad():
        for n, routed in ((tokens - 1, False), (tokens, True)):
            x = torch.randn(n, 24)
            y, ops = _ops_called(layer, x)
            assert (ONEDNN in ops) == routed, n
            assert torch.allclose(y, _expected(layer, x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_environment_turns_the_route_off(any_size, monkeypatch):
    layer = Linear(24, 40, gelu=True)
    x = torch.randn(9, 24)
    monkeypatch.setenv(ONEDNN_LINEAR_ENV, "0")
    onednn_linear_works.cache_clear()
    try:
        assert onednn_linear_works() is False
        with torch.no_grad():
            y, ops = _ops_called(layer, x)
        assert ONEDNN not in ops and torch.equal(y, _expected(layer, x))
    finally:
        monkeypatch.undo()
        onednn_linear_works.cache_clear()
    assert onednn_linear_works() is True


def test_eager_cpu_inference_flags(monkeypatch):
    x = torch.randn(3, 4)
    assert eager_cpu_inference(x) is False and eager_cpu(x) is True  # grad mode on
    assert torch.func.vmap(lambda t: torch.tensor(float(eager_cpu(t))))(x).tolist() == [0.0] * 3
    # a torch without the transforms probe: the wrapped tensor tells
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active")
    assert eager_cpu(x) is True
    assert torch.func.vmap(lambda t: torch.tensor(float(eager_cpu(t))))(x).tolist() == [0.0] * 3
    monkeypatch.undo()
    with torch.no_grad():
        assert eager_cpu_inference(x) is True
        assert eager_cpu_inference(nn.Parameter(x)) is False         # a subclass
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert eager_cpu_inference(x) is False
        with FlopCounterMode(display=False):
            assert eager_cpu_inference(x) is False
        assert eager_cpu_inference(torch.empty(3, 4, device="meta")) is False


def test_same_parameters_and_state_dict_as_nn_linear():
    torch.manual_seed(3)
    layer = Linear(6, 20, gelu=True)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(nn.Linear(6, 20).state_dict()) == ["weight", "bias"]
    assert list(Linear(6, 20, bias=False).state_dict()) == ["weight"]
    assert repr(layer) == "Linear(in_features=6, out_features=20, bias=True, gelu=True)"
    assert repr(Linear(6, 20, fused=False)) == "Linear(in_features=6, out_features=20, bias=True, fused=False)"
    for bad in (dict(gelu="no"), dict(fused=1)):
        with pytest.raises(TypeError, match=f"Linear: {next(iter(bad))} must be a bool"):
            Linear(6, 20, **bad)


@needs_onednn
def test_mlp_and_predictor_fused_equal_plain(any_size):
    """The layers built on Linear: the oneDNN route (fused) against plain PyTorch (fused=False)
    with the same weights."""
    torch.manual_seed(4)
    for fused, plain, x in ((Mlp(32, 128), Mlp(32, 128, fused=False), torch.randn(2, 7, 9, 32)),
                            (ScorePredictor(64), ScorePredictor(64, fused=False), torch.randn(2, 64, 8, 6))):
        plain.load_state_dict(fused.state_dict())
        with torch.no_grad():
            got, ops = _ops_called(fused.eval(), x)
            want, plain_ops = _ops_called(plain.eval(), x)
        assert ONEDNN in ops and ONEDNN not in plain_ops
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


@needs_onednn
def test_models_route_every_wide_linear_and_the_reference_none(any_size):
    """A fused model sends each of its Linears with >= 16 outputs (MLPs, predictors, in_proj,
    out_proj) through oneDNN once per forward; the plain-PyTorch model none; same logits."""
    import quadmamba

    torch.manual_seed(6)
    fused = quadmamba.create_model("quadmamba_nano", num_classes=10).eval()
    plain = quadmamba.create_model("quadmamba_nano", num_classes=10, kernels="reference").eval()
    plain.load_state_dict(fused.state_dict())
    wide = [m for m in fused.modules() if isinstance(m, Linear) and m.out_features >= Linear.MIN_FUSED_OUTPUTS]
    assert all(m.fused for m in wide) and not any(m.fused for m in plain.modules() if isinstance(m, Linear))
    owners = {name.rsplit(".", 1)[-1] for name, m in fused.named_modules() if m in wide}
    assert owners == {"fc1", "fc2", "in_proj", "out_proj"}, owners    # nano's predictor fc3: < 16 outputs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, ops = _ops_called(fused, x)
        want, plain_ops = _ops_called(plain, x)
    assert ops.get(ONEDNN, 0) == len(wide) and ONEDNN not in plain_ops, (ops.get(ONEDNN), len(wide))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
