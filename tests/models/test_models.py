from dataclasses import asdict

import pytest
import torch

import quadmamba
from quadmamba.layers import QuadSS2D, get_ops, quadrant_logits
from quadmamba.models import QuadMamba, QuadMambaConfig, create_model, get_config, shift_schedule

# variant -> (classifier params, backbone params, GFLOPs@224), spec section 1
SPEC = {
    "quadmamba_li": (5_470_200, 5_085_872, 0.821),
    "quadmamba_t": (10_322_648, 9_810_544, 2.071),
    "quadmamba_s": (31_252_176, 30_484_520, 5.518),
    "quadmamba_b": (50_694_096, 49_926_440, 9.376),
}
KERNEL_CASES = ["fused", "reference"]


def nano(**kw):
    kw.setdefault("kernels", "reference")
    return create_model("quadmamba_nano", **kw)


def quad_mixers(model):
    return [blk.mixer for st in model.stages for blk in st.blocks if isinstance(blk.mixer, QuadSS2D)]


@pytest.mark.parametrize("name", list(SPEC))
def test_parameter_counts_match_spec(name):
    classifier, backbone, _ = SPEC[name]
    model = create_model(name, kernels="reference")
    assert quadmamba.count_params(model) == classifier
    dense = create_model(name, kernels="reference", features_only=True)
    assert quadmamba.count_params(dense) == backbone


@pytest.mark.parametrize("name", list(SPEC))
def test_gflops_match_spec(name):
    target = SPEC[name][2]
    gflops = quadmamba.count_flops(create_model(name, kernels="reference"), img_size=224)
    assert abs(gflops - target) / target < 0.02, (gflops, target)
    assert abs(gflops - target) < 6e-4, f"authors' convention reproduces the table: {gflops} vs {target}"


def test_flops_of_a_half_precision_model():
    model = nano()
    want = quadmamba.count_flops(model, 64)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert quadmamba.count_flops(nano().to(dtype), 64) == pytest.approx(want, rel=1e-12), dtype


def test_flops_scale_with_batch_and_do_not_touch_model():
    model = nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = quadmamba.count_flops(model, img_size=64)
    assert quadmamba.count_flops(model, img_size=64, batch_size=2) == pytest.approx(2 * one)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"
    # the copy leaves the model's own hooks behind (a hook would see meta tensors)

    def hook(module, args, output):
        raise AssertionError("a hook of the model ran during count_flops")
    handle = model.head.register_forward_hook(hook)
    assert quadmamba.count_flops(model, img_size=64) == one
    handle.remove()
    # backbone: no head (LN, pool, 128x1000 MACs; the bias add is not counted) but 4 out-norms
    dense = quadmamba.count_flops(nano(features_only=True), img_size=64)
    c, g = (16, 32, 64, 128), (16, 8, 4, 2)
    extra = sum(5 * ci * gi * gi for ci, gi in zip(c, g)) - 5 * 128 * 4 - 128 * 4 - 128 * 1000
    assert dense == pytest.approx(one + extra / 1e9, rel=1e-9), (dense, one, extra)


@pytest.mark.parametrize("size", [(97, 131), (32, 32), (64, 48), (13, 9)])
def test_nano_forward_backward_odd_sizes(size):
    torch.manual_seed(0)
    model = nano(num_classes=7).train()
    x = torch.randn(2, 3, *size)
    y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_eval_is_deterministic():
    torch.manual_seed(0)
    model = nano().eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        a = model(x)
        torch.manual_seed(123)
        b = model(x)
    assert torch.equal(a, b)


def test_train_mode_gives_gradients_to_every_predictor_parameter():
    torch.manual_seed(0)
    model = nano().train()
    # 64x64 -> quad grids 16x16 and 8x8 (with a 4x4 grid the fine windows are single tokens,
    # the fine and coarse orders coincide and the decision rightly gets no gradient)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    mixers = quad_mixers(model)
    assert len(mixers) == 4
    for i, mixer in enumerate(mixers):
        for name, p in mixer.predictor.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"mixer {i} predictor.{name}"


