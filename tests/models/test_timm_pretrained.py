"""pretrained=True through the timm entry points, called with the arguments timm.create_model
passes (pretrained, pretrained_cfg, pretrained_cfg_overlay, cache_dir, the user's kwargs);
no timm needed."""
import dataclasses
import logging
import sys
import types
from typing import Optional

import pytest
import torch

from quadmamba.models import create_model
from quadmamba.models import integrations
from quadmamba.models.convert import ours_to_official

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def nano(**kw):
    kw.setdefault("kernels", "reference")
    return create_model("quadmamba_nano", **kw)


def timm_create(pretrained=True, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
    """What timm.create_model("quadmamba_nano", ...) hands the registered entry point."""
    entry = integrations._timm_entry("quadmamba_nano")
    return entry(pretrained=pretrained, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
                 cache_dir=None, kernels="reference", **kwargs).eval()


@dataclasses.dataclass
class PretrainedCfg:   # the fields of timm's PretrainedCfg that matter here
    url: Optional[str] = None
    file: Optional[str] = None
    hf_hub_id: Optional[str] = None
    num_classes: int = 1000
    mean: tuple = (0.485, 0.456, 0.406)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nano().eval()
    with torch.no_grad():   # weights no fresh model has, so that loading shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        maps, _ = model.forward_intermediates(X)
        logits = model(X)
    return model, maps, logits


def test_pretrained_file_in_both_layouts_and_checkpoint_containers(trained, tmp_path):
    model, _, logits = trained
    ours = model.state_dict()
    other = {k: v + 1 for k, v in ours.items()}
    files = {
        "ours.pth": ours,
        "authors.pth": {"model": ours_to_official(ours), "epoch": 300},
        "timm.pth.tar": {"state_dict": ours, "arch": "quadmamba_nano"},
        # a quadmamba train checkpoint: its EMA weights when the run kept an EMA, else "model"
        "run_ema.pt": {"format": "quadmamba-checkpoint", "model": other, "ema": ours,
                       "config": {"name": "quadmamba_nano"}},
        "run.pt": {"format": "quadmamba-checkpoint", "model": ours, "ema": None},
    }
    for fname, content in files.items():
        torch.save(content, tmp_path / fname)
        loaded = timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / fname)))
        with torch.no_grad():
            torch.testing.assert_close(loaded(X), logits, rtol=0, atol=0, msg=fname)
        assert loaded.pretrained_cfg["file"] == str(tmp_path / fname)
    # the file given by pretrained_cfg (a dict, or timm's dataclass), the overlay on top of it
    loaded = timm_create(pretrained_cfg=dict(file=str(tmp_path / "ours.pth")))
    assert torch.equal(loaded.stem.conv1.weight, model.stem.conv1.weight)
    torch.save(other, tmp_path / "other.pth")
    loaded = timm_create(pretrained_cfg=PretrainedCfg(file=str(tmp_path / "other.pth"), hf_hub_id="org/x"),
                         pretrained_cfg_overlay=dict(file=tmp_path / "ours.pth"))
    assert torch.equal(loaded.stem.conv1.weight, model.stem.conv1.weight)
    # timm's in-memory state_dict source (kept out of the model's pretrained_cfg)
    loaded = timm_create(pretrained_cfg_overlay=dict(state_dict={"model": ours_to_official(ours)}))
    assert torch.equal(loaded.head.fc.weight, model.head.fc.weight) and "state_dict" not in loaded.pretrained_cfg
    # pretrained=False ignores the file
    fresh = timm_create(pretrained=False, pretrained_cfg_overlay=dict(file=str(tmp_path / "ours.pth")))
    assert not torch.equal(fresh.stem.conv1.weight, model.stem.conv1.weight)


