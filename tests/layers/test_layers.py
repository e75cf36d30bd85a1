import dataclasses

import pytest
import torch

from quadmamba.layers import common
from quadmamba.layers.blocks import QuadVSSBlock
from quadmamba.layers.common import Mlp, map_tokens
from quadmamba.layers import (
    SS2D, DropPath, QuadDecision, QuadSS2D, ScorePredictor, get_ops, quadrant_logits,
)
from quadmamba.ops.reference import quad_merge_ref, quad_scan_ref

REF = get_ops("reference")


def _identity_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, delta_proj=None):
    return u.clone()


IDENTITY = dataclasses.replace(REF, selective_scan=_identity_scan)


def _through_without_scan(mixer, x, factor):
    """What the mixer computes when every scan direction is the identity: factor * x."""
    return mixer._project_out(factor * mixer._project_in(x))


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (13, 4), (1, 1), (4, 12)])
@pytest.mark.parametrize("shift", [None, (1, 1), (-1, 1)])
def test_quad_mixer_pad_shift_crop_are_inverse(size, shift):
    torch.manual_seed(0)
    mixer = QuadSS2D(8, ops=IDENTITY, shift=shift).eval()
    x = torch.randn(2, *size, 8)
    got = mixer(x)
    want = _through_without_scan(mixer, x, 2.0)  # seq + reverse(reverse(seq)), a permutation
    assert got.shape == (2, *size, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cross_mixer_is_sum_of_four_directions():
    torch.manual_seed(0)
    mixer = SS2D(8, ops=IDENTITY)
    x = torch.randn(2, 5, 7, 8)
    torch.testing.assert_close(mixer(x), _through_without_scan(mixer, x, 4.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [SS2D, QuadSS2D])
@pytest.mark.parametrize("size", [(5, 7), (8, 12)])
def test_mixer_forward_backward(cls, size):
    torch.manual_seed(0)
    mixer = cls(8, ssm_ratio=2.0, ops=REF).train()
    x = torch.randn(2, *size, 8, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mixer_parameter_shapes():
    mixer = QuadSS2D(40, ssm_ratio=2.0, d_state=3, ops=REF)
    k, d, r, n = 2, 80, 3, 3  # R = ceil(40 / 16)
    assert mixer.x_proj_weight.shape == (k, r + 2 * n, d)
    assert mixer.dt_proj_weight.shape == (k, d, r)
    assert mixer.dt_bias.shape == (k * d,)
    assert mixer.A_log.shape == (k * d, n)
    assert mixer.Ds.shape == (k * d,)
    assert SS2D(40, ops=REF).x_proj_weight.shape[0] == 4
    torch.testing.assert_close(mixer.A_log[5], torch.log(torch.arange(1.0, n + 1)))
    assert torch.all(mixer.Ds == 1)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001, (dt.min().item(), dt.max().item())


def test_predictor_commutes_with_roll_and_gives_log_probs():
    torch.manual_seed(0)
    pred = ScorePredictor(16)
    x = torch.randn(2, 16, 8, 12)
    s = pred(x)
    assert s.shape == (2, 8, 12) and (s <= 0).all()
    torch.testing.assert_close(pred(torch.roll(x, (3, -2), (2, 3))), torch.roll(s, (3, -2), (1, 2)))


def test_quadrant_logits_order():
    score = torch.zeros(1, 4, 6)
    score[0, 2:, :3] = 1.0  # bottom-left quadrant
    assert quadrant_logits(score).tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_decision_eval_is_argmax_and_train_is_straight_through():
    torch.manual_seed(0)
    decide = QuadDecision(tau=1.0)
    score = torch.randn(3, 8, 8, requires_grad=True)
    decide.eval()
    d = decide(score)
    assert torch.equal(d, torch.nn.functional.one_hot(quadrant_logits(score).argmax(1), 4).float())
    decide.train()
    d = decide(score)
    assert torch.equal(d.sum(1), torch.ones(3)) and set(d.unique().tolist()) <= {0.0, 1.0}
    (d * torch.arange(4.0)).sum().backward()
    assert score.grad.abs().sum() > 0, "straight-through estimator must pass a gradient"


def test_decision_stochastic_eval_draws_noise():
    decide = QuadDecision(stochastic_eval=True).eval()
    score = torch.zeros(64, 4, 4)
    picks = decide(score).argmax(1)
    assert len(picks.unique()) > 1, picks
    with pytest.raises(ValueError, match="gumbel_tau"):
        QuadDecision(tau=0.0)


def test_shift_amounts_paper_and_official():
    paper = QuadSS2D(8, ops=REF, shift=(-1, 1))
    official = QuadSS2D(8, ops=REF, shift=(-1, 1), compat="official")
    assert paper.shift_amount(16, 32) == (-2, 4)
    assert official.shift_amount(16, 32) == (-2, 2)
    assert official.shift_amount(128, 16) == (-16, 0) and official.shift_amount(96, 8) == (-12, 4)  # wrapped
    assert QuadSS2D(8, ops=REF).shift_amount(16, 32) == (0, 0)
    with pytest.raises(ValueError, match="shift"):
        QuadSS2D(8, ops=REF, shift=(2, 1))


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_score_frame_and_order_per_compat(compat):
    """paper: the decision sees the score rolled into the scan frame and the quadtree order;
    official: the unrolled score (computed before the shift) and the official fine order."""
    torch.manual_seed(0)
    seen = {}

    def spy_scan(x, decision, shift, order):
        seen["order"], seen["shift"] = order, shift
        return quad_scan_ref(x, decision, shift, order)

    ops = dataclasses.replace(REF, quad_scan=spy_scan)
    mixer = QuadSS2D(8, ops=ops, shift=(1, 1), compat=compat).eval()
    mixer.predictor.register_forward_hook(lambda m, a, out: seen.__setitem__("score", out))
    mixer.decide.register_forward_hook(lambda m, a, out: seen.__setitem__("decided_on", a[0]))
    mixer(torch.randn(1, 16, 16, 8))
    assert seen["shift"] == (2, 2)
    if compat == "paper":
        assert seen["order"] == "quadtree"
        assert torch.equal(seen["decided_on"], torch.roll(seen["score"], (2, 2), (1, 2)))
    else:
        assert seen["order"] == "official"
        assert torch.equal(seen["decided_on"], seen["score"])


def test_official_fine_order_is_not_a_permutation():
    """H = W = 8, TL selected: with the official fine order slots 16-23 hold TL + TR tokens
    and slots 8-15 are empty; merge(scan(x)) != 2x, whereas the paper order gives 2x."""
    x = torch.arange(1.0, 65.0).view(1, 1, 8, 8)
    decision = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    seq = quad_scan_ref(x, decision, order="official")[0, 0, 0]
    assert torch.all(seq[8:16] == 0), seq[8:16]
    assert (seq != 0).sum() == 56, seq
    assert seq.sum() == x.sum(), "every token still appears once in the sum"
    mixer = QuadSS2D(8, ops=IDENTITY, compat="official").eval()
    paper = QuadSS2D(8, ops=IDENTITY).eval()
    paper.load_state_dict(mixer.state_dict())
    torch.manual_seed(1)
    inp = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(paper(inp), _through_without_scan(paper, inp, 2.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixer(inp), _through_without_scan(mixer, inp, 2.0), atol=1e-3)
    merged = quad_merge_ref(quad_scan_ref(x, decision, order="official"), decision, (8, 8), order="official")
    assert not torch.equal(merged, 2 * x)


def test_raster_ablation_same_parameters_predictor_unused():
    torch.manual_seed(0)
    quad = QuadSS2D(8, ops=REF)
    raster = QuadSS2D(8, ops=REF, quad_scan="raster")
    assert [(n, p.shape) for n, p in quad.named_parameters()] == [(n, p.shape) for n, p in raster.named_parameters()]
    raster(torch.randn(2, 5, 6, 8)).sum().backward()
    assert all(p.grad is None for p in raster.predictor.parameters())
    assert raster.in_proj.weight.grad is not None
    with pytest.raises(ValueError, match="quad_scan"):
        QuadSS2D(8, ops=REF, quad_scan="zigzag")
    # with identity scans the merge gives back 2x the input: the raster sequence and its reverse
    identity = QuadSS2D(8, ops=IDENTITY, quad_scan="raster").eval()
    x = torch.randn(2, 5, 6, 8)
    torch.testing.assert_close(identity(x), _through_without_scan(identity, x, 2.0), rtol=1e-5, atol=1e-5)


def test_scan_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    dtypes = []

    def spy(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, delta_proj=None):
        dtypes.extend(t.dtype for t in (u, delta, A, B, C, D, delta_bias, delta_proj))
        return REF.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, delta_proj=delta_proj)

    mixer = QuadSS2D(8, ops=dataclasses.replace(REF, selective_scan=spy))
    mixer.scan.fn = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(torch.randn(2, 8, 8, 8))
    assert y.dtype == torch.bfloat16
    assert dtypes and all(d == torch.float32 for d in dtypes), dtypes


def test_drop_path():
    x = torch.ones(1000, 3)
    dp = DropPath(0.25)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = (y[:, 0] != 0).float().mean().item()
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.75))), y.unique()
    assert 0.65 < kept < 0.85, kept


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_map_tokens_inference_chunks_match_whole(monkeypatch, amp, layout):
    torch.manual_seed(0)
    mlp = Mlp(6, 24).eval()
    x = torch.randn(2, 3, 4, 6)                                  # 24 tokens (B, H, W, C)
    if layout == "permuted":                                     # (B, C, H, W) memory
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    calls = []
    mlp.fc1.register_forward_hook(lambda mod, args, out: calls.append(args[0].numel() // 6))
    monkeypatch.setattr(common, "INFERENCE_CHUNK_TOKENS", 5)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        whole = map_tokens(mlp, x)                               # autograd recording: whole
        with torch.no_grad():
            parts = map_tokens(mlp, x)
            sums = map_tokens(lambda t: mlp(t).sum(-1), x)       # one value per token
    # contiguous: chunks of 5 flattened tokens; permuted: 5 // W = 1 row (4 tokens) per chunk;
    # autocast: whole
    chunks = [5, 5, 5, 5, 4] if layout == "contiguous" else [4] * 6
    assert calls == ([24] * 3 if amp else [24] + chunks + chunks), calls
    assert parts.shape == whole.shape == (2, 3, 4, 6)
    assert parts.dtype == whole.dtype == (amp or torch.float32)
    assert torch.allclose(parts, whole.detach(), atol=1e-6, rtol=0), (parts - whole).abs().max()
    assert sums.shape == (2, 3, 4)
    assert torch.allclose(sums, whole.detach().sum(-1), atol=1e-2 if amp else 1e-5)
    whole.sum().backward()                                       # the whole path still trains
    assert mlp.fc1.weight.grad is not None


def test_map_tokens_two_dims_and_small_inputs(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(6, 24).eval()
    monkeypatch.setattr(common, "INFERENCE_CHUNK_TOKENS", 5)
    with torch.no_grad():
        for x in (torch.randn(6, 23).t(), torch.randn(23, 6), torch.randn(1, 4, 6), torch.randn(0, 3, 6)):
            got = map_tokens(mlp, x)
            assert got.shape == x.shape, (got.shape, x.shape)
            assert torch.allclose(got, mlp(x), atol=1e-6, rtol=0), x.shape


@pytest.mark.parametrize("size", [(12, 8), (13, 9)])            # (13, 9): padded to (16, 12)
def test_block_inference_same_with_and_without_chunks(monkeypatch, size):
    torch.manual_seed(0)
    block = QuadVSSBlock(8, ops=REF, shift=(1, -1)).eval()
    x = torch.randn(2, *size, 8)
    with torch.no_grad():
        whole = block(x)
        monkeypatch.setattr(common, "INFERENCE_CHUNK_TOKENS", 7)
        parts = block(x)
    assert torch.allclose(parts, whole, atol=1e-6, rtol=0), (parts - whole).abs().max()


def test_get_ops_errors():
    with pytest.raises(ValueError, match="kernels"):
        get_ops("cuda")