def test_features_only_shapes_and_out_indices():
    torch.manual_seed(0)
    dense = nano(features_only=True).eval()
    x = torch.randn(2, 3, 64, 96)
    outs = dense(x)
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    assert all(o.is_contiguous() for o in outs)
    partial = nano(features_only=True, out_indices=(1, 2)).eval()
    assert len(partial.stages) == 3 and isinstance(partial.stages[2].downsample, torch.nn.Identity)
    partial.load_state_dict({k: v for k, v in dense.state_dict().items() if k in partial.state_dict()})
    got = partial(x)
    assert [tuple(o.shape) for o in got] == [(2, 32, 8, 12), (2, 64, 4, 6)]
    torch.testing.assert_close(got[0], outs[1])
    # the final features (forward_features, and forward_intermediates' second result) are the last
    # built stage's output without its out-norm, whichever stages are asked for; num_features their width
    with torch.no_grad():
        last = partial.forward_features(x)
        assert partial.num_features == last.shape[-1] == 64
        for indices in (None, [1], [2], 1):
            torch.testing.assert_close(partial.forward_intermediates(x, indices)[1], last, rtol=0, atol=0)
    # the classifier's intermediates are the same stage outputs without the out-norms
    clf = nano().eval()
    maps, final = clf.forward_intermediates(x)
    assert [m.shape[1] for m in maps] == [16, 32, 64, 128] and final.shape == (2, 2, 3, 128)
    torch.testing.assert_close(clf.forward_head(final), clf(x))