def test_pretrained_with_another_head_or_none(trained, tmp_path, caplog):
    model, maps, _ = trained
    path = str(tmp_path / "w.pth")
    torch.save({"model": ours_to_official(model.state_dict())}, path)
    torch.manual_seed(5)
    init = nano(num_classes=10).head.fc.weight
    torch.manual_seed(5)
    with caplog.at_level(logging.INFO, logger=integrations.__name__):
        ten = timm_create(num_classes=10, pretrained_cfg_overlay=dict(file=path))
    assert ten.num_classes == 10 and torch.equal(ten.head.fc.weight, init)   # a new Linear, as initialised
    assert torch.equal(ten.head.norm.weight, model.head.norm.weight)
    assert "a new classifier Linear, 10 classes (the checkpoint's has 1000)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with torch.no_grad():
        got, _ = ten.forward_intermediates(X)
    for a, b in zip(got, maps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the default num_classes (1000) against a 10-class checkpoint: loads the rest, and warns
    torch.save(ten.state_dict(), tmp_path / "ten.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=integrations.__name__):
        default = timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "ten.pth")))
    assert default.num_classes == 1000
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "Pass the checkpoint's num_classes" in warned[0] and "has 10" in warned[0]
    # num_classes=0: the Linear's weights are unused, the norm loads
    headless = timm_create(num_classes=0, pretrained_cfg_overlay=dict(file=path))
    assert torch.equal(headless.head.norm.bias, model.head.norm.bias)
    with torch.no_grad():
        torch.testing.assert_close(headless(X), model.forward_head(model.forward_features(X), pre_logits=True),
                                   rtol=0, atol=0)


def test_pretrained_backbones(trained, tmp_path):
    model, maps, _ = trained
    path = str(tmp_path / "w.pth")
    torch.save(model.state_dict(), path)
    dense = timm_create(features_only=True, out_indices=(1, 2), pretrained_cfg_overlay=dict(file=path))
    with torch.no_grad():
        raw = dense.forward_intermediates(X, indices=(1, 2), norm=False, intermediates_only=True)
    for a, b in zip(raw, maps[1:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in dense.out_norms.values())   # fresh
    getter = timm_create(features_only=True, feature_cls="getter", out_indices=2,
                         pretrained_cfg_overlay=dict(file=path))
    with torch.no_grad():
        got = getter(X)
    assert len(got) == 2
    for a, b in zip(got, maps[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # device / dtype apply after loading
    double = timm_create(features_only=True, feature_cls="getter", dtype=torch.float64,
                         pretrained_cfg_overlay=dict(file=path))
    assert torch.equal(double.stages[0].blocks[0].norm1.weight, model.stages[0].blocks[0].norm1.weight.double())


def test_pretrained_without_a_local_file_says_how(tmp_path):
    for cfg, overlay in ((None, None), ("in1k", {}), (PretrainedCfg(), None), ({}, {"mean": (0.5,) * 3})):
        with pytest.raises(ValueError, match=r"needs local weights .*pretrained_cfg_overlay=dict\(file='/path/"):
            timm_create(pretrained_cfg=cfg, pretrained_cfg_overlay=overlay)
    for cfg in (PretrainedCfg(hf_hub_id="org/quadmamba"), dict(url="https://example.org/w.pth")):
        with pytest.raises(ValueError, match=r"a local file only; .*(hf_hub_id|url).*pretrained_cfg_overlay=dict"):
            timm_create(pretrained_cfg=cfg)
    with pytest.raises(FileNotFoundError, match="pretrained_cfg file .*nothing.pth' does not exist"):
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "nothing.pth")))
    with pytest.raises(FileNotFoundError, match=r"is a folder without any of \['model.safetensors'"):
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path)))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint torch.load reads with weights_only=True"):
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "junk.pth")))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "list.pth")))
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        timm_create(pretrained_cfg_overlay=dict(state_dict=[1]))


