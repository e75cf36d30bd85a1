"""Tests of quadmamba.augment: the DeiT-recipe augmentations (crops, RandAugment, random
erasing, mixup/CutMix, soft-target loss) checked against their definitions."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from quadmamba.augment import (
    RAND_INCREASING_OPS, EvalTransform, MixupCutmix, RandAugment, TrainTransform, random_erasing,
    random_resized_crop, random_resized_crop_box, resize_center_crop, sample_beta, sample_gamma,
    soft_target_cross_entropy,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noise_image(h=40, w=50, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def pixels(img):
    return np.asarray(img).astype(np.int64)


def centroid(array):
    """(row, col) of the brightness centroid of a 2-D array."""
    array = array.astype(np.float64)
    rows, cols = np.indices(array.shape)
    total = array.sum()
    return (rows * array).sum() / total, (cols * array).sum() / total


def bounding_box(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def assert_one_rectangle(mask):
    """mask (H, W) bool is non-empty and exactly one filled axis-aligned rectangle; returns its box."""
    assert mask.any()
    y0, y1, x0, x1 = bounding_box(mask)
    assert mask[y0:y1, x0:x1].all() and mask.sum() == (y1 - y0) * (x1 - x0)
    return y0, y1, x0, x1


# ---------------------------------------------------------------------------------------------
# random_resized_crop
# ---------------------------------------------------------------------------------------------
def test_random_resized_crop_output_size_and_mode():
    for mode in ("RGB", "L"):
        out = random_resized_crop(noise_image(60, 90, mode), 32, generator=gen(0))
        assert out.size == (32, 32) and out.mode == mode


def test_random_resized_crop_full_scale_square_is_a_plain_resize():
    img = noise_image(64, 64)
    out = random_resized_crop(img, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen(3))
    assert np.array_equal(pixels(out), pixels(img.resize((40, 40), Image.Resampling.BICUBIC)))


def test_random_resized_crop_boxes_fit_and_mean_area_matches_the_sampling_law():
    width = height = 100
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    # the law without randomness: a fine grid over (area fraction, log aspect), the same rounding
    s, u = np.meshgrid(np.linspace(0.08, 1.0, 1500), np.linspace(lo, hi, 1500))
    w = np.round(np.sqrt(s * 1e4 * np.exp(u)))
    h = np.round(np.sqrt(s * 1e4 / np.exp(u)))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    p_fit = fits.mean()
    area_given_fit = (w * h / 1e4)[fits].mean()
    p_fallback = (1 - p_fit) ** 10
    expected = (1 - p_fallback) * area_given_fit + p_fallback * 1.0

    g = gen(0)
    areas = []
    for _ in range(2000):
        left, top, cw, ch = random_resized_crop_box(width, height, generator=g)
        assert 0 <= left and left + cw <= width and 0 <= top and top + ch <= height and cw >= 1 and ch >= 1
        areas.append(cw * ch / (width * height))
        if (cw, ch) != (width, height):  # not the fallback: aspect within the range up to rounding
            assert 3 / 4 - 0.02 <= cw / ch <= 4 / 3 + 0.02
    areas = np.array(areas)
    assert areas.min() >= 0.075 and areas.max() <= 1.0
    assert abs(areas.mean() - expected) < 0.025, (areas.mean(), expected)
    # positions are spread: left edges of small crops are not all at one place
    lefts = [random_resized_crop_box(width, height, scale=(0.1, 0.1), generator=g)[0] for _ in range(200)]
    assert min(lefts) < 15 and max(lefts) > 50


def test_random_resized_crop_fallback_is_the_clamped_central_crop():
    impossible = (2.0, 3.0)
    assert random_resized_crop_box(100, 50, scale=impossible, generator=gen(0)) == (16, 0, 67, 50)
    assert random_resized_crop_box(50, 100, scale=impossible, generator=gen(0)) == (0, 16, 50, 67)
    assert random_resized_crop_box(80, 70, scale=impossible, generator=gen(0)) == (0, 0, 80, 70)
    img = noise_image(50, 100)
    out = random_resized_crop(img, 20, scale=impossible, generator=gen(1))
    expected = img.crop((16, 0, 83, 50)).resize((20, 20), Image.Resampling.BICUBIC)
    assert np.array_equal(pixels(out), pixels(expected))


def test_random_resized_crop_is_reproducible_with_a_seeded_generator():
    img = noise_image(70, 90)
    a = random_resized_crop(img, 24, generator=gen(7))
    b = random_resized_crop(img, 24, generator=gen(7))
    assert np.array_equal(pixels(a), pixels(b))
    others = [pixels(random_resized_crop(img, 24, generator=gen(s))) for s in range(8, 12)]
    assert not all(np.array_equal(pixels(a), o) for o in others)
    torch.manual_seed(5)
    c = random_resized_crop(img, 24)
    torch.manual_seed(5)
    assert np.array_equal(pixels(c), pixels(random_resized_crop(img, 24)))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(size=0), "size"),
    (dict(size=8, scale=(0.5, 0.1)), "scale"),
    (dict(size=8, scale=0.5), "scale"),
    (dict(size=8, ratio=(0.0, 1.0)), "ratio"),
    (dict(size=8, generator=1), "generator"),
])
def test_random_resized_crop_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        random_resized_crop(noise_image(20, 20), **kwargs)
    with pytest.raises(ValueError, match="img"):
        random_resized_crop(np.zeros((4, 4)), 8)


# ---------------------------------------------------------------------------------------------
# resize_center_crop
# ---------------------------------------------------------------------------------------------
def test_resize_center_crop_portrait_matches_hand_computed_crop():
    img = noise_image(480, 320)  # 320 wide, 480 high: shorter side 320 -> 256, 480 -> 384
    out = resize_center_crop(img, 224)
    assert out.size == (224, 224)
    expected = img.resize((256, 384), Image.Resampling.BICUBIC).crop((16, 80, 240, 304))
    assert np.array_equal(pixels(out), pixels(expected))


def test_resize_center_crop_of_gradients_lands_at_the_known_positions():
    # value = x (then value = y) on a 320 x 480 float image; the resize scale is 320 / 256 = 1.25,
    # output pixel j of the crop is resized pixel j + 16 (x) / i + 80 (y), whose centre maps to
    # source coordinate 1.25 (j + 16) + 0.125.
    xs = Image.fromarray(np.tile(np.arange(320, dtype=np.float32), (480, 1)), mode="F")
    ys = Image.fromarray(np.tile(np.arange(480, dtype=np.float32)[:, None], (1, 320)), mode="F")
    out_x, out_y = np.asarray(resize_center_crop(xs, 224)), np.asarray(resize_center_crop(ys, 224))
    j = np.arange(224)
    assert np.allclose(out_x, (1.25 * (j + 16) + 0.125)[None, :], atol=0.02)
    assert np.allclose(out_y, (1.25 * (j + 80) + 0.125)[:, None], atol=0.02)
    # landscape: the same crop transposed
    out_t = np.asarray(resize_center_crop(Image.fromarray(np.ascontiguousarray(np.asarray(ys).T), mode="F"), 224))
    assert np.allclose(out_t, (1.25 * (j + 80) + 0.125)[None, :], atol=0.02)


def test_resize_center_crop_sizes_and_identity():
    img = noise_image(224, 224)
    assert np.array_equal(pixels(resize_center_crop(img, 224, crop_pct=1.0)), pixels(img))
    assert resize_center_crop(noise_image(100, 37), 32).size == (32, 32)
    with pytest.raises(ValueError, match="crop_pct"):
        resize_center_crop(img, 224, crop_pct=0.0)
    with pytest.raises(ValueError, match="size"):
        resize_center_crop(img, -1)


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------
IDENTITY_AT_ZERO = ("Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                    "TranslateYRel")


def test_randaugment_op_set_and_parameter_table():
    ra = RandAugment()
    assert len(RAND_INCREASING_OPS) == 15 and set(IDENTITY_AT_ZERO) < set(RAND_INCREASING_OPS)
    table = {
        ("Rotate", 10): 30.0, ("Rotate", 5): 15.0,
        ("PosterizeIncreasing", 0): 4, ("PosterizeIncreasing", 2.5): 3, ("PosterizeIncreasing", 9): 1,
        ("PosterizeIncreasing", 10): 0,
        ("SolarizeIncreasing", 0): 256, ("SolarizeIncreasing", 5): 128, ("SolarizeIncreasing", 10): 0,
        ("SolarizeAdd", 0): 0, ("SolarizeAdd", 10): 110, ("SolarizeAdd", 9): 99,
        ("ColorIncreasing", 10): 0.9, ("SharpnessIncreasing", 5): 0.45,
        ("ShearX", 10): 0.3, ("ShearY", 5): 0.15, ("TranslateXRel", 10): 0.45, ("TranslateYRel", 0): 0.0,
        ("Invert", 7): None, ("AutoContrast", 7): None, ("Equalize", 7): None,
    }
    for (name, m), value in table.items():
        got = ra.op_parameter(name, m)
        assert (got is None and value is None) or got == pytest.approx(value), (name, m, got)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_magnitude_zero_ops_are_identities(mode):
    img = noise_image(33, 47, mode)
    ra = RandAugment(magnitude=0, magnitude_std=0)
    assert ra.sample_magnitude(gen(0)) == 0.0
    for name in IDENTITY_AT_ZERO:
        for seed in range(3):  # both signs
            out = ra.apply_op(img, name, ra.sample_magnitude(gen(seed)), gen(seed))
            assert out.mode == mode and np.array_equal(pixels(out), pixels(img)), name


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_pixel_ops_follow_their_definitions(mode):
    img = noise_image(30, 40, mode, seed=1)
    x = pixels(img)
    ra = RandAugment()
    assert np.array_equal(pixels(ra.apply_op(img, "Invert", 3)), 255 - x)
    assert np.array_equal(pixels(ra.apply_op(img, "SolarizeIncreasing", 5)), np.where(x >= 128, 255 - x, x))
    assert np.array_equal(pixels(ra.apply_op(img, "SolarizeIncreasing", 10)), 255 - x)
    assert np.array_equal(pixels(ra.apply_op(img, "SolarizeAdd", 10)), np.where(x < 128, np.minimum(x + 110, 255), x))
    assert np.array_equal(pixels(ra.apply_op(img, "PosterizeIncreasing", 0)), x & 0xF0)
    assert np.array_equal(pixels(ra.apply_op(img, "PosterizeIncreasing", 5)), x & 0xC0)
    assert np.array_equal(pixels(ra.apply_op(img, "PosterizeIncreasing", 10)), np.zeros_like(x))
    # autocontrast stretches each channel of a low-contrast image to the full range
    low = Image.fromarray((x // 4 + 60).astype(np.uint8), mode=mode)
    stretched = pixels(ra.apply_op(low, "AutoContrast", 0)).reshape(-1, 1 if mode == "L" else 3)
    assert (stretched.min(axis=0) == 0).all() and (stretched.max(axis=0) == 255).all()
    # equalize keeps the order of grey levels and spreads a narrow histogram
    eq = pixels(ra.apply_op(low, "Equalize", 0)).ravel()
    order = np.argsort(pixels(low).ravel(), kind="stable") if mode == "L" else None
    if order is not None:
        assert (np.diff(eq[order]) >= 0).all()
    assert eq.max() - eq.min() > 200


def test_randaugment_enhance_ops_follow_their_definitions():
    ra = RandAugment()
    img = noise_image(30, 40, seed=2)
    x = pixels(img)
    for seed in range(4):
        out = pixels(ra.apply_op(img, "BrightnessIncreasing", 10, gen(seed)))
        candidates = [np.clip(x * k, 0, 255) for k in (1.9, 0.1)]
        assert any(np.abs(out - c).max() <= 1 for c in candidates)
        out = pixels(ra.apply_op(img, "ContrastIncreasing", 5, gen(seed)))
        grey = (x[..., 0] * 299 + x[..., 1] * 587 + x[..., 2] * 114) // 1000
        mu = int(grey.mean() + 0.5)
        candidates = [np.clip(mu + k * (x - mu), 0, 255) for k in (1.45, 0.55)]
        assert any(np.abs(out - c).max() <= 1 for c in candidates)
    grey_rgb = Image.fromarray(np.repeat(pixels(noise_image(20, 20, "L")).astype(np.uint8)[..., None], 3, axis=2))
    flat = Image.new("RGB", (20, 20), (90, 140, 30))
    for seed in range(4):  # saturation change of a grey image and sharpening of a flat one change nothing
        assert np.abs(pixels(ra.apply_op(grey_rgb, "ColorIncreasing", 10, gen(seed))) - pixels(grey_rgb)).max() <= 1
        assert np.array_equal(pixels(ra.apply_op(flat, "SharpnessIncreasing", 10, gen(seed))), pixels(flat))


def test_randaugment_translate_moves_a_marker_by_the_documented_amount():
    ra = RandAugment(fill=0)
    for mode in ("L", "RGB"):
        base = np.zeros((100, 100), np.uint8)
        base[30, 50] = 200
        img = Image.fromarray(base).convert(mode)
        seen_x, seen_y = set(), set()
        for seed in range(8):
            out = pixels(ra.apply_op(img, "TranslateXRel", 10, gen(seed)))
            grey = out if mode == "L" else out[..., 0]
            (where,) = [tuple(p) for p in np.argwhere(grey > 0)]
            assert where in {(30, 5), (30, 95)} and grey[where] == 200 and (grey > 0).sum() == 1
            seen_x.add(where)
            out = pixels(ra.apply_op(img, "TranslateYRel", 5, gen(seed)))  # 22.5 px: a sub-pixel shift
            grey = out if mode == "L" else out[..., 0]
            row, col = centroid(grey)
            assert abs(col - 50) < 1e-6 and min(abs(row - 7.5), abs(row - 52.5)) < 0.2
            seen_y.add(round(row))
        assert len(seen_x) == 2 and len(seen_y) == 2  # both signs occur


def test_randaugment_rotate_and_shear_move_a_marker_as_documented():
    ra = RandAugment(fill=0)
    base = np.zeros((101, 101), np.uint8)
    base[49:52, 79:82] = 255  # centred at (row 50, col 80): 30 px right of the centre
    img = Image.fromarray(base)
    c30, s30 = 30 * math.cos(math.radians(30)), 30 * math.sin(math.radians(30))
    for seed in range(4):
        row, col = centroid(pixels(ra.apply_op(img, "Rotate", 10, gen(seed))))
        # +30 deg is counter-clockwise on screen (up, since rows grow downwards), -30 deg down
        assert abs(col - (50 + c30)) < 0.3 and min(abs(row - (50 - s30)), abs(row - (50 + s30))) < 0.3
    shear = np.zeros((100, 100), np.uint8)
    shear[39:42, 49:52] = 255  # centred at (row 40, col 50)
    img = Image.fromarray(shear)
    for seed in range(4):
        # output x samples input x + s y (pixel centres at +0.5): the marker lands at 50 - s * 40.5
        row, col = centroid(pixels(ra.apply_op(img, "ShearX", 10, gen(seed))))
        assert abs(row - 40) < 0.3 and min(abs(col - (50 - 0.3 * 40.5)), abs(col - (50 + 0.3 * 40.5))) < 0.3
        row, col = centroid(pixels(ra.apply_op(Image.fromarray(shear.T.copy()), "ShearY", 10, gen(seed))))
        assert abs(col - 40) < 0.3 and min(abs(row - (50 - 0.3 * 40.5)), abs(row - (50 + 0.3 * 40.5))) < 0.3


def test_randaugment_fill_for_rgb_and_grey():
    ra = RandAugment()
    rgb = ra.apply_op(Image.new("RGB", (40, 40)), "Rotate", 10, gen(0))
    assert rgb.getpixel((0, 0)) == (124, 116, 104)
    grey = ra.apply_op(Image.new("L", (40, 40)), "TranslateXRel", 10, gen(0))
    assert grey.mode == "L" and 115 in pixels(grey)  # round(mean(124, 116, 104)) = 115
    assert set(np.unique(pixels(grey))) == {0, 115}


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_call_is_reproducible_and_varies_with_seed(mode):
    img = noise_image(48, 48, mode, seed=3)
    ra = RandAugment()
    a = ra(img, gen(11))
    assert a.mode == mode and a.size == img.size
    assert np.array_equal(pixels(a), pixels(ra(img, gen(11))))
    outs = [pixels(ra(img, gen(s))) for s in range(12)]
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) >= 6
    assert any(np.array_equal(o, pixels(img)) for o in outs) or len(distinct) == 12
    assert np.array_equal(pixels(RandAugment(num_ops=0)(img, gen(0))), pixels(img))


def test_randaugment_applies_each_chosen_op_with_probability_one_half():
    # a low-contrast colour image that every op at magnitude 9 changes
    img = Image.fromarray((pixels(noise_image(24, 24, seed=4)) // 3 + 40).astype(np.uint8))
    ra = RandAugment(num_ops=1, magnitude=9, magnitude_std=0)
    for name in RAND_INCREASING_OPS:
        assert not np.array_equal(pixels(ra.apply_op(img, name, 9, gen(0))), pixels(img)), name
    g = gen(6)
    unchanged = sum(np.array_equal(pixels(ra(img, g)), pixels(img)) for _ in range(400))
    assert 0.5 * 400 - 35 < unchanged < 0.5 * 400 + 35
    invert = Image.fromarray((255 - pixels(img)).astype(np.uint8))
    inverted = sum(np.array_equal(pixels(ra(img, g)), pixels(invert)) for _ in range(600))
    assert 5 <= inverted <= 40  # 600 * 0.5 / 15 = 20 expected: ops are chosen uniformly


def test_randaugment_magnitude_noise_is_clipped_normal():
    ra = RandAugment(magnitude=9, magnitude_std=0.5)
    g = gen(0)
    ms = np.array([ra.sample_magnitude(g) for _ in range(3000)])
    assert ms.min() >= 0 and ms.max() == 10.0  # clipped at max_magnitude
    assert abs(ms.mean() - 9) < 0.05 and 0.42 < ms.std() < 0.52


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(num_ops=-1), "num_ops"),
    (dict(magnitude=11), "magnitude"),
    (dict(magnitude=-1), "magnitude"),
    (dict(magnitude_std=-0.5), "magnitude_std"),
    (dict(max_magnitude=0), "max_magnitude"),
    (dict(fill=(1, 2)), "fill"),
    (dict(fill=(1, 2, 300)), "fill"),
])
def test_randaugment_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        RandAugment(**kwargs)


def test_randaugment_bad_call_arguments():
    ra = RandAugment()
    with pytest.raises(ValueError, match="img"):
        ra(Image.new("P", (8, 8)))
    with pytest.raises(ValueError, match="name"):
        ra.apply_op(Image.new("RGB", (8, 8)), "Cutout", 3)
    with pytest.raises(ValueError, match="magnitude"):
        ra.apply_op(Image.new("RGB", (8, 8)), "Rotate", 12)


# ---------------------------------------------------------------------------------------------
# random_erasing
# ---------------------------------------------------------------------------------------------
def test_random_erasing_prob_zero_is_identity_and_input_untouched():
    x = torch.randn(3, 16, 16, generator=gen(0))
    keep = x.clone()
    out = random_erasing(x, prob=0.0, generator=gen(1))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr() and torch.equal(x, keep)


def test_random_erasing_prob_one_erases_one_rectangle_within_scale():
    height, width = 32, 40
    x = torch.randn(3, height, width, generator=gen(0), dtype=torch.float64)
    keep = x.clone()
    fractions = []
    for seed in range(40):
        out = random_erasing(x, prob=1.0, generator=gen(seed))
        assert out.dtype == torch.float64 and out.shape == x.shape
        changed = (out != x).numpy()
        mask = changed.any(axis=0)
        y0, y1, x0, x1 = assert_one_rectangle(mask)
        assert changed[:, y0:y1, x0:x1].all()  # every channel erased
        h, w = y1 - y0, x1 - x0
        tol = (h + w + 1) / (2 * height * width) + 0.25 / (height * width)
        frac = h * w / (height * width)
        assert 0.02 - tol <= frac <= 1 / 3 + tol, (h, w)
        fractions.append(frac)
    assert torch.equal(x, keep)
    assert np.std(fractions) > 0.03  # not a fixed size


def test_random_erasing_values_are_standard_normal_and_rate_matches_prob():
    x = torch.zeros(3, 64, 64)
    out = random_erasing(x, prob=1.0, scale=(0.3, 0.3), ratio=(1.0, 1.0), generator=gen(2))
    values = out[out != 0]
    assert values.numel() > 3000
    assert abs(float(values.mean())) < 0.06 and abs(float(values.std()) - 1) < 0.06
    per_channel = out.reshape(3, -1)[:, (out != 0).any(0).reshape(-1)]
    corr = np.corrcoef(per_channel.numpy())  # channels drawn independently
    assert np.abs(corr[~np.eye(3, dtype=bool)]).max() < 0.1
    g = gen(3)
    erased = sum(bool((random_erasing(x, prob=0.25, generator=g) != 0).any()) for _ in range(800))
    assert 0.25 * 800 - 45 < erased < 0.25 * 800 + 45


def test_random_erasing_bad_arguments():
    with pytest.raises(ValueError, match="image"):
        random_erasing(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="image"):
        random_erasing(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prob"):
        random_erasing(torch.zeros(3, 16, 16), prob=1.5)
    with pytest.raises(ValueError, match="scale"):
        random_erasing(torch.zeros(3, 16, 16), scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        random_erasing(torch.zeros(3, 16, 16), ratio=(-1, 2))


# ---------------------------------------------------------------------------------------------
# Beta / Gamma sampler
# ---------------------------------------------------------------------------------------------
def test_sample_beta_moments_and_reproducibility():
    a = 0.8
    draws = sample_beta(a, a, 20000, generator=gen(0))
    assert draws.dtype == torch.float64 and draws.shape == (20000,)
    assert float(draws.min()) >= 0 and float(draws.max()) <= 1
    assert abs(float(draws.mean()) - 0.5) < 0.01
    assert abs(float(draws.var()) - 1 / (4 * (2 * a + 1))) < 0.004
    assert torch.equal(draws, sample_beta(a, a, 20000, generator=gen(0)))
    assert not torch.equal(draws, sample_beta(a, a, 20000, generator=gen(1)))
    skew = sample_beta(2.0, 0.5, 20000, generator=gen(2))
    assert abs(float(skew.mean()) - 0.8) < 0.01
    assert abs(float(skew.var()) - 2.0 * 0.5 / (2.5 ** 2 * 3.5)) < 0.004
    tiny = sample_beta(0.02, 0.02, 1000, generator=gen(3))
    assert torch.isfinite(tiny).all() and float(((tiny < 0.01) | (tiny > 0.99)).float().mean()) > 0.9


def test_sample_gamma_moments():
    for alpha in (0.5, 1.0, 3.0):
        draws = sample_gamma(alpha, 20000, generator=gen(4))
        assert abs(float(draws.mean()) - alpha) < 0.04 * max(1.0, alpha)
        assert abs(float(draws.var()) - alpha) < 0.1 * max(1.0, alpha)
    with pytest.raises(ValueError, match="alpha"):
        sample_gamma(0.0)
    with pytest.raises(ValueError, match="size"):
        sample_beta(1.0, 1.0, 0)


# ---------------------------------------------------------------------------------------------
# MixupCutmix
# ---------------------------------------------------------------------------------------------
def batch(b=6, c=3, h=16, w=20, dtype=torch.float32):
    x = torch.randn(b, c, h, w, generator=gen(100), dtype=dtype)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])[:b]  # partners (i, b-1-i) have different labels (b = 5, 6)
    return x, labels


def lam_from_targets(targets, labels, mix, num_classes):
    """lam from row 0: targets[0, labels[0]] = lam on + (1 - lam) off."""
    off = mix.label_smoothing / num_classes
    on = 1 - mix.label_smoothing + off
    return (float(targets[0, labels[0]]) - off) / (on - off)


def test_mixup_cutmix_targets_are_distributions():
    x, labels = batch()
    mix = MixupCutmix(num_classes=5)
    for seed in range(10):
        _, targets = mix(x, labels, gen(seed))
        assert targets.dtype == torch.float32 and targets.shape == (6, 5)
        assert (targets >= 0).all() and torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)


def test_mixup_only_is_a_convex_blend_with_the_flipped_batch():
    x, labels = batch()
    keep = x.clone()
    for smoothing in (0.0, 0.1):
        mix = MixupCutmix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=smoothing)
        lams = []
        for seed in range(10):
            out, targets = mix(x, labels, gen(seed))
            lam = lam_from_targets(targets, labels, mix, 5)
            assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
            lams.append(lam)
        assert len({round(v, 6) for v in lams}) == 10 and 0 <= min(lams) and max(lams) <= 1
    assert torch.equal(x, keep)


def test_cutmix_only_pastes_one_rectangle_with_the_corrected_lambda():
    x, labels = batch()
    keep = x.clone()
    mix = MixupCutmix(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    pasted_any = False
    for seed in range(25):
        out, targets = mix(x, labels, gen(seed))
        from_self, from_partner = (out == x).all(1), (out == x.flip(0)).all(1)
        assert (from_self | from_partner).all()  # every pixel is one of the two
        mask = from_partner[0].numpy()
        for i in range(6):
            assert np.array_equal(from_partner[i].numpy(), mask)  # one box for the whole batch
        lam = lam_from_targets(targets, labels, mix, 5)
        assert abs(mask.mean() - (1 - lam)) < 1e-6
        if mask.any():
            assert_one_rectangle(mask)
            pasted_any = True
    assert pasted_any
    assert torch.equal(x, keep)


def test_switch_prob_picks_the_mix():
    x, labels = batch()
    always_cut = MixupCutmix(num_classes=5, switch_prob=1.0)
    always_mix = MixupCutmix(num_classes=5, switch_prob=0.0)
    for seed in range(5):
        out, _ = always_cut(x, labels, gen(seed))
        assert ((out == x) | (out == x.flip(0))).all()
        out, targets = always_mix(x, labels, gen(seed))
        lam = lam_from_targets(targets, labels, always_mix, 5)
        assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)


def test_no_mix_gives_untouched_images_and_smoothed_one_hot():
    x, labels = batch()
    out, targets = MixupCutmix(num_classes=5, prob=0.0, label_smoothing=0.1)(x, labels, gen(0))
    assert torch.equal(out, x)
    expected = torch.full((6, 5), 0.02)
    expected[torch.arange(6), labels] = 0.92
    assert torch.allclose(targets, expected, atol=1e-7)
    out, targets = MixupCutmix(num_classes=5, prob=0.0, label_smoothing=0.0)(x, labels, gen(0))
    assert torch.equal(targets, F.one_hot(labels, 5).float())


def test_mixup_cutmix_odd_batch_bf16_and_reproducibility():
    x, labels = batch(b=5, dtype=torch.bfloat16)
    mix = MixupCutmix(num_classes=5)
    for seed in range(4):
        out, targets = mix(x, labels, gen(seed))
        assert out.dtype == torch.bfloat16 and targets.dtype == torch.float32
        assert torch.equal(out[2], x[2])  # the middle sample is its own partner
        assert torch.allclose(targets[2], mix.smooth_one_hot(labels)[2])
    a = mix(x, labels, gen(9))
    b = mix(x, labels, gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=5, mixup_alpha=-0.1), "mixup_alpha"),
    (dict(num_classes=5, cutmix_alpha=-1), "cutmix_alpha"),
    (dict(num_classes=5, prob=1.2), "prob"),
    (dict(num_classes=5, switch_prob=-0.1), "switch_prob"),
    (dict(num_classes=5, label_smoothing=2), "label_smoothing"),
])
def test_mixup_cutmix_bad_constructor_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MixupCutmix(**kwargs)


def test_mixup_cutmix_bad_call_arguments():
    mix = MixupCutmix(num_classes=5)
    x, labels = batch()
    with pytest.raises(ValueError, match="labels must lie in"):
        mix(x, torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="labels must lie in"):
        mix(x, torch.tensor([0, 1, 2, 3, 4, -1]))
    with pytest.raises(ValueError, match="images must be a 4-D"):
        mix(x[0], labels)
    with pytest.raises(ValueError, match="batch size mismatch"):
        mix(x, labels[:4])
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        mix(x, labels.float())
    with pytest.raises(ValueError, match="images must be a floating-point"):
        mix(x.to(torch.uint8), labels)


# ---------------------------------------------------------------------------------------------
# soft_target_cross_entropy
# ---------------------------------------------------------------------------------------------
def test_soft_target_cross_entropy_matches_label_smoothing_and_gradient():
    k = 7
    labels = torch.tensor([0, 3, 6, 2, 2])
    for smoothing in (0.0, 0.1, 0.3):
        logits = torch.randn(5, k, generator=gen(5), dtype=torch.float64) * 3
        off = smoothing / k
        targets = torch.full((5, k), off, dtype=torch.float64)
        targets[torch.arange(5), labels] = 1 - smoothing + off
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        ours = soft_target_cross_entropy(a, targets)
        ref = F.cross_entropy(b, labels, label_smoothing=smoothing)
        assert ours.dtype == torch.float64 and abs(ours.item() - ref.item()) < 1e-12
        ours.backward()
        ref.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-12, rtol=0)
        total = soft_target_cross_entropy(logits, targets, reduction="sum")
        ref_total = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="sum")
        assert abs(total.item() - ref_total.item()) < 1e-12
    low = soft_target_cross_entropy(torch.randn(4, k).bfloat16(), torch.full((4, k), 1 / k))
    assert low.dtype == torch.float32 and low.dim() == 0
    with pytest.raises(ValueError, match="targets"):
        soft_target_cross_entropy(torch.randn(4, k), torch.randn(4, k + 1))
    with pytest.raises(ValueError, match="logits"):
        soft_target_cross_entropy(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        soft_target_cross_entropy(torch.randn(4, k), torch.randn(4, k), reduction="none")


# ---------------------------------------------------------------------------------------------
# TrainTransform / EvalTransform
# ---------------------------------------------------------------------------------------------
def test_train_transform_shapes_for_rgb_and_grey():
    rgb = TrainTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD, RandAugment(), reprob=0.25)
    grey = TrainTransform(32, 1, (0.5,), (0.25,), RandAugment(), reprob=0.25)
    for img in (noise_image(50, 70, "RGB"), noise_image(50, 70, "L")):
        out = rgb(img, gen(0))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        out = grey(img, gen(0))
        assert out.shape == (1, 32, 32) and out.dtype == torch.float32


def test_train_transform_of_a_constant_image_without_augment_is_the_normalised_constant():
    t = TrainTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD, None, reprob=0.0)
    out = t(Image.new("RGB", (60, 45), (200, 100, 50)), gen(1))
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)


def test_train_transform_flips_half_the_time():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), mode="L")
    t = TrainTransform(16, 1, (0.0,), (1.0,), None, reprob=0.0)
    g = gen(2)
    rising = 0
    for _ in range(300):
        out = t(img, g)
        rising += bool(out[0, 8, -1] > out[0, 8, 0])
    assert 110 < rising < 190


def test_transforms_are_picklable_and_reproducible():
    img = noise_image(50, 60)
    train = TrainTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD, RandAugment(), reprob=1.0)
    copy = pickle.loads(pickle.dumps(train))
    assert torch.equal(train(img, gen(4)), copy(img, gen(4)))
    assert not torch.equal(train(img, gen(4)), train(img, gen(5)))
    ev = EvalTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(ev(img), pickle.loads(pickle.dumps(ev))(img))


def test_eval_transform_normalises_and_crops():
    ev = EvalTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD)
    out = ev(Image.new("RGB", (48, 80), (10, 128, 250)))
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    grey = EvalTransform(32, 1, (0.5,), (0.25,))
    img = noise_image(48, 80)
    out = grey(img)
    ref = np.asarray(resize_center_crop(img.convert("L"), 32), dtype=np.float32) / 255
    assert out.shape == (1, 32, 32)
    assert torch.allclose(out[0], (torch.from_numpy(ref) - 0.5) / 0.25, atol=1e-6)


@pytest.mark.parametrize("make, fragment", [
    (lambda: TrainTransform(32, 2, (0.5, 0.5), (1, 1), None, 0.0), "in_chans"),
    (lambda: TrainTransform(32, 3, (0.5,), IMAGENET_STD, None, 0.0), "mean"),
    (lambda: TrainTransform(32, 3, IMAGENET_MEAN, (1, 0, 1), None, 0.0), "std"),
    (lambda: TrainTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD, None, 2.0), "reprob"),
    (lambda: TrainTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD, "rand-m9", 0.0), "randaugment"),
    (lambda: TrainTransform(0, 3, IMAGENET_MEAN, IMAGENET_STD, None, 0.0), "img_size"),
    (lambda: EvalTransform(32, 3, IMAGENET_MEAN, IMAGENET_STD, crop_pct=1.5), "crop_pct"),
])
def test_transform_bad_arguments(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()