def test_partition_maps_content():
    torch.manual_seed(0)
    model = nano().eval()
    x = torch.randn(2, 3, 64, 64)  # quad grids 16x16 and 8x8: no padding
    maps = model.partition_maps(x)
    assert [(m.stage, m.block) for m in maps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m.stride for m in maps] == [4, 4, 8, 8]
    assert [m.shift for m in maps] == [(0, 0), (2, 2), (0, 0), (-1, -1)]
    for m in maps:
        h = 64 // m.stride
        assert m.decision.shape == (2, 4) and m.score.shape == (2, h, h) and m.windows.shape == (2, h, h)
        assert torch.equal(m.decision.sum(1), torch.ones(2)) and set(m.decision.unique().tolist()) <= {0.0, 1.0}
        assert m.windows.dtype == torch.int64
        # the decision is the arg-max over quadrants of the score in the rolled frame
        rolled = torch.roll(m.score, m.shift, (1, 2))
        assert torch.equal(m.decision.argmax(1), quadrant_logits(rolled).argmax(1))
        # window ids, recomputed token by token in the image frame
        sy, sx = m.shift
        for b in range(2):
            sel = int(m.decision[b].argmax())
            for y in range(h):
                for x_ in range(h):
                    ry, rx = (y + sy) % h, (x_ + sx) % h
                    q = 2 * (ry >= h // 2) + (rx >= h // 2)
                    want = q if q != sel else 4 + 2 * ((ry % (h // 2)) >= h // 4) + ((rx % (h // 2)) >= h // 4)
                    assert m.windows[b, y, x_] == want, (m.stage, m.block, b, y, x_)


def test_partition_maps_crop_at_odd_size_and_train_mode():
    torch.manual_seed(0)
    model = nano().train()
    maps = model.partition_maps(torch.randn(1, 3, 50, 37))  # grids 13x10 (padded 16x12), 7x5 (8x8)
    assert [tuple(m.score.shape) for m in maps] == [(1, 13, 10)] * 2 + [(1, 7, 5)] * 2
    assert [m.shift for m in maps] == [(0, 0), (2, 1), (0, 0), (-1, -1)]
    assert model.training
    with pytest.raises(RuntimeError, match="raster"):
        nano(quad_scan="raster").partition_maps(torch.randn(1, 3, 32, 32))


def test_shift_schedule_matches_spec_at_224():
    def realised(name):
        model = create_model(name, kernels="reference")
        out = {}
        for i, stage in enumerate(model.stages[:2]):
            grid = 56 // 2 ** i
            for j, blk in enumerate(stage.blocks):
                if blk.mixer.shift is not None:
                    out[(i, j)] = blk.mixer.shift_amount(grid, grid)
        return out

    assert realised("quadmamba_li") == {(0, 1): (7, 7), (1, 1): (-3, -3)}
    assert realised("quadmamba_t") == {(0, 1): (7, 7), (1, 1): (-3, -3), (1, 3): (3, -3), (1, 5): (-3, 3)}
    sched = shift_schedule((2, 2, 15, 2), (0, 1))
    assert sched[0] == [None, (1, 1)] and sched[1] == [None, (-1, -1)] and all(s is None for s in sched[2])


def test_converter_round_trip_and_report():
    from quadmamba.models.convert import load_official, official_to_ours, ours_to_official

    torch.manual_seed(0)
    model = nano().eval()
    official = ours_to_official(model.state_dict())
    assert "layers.0.blocks.1.op.score_predictor.out_conv.4.weight" in official
    assert "layers.2.blocks.0.op.x_proj_weight" in official and "classifier.head.weight" in official
    assert official["layers.0.blocks.0.op.dt_projs_bias"].shape == (2, 16)
    assert official["layers.2.blocks.0.op.dt_projs_bias"].shape == (4, 64)
    assert official["layers.2.blocks.0.op.A_logs"].shape == (256, 1)
    assert official["patch_embed.5.weight"].shape == (16, 8, 3, 3)
    assert official["layers.1.downsample.1.weight"].shape == (64, 32, 3, 3)
    torch.manual_seed(1)
    fresh = nano().eval()
    report = load_official(fresh, {"model": official})
    assert report.ok, str(report)
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert set(official_to_ours(official)) == set(model.state_dict())

    bad = dict(official)
    del bad["classifier.head.bias"]
    bad["layers.0.blocks.0.op.Ds"] = torch.ones(3)
    bad["layers.9.extra"] = torch.ones(1)
    with pytest.raises(ValueError) as err:
        load_official(nano(), bad)
    text = str(err.value)
    assert "layers.9.extra" in text
    assert "head.fc.bias (authors': classifier.head.bias)" in text                  # both layouts named
    assert "stages.0.blocks.0.mixer.Ds (authors': layers.0.blocks.0.op.Ds) model (32,)" in text
    report = load_official(nano(), bad, strict=False)
    assert report.missing == ["head.fc.bias"] and report.unexpected == ["layers.9.extra"]
    assert report.mismatched == [("stages.0.blocks.0.mixer.Ds", (32,), (3,))]

    dense = nano(features_only=True)
    names = ours_to_official(dense.state_dict())
    assert {f"outnorm{i}.weight" for i in range(4)} <= set(names)


def test_official_compat_differences():
    torch.manual_seed(0)
    paper = nano().eval()
    official = nano(compat="official").eval()
    official.load_state_dict(paper.state_dict())
    assert quadmamba.count_params(official) == quadmamba.count_params(paper)
    assert [m.order for m in quad_mixers(official)] == ["official"] * 4
    x = torch.randn(1, 3, 64, 128)
    # stochastic in eval: Gumbel noise changes decisions between calls
    decisions = {tuple(torch.cat([m.decision for m in official.partition_maps(x)]).argmax(1).tolist())
                 for _ in range(8)}
    assert len(decisions) > 1
    assert len({tuple(torch.cat([m.decision for m in paper.partition_maps(x)]).argmax(1).tolist())
                for _ in range(3)}) == 1
    # shift amount floor(H/8) on both axes (grid 16x32 in stage 0, 8x16 in stage 1)
    assert [m.shift for m in official.partition_maps(x)] == [(0, 0), (2, 2), (0, 0), (-1, -1)]
    assert [m.shift for m in paper.partition_maps(x)] == [(0, 0), (2, 4), (0, 0), (-1, -2)]
    # odd sizes are padded and cropped in official mode too
    assert official(torch.randn(1, 3, 50, 37)).shape == (1, 1000)


def test_raster_ablation_same_parameter_count():
    assert quadmamba.count_params(nano(quad_scan="raster")) == quadmamba.count_params(nano())
    raster = create_model("quadmamba_t", kernels="reference", quad_scan="raster")
    assert quadmamba.count_params(raster) == SPEC["quadmamba_t"][0]
    assert nano(quad_scan="raster")(torch.randn(1, 3, 30, 34)).shape == (1, 1000)


def test_bf16_autocast_keeps_scan_in_float32():
    torch.manual_seed(0)
    model = nano().eval()
    seen = []
    ref = get_ops("reference").selective_scan

    def spy(*args, **kwargs):
        seen.extend(a.dtype for a in args if torch.is_tensor(a))
        return ref(*args, **kwargs)

    for module in model.modules():
        if type(module).__name__ == "SelectiveScan":
            module.fn = spy
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert torch.isfinite(y).all() and seen and set(seen) == {torch.float32}, set(seen)
    with torch.no_grad():
        y32 = model(x)
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max() + 0.05


def test_float64_model_scans_in_float64():
    """A float64 model on the CPU keeps float64 through the scan: fused and reference models agree
    to float64 rounding, and a quad mixer passes gradcheck end to end."""
    torch.manual_seed(0)
    fused = nano(kernels="fused").double().eval()
    reference = nano().double().eval()
    reference.load_state_dict(fused.state_dict())
    seen = []
    for module in fused.modules():
        if type(module).__name__ == "SelectiveScan":
            module.register_forward_pre_hook(lambda mod, args: seen.extend(a.dtype for a in args))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-10, atol=1e-12)
    assert seen and set(seen) == {torch.float64}, set(seen)
    mixer = QuadSS2D(8, ops=get_ops("fused"), shift=(1, -1)).double().eval()
    y = torch.randn(1, 8, 12, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixer, (y,), fast_mode=True)


def test_torch_compile_matches_eager():
    """The fused model compiled once with a dynamic batch: other batch sizes run without
    recompiling."""
    torch.manual_seed(0)
    model = nano(kernels="fused").eval()
    compiled = torch.compile(model)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 3):
            x = torch.randn(batch, 3, 16, 16)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_torch_export_matches_eager(export_targets):
    """torch.export of the eval model: every fused op is one node of the flat graph (the
    scans are not wrapped in autocast regions when autocast is off); same outputs, also for
    another batch size."""
    torch.manual_seed(0)
    model = nano(kernels="fused").eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = set(export_targets(program))
    assert {t for t in targets if t.startswith("quadmamba.")} == {
        "quadmamba.selective_scan.default", "quadmamba.quad_scan.default", "quadmamba.quad_merge.default",
        "quadmamba.cross_scan.default", "quadmamba.cross_merge.default"}
    assert "wrap_with_autocast" not in targets
    for batch in (2, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_errors():
    model = nano(num_classes=5, drop_path_rate=0.1, gumbel_tau=0.5)
    rebuilt = QuadMamba(QuadMambaConfig(**asdict(model.config)))
    assert asdict(rebuilt.config) == asdict(model.config)
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert quadmamba.list_models() == ["quadmamba_nano", "quadmamba_li", "quadmamba_t", "quadmamba_s", "quadmamba_b"]
    with pytest.raises(ValueError, match="quadmamba_t"):
        create_model("quadmamba_x")
    for kwargs, word in [({"compat": "authors"}, "compat"), ({"kernels": "cuda"}, "kernels"),
                         ({"quad_scan": "hilbert"}, "quad_scan"), ({"out_indices": (4,)}, "out_indices"),
                         ({"gumbel_tau": 0}, "gumbel_tau"), ({"drop_path_rate": 1.5}, "drop_path_rate")]:
        with pytest.raises(ValueError, match=word):
            nano(**kwargs)
    with pytest.raises(ValueError, match="unknown config fields"):
        get_config("quadmamba_nano", depth=3)
    for kwargs, exc, words in [({"num_classes": 2.5}, TypeError, "num_classes must be an int, got 2.5"),
                               ({"num_classes": True}, TypeError, "num_classes must be an int"),
                               ({"num_classes": "10"}, TypeError, "num_classes must be an int"),
                               ({"drop_path_rate": "0.1"}, TypeError, "drop_path_rate must be a number"),
                               ({"out_indices": 2}, TypeError, "out_indices must be a sequence of ints"),
                               ({"out_indices": (0.5,)}, TypeError, "out_indices must be a sequence of ints"),
                               ({"in_chans": 3.0}, TypeError, "in_chans must be an int"),
                               ({"features_only": 1}, TypeError, "features_only must be a bool")]:
        with pytest.raises(exc, match=words):
            nano(**kwargs)
    for kwargs, words in [({"dt_rank": 0}, "dt_rank must be >= 1"), ({"d_state": 32}, "d_state must be at most 16"),
                          ({"d_state": 0}, "d_state"), ({"dims": (16, 32, 64)}, "dims and depths")]:
        with pytest.raises(ValueError, match=words):
            QuadMambaConfig(**kwargs)
    assert QuadMambaConfig(d_state=32, kernels="reference").d_state == 32   # the reference ops take any N
    import numpy as np
    assert nano(num_classes=np.int64(7)).num_classes == 7                     # numpy ints are ints
    with pytest.raises(TypeError, match="config must be a QuadMambaConfig"):
        QuadMamba({"dims": (16, 32, 64, 128)})


def test_bad_images_name_the_argument():
    model = nano().eval()
    for x, err, words in [(torch.randn(3, 32, 32), ValueError, r"\(B, 3, H, W\).*\(3, 32, 32\)"),
                          (torch.randn(1, 4, 32, 32), ValueError, r"\(B, 3, H, W\).*\(1, 4, 32, 32\)"),
                          (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point.*uint8"),
                          (torch.randn(0, 3, 32, 32), ValueError, "B, H, W >= 1"),
                          ([[0.0]], ValueError, "got list")]:
        for entry in (model, model.forward_features, model.forward_intermediates, model.partition_maps):
            with pytest.raises(err, match=f"^x must .*{words}"):
                entry(x)
    # another dtype than the weights (outside autocast), or another device: said before a conv fails
    with pytest.raises(TypeError, match=r"^x is torch.bfloat16 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="^x is on meta but the model on cpu"):
        model(torch.randn(1, 3, 32, 32, device="meta"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 1000)


def test_drop_path_rises_linearly_over_all_blocks_and_norms_use_default_eps():
    model = create_model("quadmamba_t", drop_path_rate=0.3)
    rates = [block.drop_path.drop_prob for stage in model.stages for block in stage.blocks]
    want = torch.linspace(0, 0.3, sum(model.config.depths)).tolist()
    assert rates == pytest.approx(want, abs=1e-12)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)


def test_training_helpers():
    torch.manual_seed(0)
    model = nano()
    nwd = model.no_weight_decay()
    assert len(nwd) == 2 * sum(model.config.depths)
    assert all(n.endswith((".A_log", ".Ds")) for n in nwd)
    model.reset_classifier(10)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10) and model.config.num_classes == 10
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    # a refused value changes nothing; models built from one config do not share it
    with pytest.raises(TypeError, match="num_classes must be an int"):
        model.reset_classifier(2.5)
    assert model.num_classes == model.config.num_classes == 0
    cfg = get_config("quadmamba_nano", num_classes=10)
    first, second = QuadMamba(cfg), QuadMamba(cfg)
    second.reset_classifier(3)
    assert first.config.num_classes == cfg.num_classes == 10 and first(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert QuadMamba(first.config).state_dict().keys() == first.state_dict().keys()
    # gradient checkpointing gives the same gradients
    model = nano(drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    no_grad = {n for n, _ in model.named_parameters()} - set(plain)
    assert no_grad and all(".predictor." in n for n in no_grad), "eval: only the arg-max predictor gets no gradient"
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(plain)
    for n, g in plain.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kernels", KERNEL_CASES)
@pytest.mark.parametrize("name", list(SPEC))
def test_big_variants_forward(name, kernels):
    """224x224 with the fused kernels; 64x64 with the (slow) reference kernels."""
    torch.manual_seed(0)
    model = create_model(name, kernels=kernels).eval()
    size = 224 if kernels == "fused" else 64
    with torch.no_grad():
        y = model(torch.randn(1, 3, size, size))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    dense = create_model(name, kernels=kernels, features_only=True).eval()
    with torch.no_grad():
        outs = dense(torch.randn(1, 3, size, size))
    c = model.config.dims
    assert [tuple(o.shape) for o in outs] == [(1, c[i], size // 4 // 2 ** i, size // 4 // 2 ** i) for i in range(4)]


def test_optional_integrations_are_lazy_and_safe():
    import subprocess
    import sys

    code = "import sys, quadmamba; print('timm' in sys.modules, 'mmengine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
    from quadmamba.models import integrations

    if integrations.register_timm():
        import timm

        assert timm.create_model("quadmamba_nano", kernels="reference", num_classes=3).num_classes == 3
    else:
        assert "timm" in integrations.unavailable_reason
    if integrations.register_mmengine():
        from mmengine.registry import MODELS

        assert isinstance(MODELS.build(dict(type="QuadMambaBackbone", arch="quadmamba_nano", kernels="reference")),
                          QuadMamba)
    else:
        assert "mmengine" in integrations.unavailable_reason
    dense = integrations.QuadMambaBackbone("quadmamba_nano", out_indices=(0, 3), kernels="reference")
    assert [o.shape[1] for o in dense(torch.randn(1, 3, 32, 32))] == [16, 128]


def test_official_shift_wraps_on_tall_grids():
    """compat="official" rolls both axes by floor(H/8): on a grid 8x taller than wide that is W
    or more, which torch.roll (the reference) wraps; the fused model wraps it the same way."""
    torch.manual_seed(0)
    ref = nano(compat="official", features_only=True).eval()
    fused = nano(compat="official", features_only=True, kernels="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 512, 64)   # stage 0 grid 128 x 16: amount 16 = W
    with torch.no_grad():
        torch.manual_seed(1)          # official mode draws Gumbel noise in eval: the same draws
        expected = ref(x)
        torch.manual_seed(1)
        got = fused(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_fused_model_matches_reference_model(compat, device):
    """The fused kernels (on every device) against the plain-PyTorch model on CPU."""
    torch.manual_seed(0)
    ref = nano(compat=compat, kernels="reference")
    fused = nano(compat=compat, kernels="fused")
    fused.load_state_dict(ref.state_dict())
    fused.to(device)
    x = torch.randn(2, 3, 50, 37)

    def grads_of(model, inputs, seed):
        model.zero_grad()
        torch.manual_seed(seed)  # same Gumbel draws (CPU generator for CPU models)
        model(inputs).square().mean().backward()
        return {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    modes = ["train", "eval"] if device.type == "cpu" else ["eval"]  # CUDA draws other Gumbel noise
    if compat == "official" and device.type != "cpu":
        modes = []  # official mode samples Gumbel noise in eval too: only CPU draws can be matched
    for mode in modes:
        ref.train(mode == "train"), fused.train(mode == "train")
        expected = grads_of(ref, x, 7)
        got = grads_of(fused, x.to(device), 7)
        assert expected.keys() == got.keys(), mode
        for n, g in got.items():
            torch.testing.assert_close(g, expected[n], rtol=1e-3, atol=1e-5, msg=f"{mode} {n}")
    if compat == "paper":
        ref.eval(), fused.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x.to(device)).cpu(), ref(x), rtol=1e-4, atol=1e-5)
    assert quadmamba.count_flops(fused.cpu(), 224) == quadmamba.count_flops(ref, 224)


def test_conv_weights_channels_last_and_layout_free_of_results():
    torch.manual_seed(0)
    model = nano().eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # A plain contiguous state dict loads into the channels-last weights and keeps their layout.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    other = nano().eval()
    other.load_state_dict(state)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in other.modules() if isinstance(m, torch.nn.Conv2d))
    # The same weights stored contiguously give the same outputs.
    plain = nano().eval()
    plain.load_state_dict(state)
    for c in (m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)):
        c.weight.data = c.weight.data.contiguous()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(other(x), plain(x), rtol=1e-5, atol=1e-5)