def test_pretrained_mismatches_name_the_keys(trained, tmp_path):
    model, _, _ = trained
    state = model.state_dict()
    bad = dict(state, **{"stages.0.blocks.0.mixer.Ds": torch.ones(3)})
    del bad["stages.1.blocks.0.norm2.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "bad.pth")))
    text = str(err.value)
    assert text.startswith(f"quadmamba_nano: the pretrained weights ({tmp_path / 'bad.pth'}) do not fit the model")
    assert "missing in checkpoint (1): stages.1.blocks.0.norm2.bias" in text
    assert "stages.0.blocks.0.mixer.Ds (authors': layers.0.blocks.0.op.Ds) model (32,) vs checkpoint (3,)" in text
    # a checkpoint's RGB stem does not load into a stem of another width than 3 / in_chans
    wide = dict(state, **{"stem.conv1.weight": torch.ones(8, 5, 3, 3)})
    torch.save(wide, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"stem.conv1.weight .*model \(8, 3, 3, 3\) vs checkpoint \(8, 5, 3, 3\)"):
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    # a variant's checkpoint does not load into another
    torch.save(create_model("quadmamba_li", kernels="reference").state_dict(), tmp_path / "li.pth")
    with pytest.raises(ValueError, match="do not fit the model"):
        timm_create(pretrained_cfg_overlay=dict(file=str(tmp_path / "li.pth")))


def test_pretrained_rgb_stem_adapted_to_other_in_chans(trained, tmp_path, caplog):
    """As timm: in_chans=1 sums the RGB weights (a grey image gives what its RGB copy gave, both
    key layouts), in_chans=6 repeats them at half weight (a 6-channel copy does too), in_chans=4
    repeats R and scales by 3/4."""
    model, _, _ = trained
    rgb = model.stem.conv1.weight.detach()
    grey = X[:, :1]
    with torch.no_grad():
        want = model(grey.expand(-1, 3, -1, -1))
    for layout in (model.state_dict(), ours_to_official(model.state_dict())):
        torch.save(layout, tmp_path / "rgb.pth")
        one = timm_create(in_chans=1, pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.pth")))
        assert torch.equal(one.stem.conv1.weight, rgb.sum(1, keepdim=True))
        with torch.no_grad():
            torch.testing.assert_close(one(grey), want, rtol=1e-5, atol=1e-5)
    six = timm_create(in_chans=6, pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.pth")))
    assert torch.equal(six.stem.conv1.weight, torch.cat([rgb, rgb], 1) * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(six(grey.expand(-1, 6, -1, -1)), want, rtol=1e-5, atol=1e-5)
    four = timm_create(in_chans=4, pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.pth")))
    assert torch.equal(four.stem.conv1.weight, torch.cat([rgb, rgb[:, :1]], 1) * 0.75)
    assert torch.equal(four.stem.conv1.bias, model.stem.conv1.bias)
    # a checkpoint keeping its weights under an entry: adapted too, and the report names the entry
    torch.save({"model": ours_to_official(model.state_dict()), "epoch": 3}, tmp_path / "wrapped.pth")
    with caplog.at_level(logging.INFO, logger=integrations.__name__):
        wrapped = timm_create(in_chans=1, pretrained_cfg_overlay=dict(file=str(tmp_path / "wrapped.pth")))
    assert torch.equal(wrapped.stem.conv1.weight, rgb.sum(1, keepdim=True))
    assert "stem.conv1.weight adapted from the checkpoint's 3 image channels to in_chans=1" in caplog.text
    assert "weights from the checkpoint's 'model' entry" in caplog.text


def test_pretrained_safetensors_and_local_dir(trained, tmp_path, monkeypatch):
    model, _, logits = trained
    saved = {}

    def load_file(path, device="cpu"):   # stands in for safetensors.torch.load_file
        assert device == "cpu"
        return saved[str(path)]

    path = str(tmp_path / "model.safetensors")
    saved[path] = model.state_dict()
    open(path, "wb").close()
    monkeypatch.setitem(sys.modules, "safetensors", None)   # not importable
    with pytest.raises(ImportError, match=r"\.safetensors file, which needs the safetensors package"):
        timm_create(pretrained_cfg_overlay=dict(file=path))
    package, torch_module = types.ModuleType("safetensors"), types.ModuleType("safetensors.torch")
    torch_module.load_file = load_file
    package.torch = torch_module
    monkeypatch.setitem(sys.modules, "safetensors", package)
    monkeypatch.setitem(sys.modules, "safetensors.torch", torch_module)
    loaded = timm_create(pretrained_cfg_overlay=dict(file=path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), logits, rtol=0, atol=0)
    # timm's "local-dir:" source: file is the folder (model.safetensors before pytorch_model.bin);
    # timm passes the folder's model_args as kwargs and as pretrained_model_args
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    loaded = timm_create(pretrained_cfg=dict(file=str(tmp_path), source="local-dir", architecture="quadmamba_nano"),
                         pretrained_model_args=dict(kernels="reference"))
    assert torch.equal(loaded.stem.conv1.weight, model.stem.conv1.weight)
    assert loaded.pretrained_model_args == {"kernels": "reference"}
    (tmp_path / "model.safetensors").unlink()
    loaded = timm_create(pretrained_cfg=dict(file=str(tmp_path), source="local-dir"))
    assert torch.equal(loaded.stem.conv1.weight, model.stem.conv1.weight + 1)
