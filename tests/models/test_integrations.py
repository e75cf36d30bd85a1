"""The interfaces timm and OpenMMLab code expects of a model, checked without timm or
mmengine installed (their registries are stood in for where registration is tested)."""
import re
import sys
import types

import pytest
import torch

import quadmamba
from quadmamba.models import QuadMamba, create_model
from quadmamba.models import integrations
from quadmamba.models.integrations import QuadMambaBackbone, mmengine_backbone_class


def nano(**kw):
    kw.setdefault("kernels", "reference")
    return create_model("quadmamba_nano", **kw)


def test_feature_info_describes_the_maps():
    clf, dense = nano(), nano(features_only=True, out_indices=(1, -1))
    assert clf.feature_info.channels() == [16, 32, 64, 128]
    assert clf.feature_info.reduction() == [4, 8, 16, 32]
    assert clf.feature_info.module_name() == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert dense.config.out_indices == (1, 3)
    assert dense.feature_info.channels() == [32, 128] and dense.feature_info.reduction() == [8, 32]
    assert dense.feature_info.channels(1) == 128 and dense.feature_info.reduction([0]) == [8]
    assert dense.feature_info.get_dicts(keys=("num_chs",)) == [{"num_chs": 32}, {"num_chs": 128}]
    outs = dense(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == dense.feature_info.channels()
    assert [64 // o.shape[2] for o in outs] == dense.feature_info.reduction()
    assert all(isinstance(d, dict) and {"num_chs", "reduction", "module"} <= set(d) for d in clf.feature_info)


def test_out_indices_from_the_end_and_their_errors():
    assert nano(features_only=True, out_indices=(-4, -2)).config.out_indices == (0, 2)
    unsorted = nano(features_only=True, out_indices=(3, 1)).eval()   # maps come in stage order
    assert unsorted.config.out_indices == (1, 3)
    with torch.no_grad():
        assert [o.shape[1] for o in unsorted(torch.randn(1, 3, 32, 32))] == unsorted.feature_info.channels() == [32, 128]
    with pytest.raises(ValueError, match=r"out_indices must be distinct .*got \(0, -4\)"):
        nano(features_only=True, out_indices=(0, -4))
    with pytest.raises(ValueError, match="out_indices"):
        nano(features_only=True, out_indices=(-5,))


def test_classifier_accessors_and_head_dropout():
    model = nano(drop_rate=0.5, num_classes=6)
    assert model.get_classifier() is model.head.fc and model.get_classifier().out_features == 6
    assert model.head.drop.p == 0.5
    assert model.head_hidden_size == model.num_features == 128
    feats = torch.randn(4, 2, 2, 128)
    model.eval()
    ref = model.forward_head(feats, pre_logits=True)   # dropout off in eval
    torch.testing.assert_close(ref, model.head.pool(model.head.norm(feats)))
    model.train()
    dropped = model.forward_head(feats, pre_logits=True)
    kept = dropped != 0
    assert kept.any() and not kept.all()
    torch.testing.assert_close(dropped[kept], 2 * ref[kept])   # kept features scaled by 1 / (1 - p)
    model.reset_classifier(3, global_pool="avg")
    assert model.get_classifier().out_features == 3 and model.pretrained_cfg["num_classes"] == 3
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")
    with pytest.raises(ValueError, match="drop_rate"):
        nano(drop_rate=1.0)
    with pytest.raises(RuntimeError, match="no classifier head"):
        nano(features_only=True).get_classifier()
    # dropout has no parameters: the paper's state dict is unchanged
    assert nano(drop_rate=0.3).state_dict().keys() == nano().state_dict().keys()


def test_pretrained_cfg():
    model = nano(num_classes=10, in_chans=1)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (1, 224, 224) and cfg["num_classes"] == 10
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.449,) and cfg["std"] == (0.226,)   # one value per input channel
    assert nano().pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    names = dict(model.named_parameters())
    assert cfg["first_conv"] + ".weight" in names and cfg["classifier"] + ".weight" in names


def test_forward_intermediates_timm_signature():
    torch.manual_seed(0)
    model = nano().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps, final = model.forward_intermediates(x)
        neg, _ = model.forward_intermediates(x, indices=[-1, 1])
        assert [m.shape for m in neg] == [maps[1].shape, maps[3].shape]
        torch.testing.assert_close(neg[1], maps[3], rtol=0, atol=0)
        early, early_final = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        torch.testing.assert_close(early_final, maps[1].permute(0, 2, 3, 1), rtol=0, atol=0)
        torch.testing.assert_close(early[0], maps[0], rtol=0, atol=0)
        nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        assert [tuple(m.shape) for m in nhwc] == [(2, 4, 6, 64), (2, 2, 3, 128)]
        torch.testing.assert_close(nhwc[1], maps[3].permute(0, 2, 3, 1), rtol=0, atol=0)
    for bad in ([4], [-5], [1, -3], 0, 5):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    whole = nano().eval()
    with torch.no_grad():
        maps, _ = whole.forward_intermediates(x)
    # a classifier pruned to stages 0 and 1: the later stages, stage 1's downsample and the head go
    model = nano().eval()
    model.load_state_dict(whole.state_dict())
    assert model.prune_intermediate_layers([0, -3]) == [0, 1]
    assert len(model.stages) == 2 and isinstance(model.stages[1].downsample, torch.nn.Identity)
    assert model.head is None and model.num_classes == 0 and model.pretrained_cfg["num_classes"] == 0
    assert model.num_features == model.head_hidden_size == 32
    assert model.feature_info.channels() == [16, 32] and model.feature_info.reduction() == [4, 8]
    assert not any(k.startswith(("stages.2", "stages.3", "stages.1.downsample", "head"))
                   for k in model.state_dict())
    with torch.no_grad():
        got, final = model.forward_intermediates(x)
    assert len(got) == 2
    for a, b in zip(got, maps[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(final, got[1].permute(0, 2, 3, 1), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="prune_intermediate_layers"):
        model(x)
    # FLOPs and partition maps still work without the head (through forward_intermediates)
    assert 0 < quadmamba.count_flops(model, 64) < quadmamba.count_flops(whole, 64)
    got_maps, want_maps = model.partition_maps(x), whole.partition_maps(x)
    assert len(got_maps) == len(want_maps) > 0
    for a, b in zip(got_maps, want_maps):
        assert torch.equal(a.windows, b.windows) and torch.equal(a.decision, b.decision)
    # keeping the head needs the last stage; then only the out-norms could change (a classifier has none)
    with pytest.raises(ValueError, match="prune_head=False"):
        nano().prune_intermediate_layers([2], prune_head=False)
    keep = nano().eval()
    keep.load_state_dict(whole.state_dict())
    assert keep.prune_intermediate_layers(prune_head=False) == [3]
    assert keep.state_dict().keys() == whole.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(keep(x), whole(x), rtol=0, atol=0)
    for bad in ([4], 0, [1, 1]):
        with pytest.raises(ValueError, match="indices"):
            nano().prune_intermediate_layers(bad)
    # a backbone: forward returns the kept stages; the out-norms of removed stages go, and with
    # prune_norm all of them (the maps are then the stages' own outputs)
    dense = nano(features_only=True).eval()
    dense.load_state_dict({k: v for k, v in whole.state_dict().items() if not k.startswith("head.")}
                          | {k: v for k, v in dense.state_dict().items() if k.startswith("out_norms.")})
    with torch.no_grad():
        normed = dense(x)
    pruned = nano(features_only=True).eval()
    pruned.load_state_dict(dense.state_dict())
    assert pruned.prune_intermediate_layers((1, 2)) == [1, 2]
    assert sorted(pruned.out_norms) == ["0", "1", "2"] and pruned.config.out_indices == (1, 2)
    assert pruned.feature_info.channels() == [32, 64] and pruned.feature_info.reduction() == [8, 16]
    with torch.no_grad():
        got = pruned(x)
    assert len(got) == 2
    torch.testing.assert_close(got[0], normed[1], rtol=0, atol=0)
    torch.testing.assert_close(got[1], normed[2], rtol=0, atol=0)
    bare = nano(features_only=True).eval()
    bare.load_state_dict(dense.state_dict())
    assert bare.prune_intermediate_layers(2, prune_norm=True) == [2, 3]
    assert len(bare.out_norms) == 0 and bare.feature_info.channels() == [64, 128]
    with torch.no_grad():
        got = bare(x)
    torch.testing.assert_close(got[0], maps[2], rtol=0, atol=0)
    torch.testing.assert_close(got[1], maps[3], rtol=0, atol=0)


def test_group_matcher_orders_every_parameter_by_depth():
    model = nano()
    fine, coarse = model.group_matcher(), model.group_matcher(coarse=True)
    order = {}
    for name, _ in model.named_parameters():
        if name.startswith("head."):
            continue   # unmatched: timm puts them in the last group
        if re.match(fine["stem"], name):
            order[name] = (0,)
            continue
        hits = [(re.match(rx, name), suffix) for rx, suffix in fine["blocks"]]
        hits = [(m, s) for m, s in hits if m]
        assert len(hits) == 1, name
        match, suffix = hits[0]
        order[name] = (1, *map(int, match.groups()), *(suffix or ()))
        assert re.match(coarse["blocks"], name).group(1) == name.split(".")[1]
    # blocks in stage-major order, a stage's downsample after its blocks
    assert order["stages.0.blocks.1.norm1.weight"] < order["stages.0.downsample.norm.weight"] \
        < order["stages.1.blocks.0.norm1.weight"]


def test_timm_entry_takes_timm_arguments():
    entry = integrations._timm_entry("quadmamba_nano")
    model = entry(pretrained=False, pretrained_cfg=None, cache_dir=None, num_classes=5, drop_rate=0.1,
                  global_pool="avg", img_size=96, kernels="reference",
                  pretrained_cfg_overlay=dict(mean=(0.5, 0.5, 0.5)), dtype=torch.float64)
    assert model.num_classes == 5 and model.head.drop.p == 0.1
    assert model.pretrained_cfg["input_size"] == (3, 96, 96) and model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert next(model.parameters()).dtype == torch.float64
    assert entry(features_only=True, out_indices=2, kernels="reference").config.out_indices == (2, 3)
    assert entry(img_size=(64, 80), output_stride=32).pretrained_cfg["input_size"] == (3, 64, 80)
    with pytest.raises(ValueError, match=r"needs local weights .*pretrained_cfg_overlay=dict\(file="):
        entry(pretrained=True)
    with pytest.raises(ValueError, match="global_pool"):
        entry(global_pool="max")
    with pytest.raises(ValueError, match="output_stride"):
        entry(output_stride=16)
    with pytest.raises(ValueError, match="out_indices"):
        entry(features_only=True, out_indices=5)
    for bad in ("224", (224,), (0, 224), 224.0, True):
        with pytest.raises(ValueError, match="img_size"):
            entry(img_size=bad)
    with pytest.raises(TypeError, match="pretrained_cfg_overlay"):
        entry(pretrained_cfg_overlay=[("mean", 0.5)])
    with pytest.raises(TypeError, match=r"unsupported arguments \['pruned'\]"):
        entry(pruned=True)
    model = entry(pretrained_model_args=dict(kernels="reference"), kernels="reference", pretrained_cfg="in1k")
    assert model.pretrained_model_args == {"kernels": "reference"}
    with pytest.raises(TypeError, match="pretrained_model_args"):
        entry(pretrained_model_args=["kernels"])
    with pytest.raises(TypeError, match="pretrained_cfg must be"):
        entry(pretrained_cfg=3)


def test_timm_entry_feature_cls():
    """timm.create_model hands features_only, out_indices and feature_cls to the entry point
    (a plain registered function: timm wraps only models built by build_model_with_cfg), so the
    entry point builds what timm's FeatureGetterNet would give: the stages' outputs, no norms."""
    torch.manual_seed(0)
    entry = integrations._timm_entry("quadmamba_nano")
    whole = nano().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps, _ = whole.forward_intermediates(x)
    getter = entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                   features_only=True, feature_cls="getter", out_indices=(1, -2), kernels="reference").eval()
    assert len(getter.out_norms) == 0 and len(getter.stages) == 3 and getter.config.out_indices == (1, 2)
    assert getter.feature_info.channels() == [32, 64] and getter.feature_info.reduction() == [8, 16]
    assert not any(k.startswith("head.") for k in getter.state_dict())
    getter.load_state_dict({k: v for k, v in whole.state_dict().items() if k in getter.state_dict()})
    with torch.no_grad():
        got = getter(x)
    assert len(got) == 2
    torch.testing.assert_close(got[0], maps[1], rtol=0, atol=0)
    torch.testing.assert_close(got[1], maps[2], rtol=0, atol=0)
    # None: the model's own backbone (maps through its out-norms), as without feature_cls
    own = entry(features_only=True, feature_cls=None, out_indices=(1, 2), kernels="reference")
    assert sorted(own.out_norms) == ["1", "2"]
    assert len(entry(features_only=True, feature_cls="Getter", kernels="reference").out_norms) == 0
    for bad in ("list", "dict", "hook", "fx", object):
        with pytest.raises(ValueError, match=r"feature_cls must be None .* or 'getter'"):
            entry(features_only=True, feature_cls=bad)
    with pytest.raises(ValueError, match="feature_cls='getter' needs features_only=True"):
        entry(feature_cls="getter")


def test_load_official_into_trimmed_models_strictly():
    """A classifier's checkpoint in the authors' layout loads strictly into a backbone and into a
    pruned model: the parts they lack are reported unused, a backbone's out-norms initialised."""
    from quadmamba.models.convert import load_official, ours_to_official

    torch.manual_seed(0)
    whole = nano().eval()
    official = {"model": ours_to_official(whole.state_dict())}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps, _ = whole.forward_intermediates(x)

    torch.manual_seed(1)
    dense = nano(features_only=True, out_indices=(1, 2)).eval()
    report = load_official(dense, official)   # strict
    assert report.ok and not report.missing and not report.unexpected and report.entry == "model"
    assert sorted(report.initialised) == ["out_norms.1.bias", "out_norms.1.weight", "out_norms.2.bias",
                                          "out_norms.2.weight"]
    unused = set(report.unused)
    assert {k for k in unused if k.startswith("head.")} == {k for k in whole.state_dict() if k.startswith("head.")}
    assert {k for k in whole.state_dict() if k.startswith(("stages.3.", "stages.2.downsample."))} <= unused
    assert all(k.startswith(("head.", "stages.3.", "stages.2.downsample.")) for k in unused)
    text = str(report)
    assert "checkpoint keys not loaded: head.* (4 keys): no classifier head" in text
    assert "stages.3.* (18 keys): not built (the model has stages 0..2)" in text
    assert "model keys not loaded, kept as they are: out_norms.* (4 keys)" in text
    with torch.no_grad():
        raw = dense.forward_intermediates(x, indices=(1, 2), norm=False, intermediates_only=True)
        normed = dense(x)
    for i, (got, want) in enumerate(zip(raw, maps[1:3])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        fresh = torch.nn.functional.layer_norm(want.permute(0, 2, 3, 1), want.shape[1:2]).permute(0, 3, 1, 2)
        torch.testing.assert_close(normed[i], fresh, rtol=0, atol=0)   # out-norms at their init (1, 0)

    pruned = nano().eval()
    assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
    report = load_official(pruned, official)
    assert report.ok and not report.initialised
    assert {why.split(":")[0] for why in report.unused.values()} == {"head.*", "stages.1.downsample.*", "stages.2.*",
                                                                      "stages.3.*"}
    with torch.no_grad():
        got = pruned.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, maps[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # a pruned backbone takes a backbone's checkpoint (out-norms included; those of removed stages unused)
    backbone = nano(features_only=True).eval()
    with torch.no_grad():
        for norm in backbone.out_norms.values():
            norm.weight.uniform_(0.5, 1.5)
    kept = nano(features_only=True).eval()
    kept.prune_intermediate_layers((0, 1))
    report = load_official(kept, ours_to_official(backbone.state_dict()))
    assert report.ok and not report.initialised
    assert {k for k in report.unused if k.startswith("out_norms.")} == {f"out_norms.{i}.{p}" for i in (2, 3)
                                                                         for p in ("weight", "bias")}
    assert torch.equal(kept.out_norms["1"].weight, backbone.out_norms["1"].weight)

    # with num_classes=0 the head's Linear is unused, its norm loads
    headless = nano(num_classes=0)
    report = load_official(headless, official)
    assert sorted(report.unused) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(headless.head.norm.weight, whole.head.norm.weight)

    # adapt sees the state dict under this package's names before the comparison
    seen = []
    load_official(headless, official, adapt=lambda state: seen.append(sorted(state)) or state)
    assert seen == [sorted(whole.state_dict())]
    with pytest.raises(TypeError, match="adapt must be a function of the converted state dict"):
        load_official(headless, official, adapt="stem")


def test_load_official_into_trimmed_models_still_fails_on_real_mismatches():
    from quadmamba.models.convert import load_official, ours_to_official

    whole = nano()
    good = ours_to_official(whole.state_dict())
    for target in (lambda: nano(features_only=True, out_indices=(1, 2)), lambda: nano().eval()):
        model = target()
        if model.head is not None:
            model.prune_intermediate_layers([0, 1])
        bad = dict(good)
        bad["layers.1.blocks.0.op.Ds"] = torch.ones(3)      # a shape changed
        del bad["layers.0.blocks.1.norm.weight"]            # a key the model has, removed
        bad["classifier.extra"] = torch.ones(1)             # an unknown key (of a part the model lacks)
        with pytest.raises(ValueError) as err:
            load_official(model, bad)
        text = str(err.value)
        assert "missing in checkpoint (1): stages.0.blocks.1.norm1.weight (authors': layers.0.blocks.1.norm.weight)" \
            in text
        assert "stages.1.blocks.0.mixer.Ds (authors': layers.1.blocks.0.op.Ds) model (64,) vs checkpoint (3,)" in text
        assert "unexpected in checkpoint (1): classifier.extra" in text
    # a backbone's checkpoint that lacks one of the model's out-norms: missing, not initialised
    backbone = ours_to_official(nano(features_only=True, out_indices=(2, 3)).state_dict())
    with pytest.raises(ValueError, match=r"missing in checkpoint \(2\): out_norms.1.bias \(authors': outnorm1.bias\)"):
        load_official(nano(features_only=True, out_indices=(1, 3)), backbone)
    # a classifier of another num_classes: a shape mismatch unless reset_head
    with pytest.raises(ValueError, match=r"head.fc.weight \(authors': classifier.head.weight\) model \(7, 128\)"):
        load_official(nano(num_classes=7), good)
    seven = nano(num_classes=7)
    before = seven.head.fc.weight.clone()
    report = load_official(seven, good, reset_head=True)
    assert sorted(report.initialised) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(seven.head.fc.weight, before)
    assert "a new classifier Linear, 7 classes (the checkpoint's has 1000)" in str(report)
    assert torch.equal(seven.head.norm.weight, whole.head.norm.weight)


def test_unwrap_checkpoint_prefers_ema_weights():
    from quadmamba.models.convert import checkpoint_entry, unwrap_checkpoint

    model, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert unwrap_checkpoint({"format": "quadmamba", "model": model, "ema": ema}) == ema
    assert unwrap_checkpoint({"model": model, "ema": None}) == model   # a run without EMA
    assert unwrap_checkpoint({"state_dict": model, "state_dict_ema": ema}) == ema
    assert checkpoint_entry({"state_dict": model}) == "state_dict" and checkpoint_entry(model) is None
    assert unwrap_checkpoint(model) == model
    with pytest.raises(TypeError, match="checkpoint must be a mapping"):
        unwrap_checkpoint([("w", torch.zeros(1))])


def test_load_official_takes_state_dicts_of_wrapped_models():
    """model.state_dict() of a DDP / DataParallel ("module.") or compiled ("_orig_mod.") model
    loads as the model's own (in either layout); a prefix on only some keys is left alone."""
    from quadmamba.models.convert import load_official, ours_to_official, strip_wrapper_prefixes

    torch.manual_seed(0)
    source, target = create_model("quadmamba_nano"), create_model("quadmamba_nano")
    state = source.state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        for layout in (state, ours_to_official(state)):
            wrapped = {prefix + k: v for k, v in layout.items()}
            assert load_official(target, {"model": wrapped}).ok
            assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert strip_wrapper_prefixes(mixed) == mixed


def test_register_timm_once(monkeypatch):
    registered = []
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_models.register_model = registered.append
    timm.models = timm_models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", timm_models)
    monkeypatch.setattr(integrations, "_registered", {})
    assert integrations.register_timm() and integrations.register_timm()
    assert [fn.__name__ for fn in registered] == ["quadmamba_nano", "quadmamba_li", "quadmamba_t",
                                                  "quadmamba_s", "quadmamba_b"]


def test_backbone_freezes_stages_and_returns_a_tuple():
    torch.manual_seed(0)
    backbone = QuadMambaBackbone("quadmamba_nano", out_indices=(0, 1, 3), frozen_stages=2, kernels="reference")
    assert isinstance(backbone, QuadMamba)
    frozen = ("stem.", "stages.0.", "stages.1.", "out_norms.0.", "out_norms.1.")
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    backbone.train()
    assert not backbone.stem.training and not backbone.stages[1].training and backbone.stages[2].training
    x = torch.randn(2, 3, 64, 64)
    outs = backbone(x)
    assert isinstance(outs, tuple) and [o.shape[1] for o in outs] == [16, 32, 128]
    # frozen quad stages decide by arg-max (eval) even while the model trains
    backbone.eval()
    with torch.no_grad():
        ref = backbone(x)
    backbone.train()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[1], ref[1], rtol=0, atol=0)
    sum(o.sum() for o in backbone(x)).backward()
    assert all(p.grad is not None for p in backbone.stages[2].parameters())
    assert all(p.grad is None for p in backbone.stages[0].parameters())
    for bad in (-2, 5, 1.0, True):
        with pytest.raises(ValueError, match="frozen_stages"):
            QuadMambaBackbone("quadmamba_nano", frozen_stages=bad, kernels="reference")


class _BaseModule(torch.nn.Module):   # the part of mmengine's BaseModule the class relies on
    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg


def test_mmengine_backbone_pickles_as_its_own_class():
    import pickle

    cls = mmengine_backbone_class(_BaseModule)
    backbone = cls(arch="quadmamba_nano", out_indices=(1, 2), kernels="reference").eval()
    copy = pickle.loads(pickle.dumps(backbone))
    assert type(copy) is cls
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(copy(x), backbone(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mmengine_backbone_class_takes_init_cfg():
    class BaseModule(torch.nn.Module):   # the part of mmengine's BaseModule the class relies on
        def __init__(self, init_cfg=None):
            super().__init__()
            self.init_cfg = init_cfg

    cls = mmengine_backbone_class(BaseModule)
    assert cls.__mro__[1:3] == (QuadMambaBackbone, QuadMamba) and BaseModule in cls.__mro__
    init_cfg = dict(type="Pretrained", checkpoint="t.pth")
    backbone = cls(arch="quadmamba_nano", out_indices=(0, 3), init_cfg=init_cfg, kernels="reference")
    assert backbone.init_cfg == init_cfg and backbone.init_cfg is not init_cfg
    plain = QuadMambaBackbone("quadmamba_nano", out_indices=(0, 3), kernels="reference")
    assert backbone.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(TypeError, match="base_module"):
        mmengine_backbone_class(object)


def test_register_mmengine_registers_the_class(monkeypatch):
    registry = {}

    class Models:
        @staticmethod
        def register_module(name, module, force):
            registry[name] = module

    class BaseModule(torch.nn.Module):
        def __init__(self, init_cfg=None):
            super().__init__()

    for mod, attrs in (("mmengine", {}), ("mmengine.model", {"BaseModule": BaseModule}),
                       ("mmengine.registry", {"MODELS": Models})):
        module = types.ModuleType(mod)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, mod, module)
    assert integrations.register_mmengine()
    cls = registry["QuadMambaBackbone"]
    assert issubclass(cls, QuadMambaBackbone) and issubclass(cls, BaseModule)
    assert isinstance(cls(arch="quadmamba_nano", kernels="reference")(torch.randn(1, 3, 32, 32)), tuple)
