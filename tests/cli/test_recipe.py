"""The ImageNet recipe in `quadmamba train`: --aug imagenet, --mixup / --cutmix, --recipe paper."""
import pytest
import torch
import torch.nn as nn

from cli_testing import TINY, make_folder, run_main
from quadmamba import cli
from quadmamba.augment import EvalTransform, MixupCutmix
from quadmamba.data import DataSpec, datasets_for_spec, load_image, normalize, open_image
from quadmamba.train import TrainConfig, evaluate_checkpoint, load_checkpoint, train_one_epoch


def test_imagenet_aug_trains_and_evaluates_on_centre_crops(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n=4, size=40)
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "--data", data, "--img-size", 32, "--epochs", 2, "--batch-size", 4,
                              "--kernels", "reference", "--aug", "imagenet", "--mixup", 0.8, "--cutmix", 1.0,
                              "--output", out)
    assert code == 0, err
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["data"]["eval_crop"] == 0.875
    assert (state["train"]["aug"], state["train"]["mixup"], state["train"]["cutmix"]) == ("imagenet", 0.8, 1.0)
    spec = DataSpec.from_dict(state["data"])
    train, held_out = datasets_for_spec(spec)
    # held-out images: the shorter side to 36 (= 32 / 0.875), the central 32 x 32; not the whole image squashed
    path, label = held_out.samples[0]
    image, got_label = held_out[0]
    want = EvalTransform(32, 3, spec.mean, spec.std, 0.875)(open_image(path, 3))
    assert torch.equal(image, want) and int(got_label) == label
    squashed = normalize(load_image(path, 32, 3)[None], spec.mean, spec.std)[0]
    assert not torch.allclose(image, squashed, atol=1e-3)
    # eval scores those crops, and gives the logged result
    r = evaluate_checkpoint(str(out / "checkpoint.pt"), kernels="reference")
    assert r["top1"] == pytest.approx(state["metrics"][-1]["test_acc"], abs=1e-12)


def test_imagenet_training_images_are_augmented_per_image(tmp_path):
    from quadmamba.data import folder_datasets

    train, _, spec = folder_datasets(str(make_folder(tmp_path / "data", n=2, size=40)), img_size=32, aug="imagenet")
    torch.manual_seed(0)
    a, label = train[0]
    b, _ = train[0]
    torch.manual_seed(0)
    again, _ = train[0]
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b) and torch.equal(a, again)   # fresh draws per load, from torch's RNG
    assert spec.eval_crop == 0.875


def test_old_data_specs_resize_the_whole_image():
    spec = DataSpec.from_dict(dict(source="digits", img_size=32, in_chans=1, mean=(0.0,), std=(1.0,),
                                   classes=["0", "1"], seed=0, val_fraction=0.2))
    assert spec.eval_crop == 0.0


def _linear_epoch(mixing, label_smoothing):
    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=5)
    stats = train_one_epoch(model, loader, optimizer, scheduler, TrainConfig(label_smoothing=label_smoothing),
                            torch.device("cpu"), None, "test", transform=lambda x: x, mixing=mixing)
    return model.state_dict(), stats


def test_soft_targets_without_a_mix_train_as_label_smoothing():
    """MixupCutmix that never mixes gives smoothed one-hot targets: the soft-target loss then
    trains exactly as cross-entropy with label smoothing; a mix that always applies does not."""
    plain, plain_stats = _linear_epoch(None, 0.1)
    soft, soft_stats = _linear_epoch(MixupCutmix(3, prob=0.0, label_smoothing=0.1), 0.1)
    for name, value in plain.items():
        torch.testing.assert_close(soft[name], value, rtol=1e-6, atol=1e-7)
    assert soft_stats["train_loss"] == pytest.approx(plain_stats["train_loss"], rel=1e-6)
    mixed, _ = _linear_epoch(MixupCutmix(3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1), 0.1)
    assert not torch.allclose(mixed["1.weight"], plain["1.weight"])


def test_paper_recipe_defaults_and_overrides():
    parser = cli.build_parser()
    cfg = cli._train_config(parser.parse_args(["train", "--recipe", "paper", "--data", "digits",
                                               "--aug", "basic", "--batch-size", "256"]))
    assert (cfg.epochs, cfg.warmup_epochs, cfg.weight_decay, cfg.mixup, cfg.cutmix) == (300, 20.0, 0.05, 0.8, 1.0)
    assert (cfg.label_smoothing, cfg.ema_decay, cfg.clip_grad) == (0.1, 0.9999, 5.0)
    assert cfg.lr == pytest.approx(1e-3 * 256 / 1024) and cfg.aug == "basic"   # explicit options win
    cfg = cli._train_config(parser.parse_args(["train", "--recipe", "paper", "--epochs", "3", "--lr", "0.01"]))
    assert (cfg.epochs, cfg.lr, cfg.aug) == (3, 0.01, "imagenet")


@pytest.mark.parametrize("args,message", [
    (["--aug", "imagenet"], "--aug imagenet crops photos; the digits (8x8 pixels) train with --aug basic"),
    (["--mixup", "-1"], "--mixup is the alpha of a Beta distribution, >= 0 (0: off), got -1.0"),
    (["--cutmix", "inf"], "--cutmix is the alpha of a Beta distribution"),
])
def test_bad_recipe_options_fail_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", *TINY, *args, "--output", out)
    assert code == 1 and message in err, err
    assert not out.exists()


def test_resume_refuses_a_recipe(tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--resume", "--recipe", "paper", "--output", tmp_path / "run")
    assert code == 1 and "drop --recipe" in err, err


def test_image_to_tensor_takes_grey_and_rgb_images_only():
    from PIL import Image

    from quadmamba.data import image_to_tensor

    grey = Image.new("L", (3, 2), 51)
    assert torch.equal(image_to_tensor(grey), torch.full((1, 2, 3), 0.2))
    rgb = image_to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert rgb.shape == (3, 2, 3) and torch.equal(rgb[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    with pytest.raises(ValueError, match="img must be a PIL image of mode 'L' or 'RGB', got Image of mode 'RGBA'"):
        image_to_tensor(Image.new("RGBA", (3, 2)))
    with pytest.raises(ValueError, match="img must be a PIL image of mode 'L' or 'RGB', got str"):
        image_to_tensor("photo.png")
