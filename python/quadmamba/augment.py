"""Image augmentations of the DeiT ImageNet training recipe, as used for QuadMamba.

The recipe (DeiT, Touvron et al. 2021) trains with AdamW at lr 1e-3 for a batch of 1024 and
these data augmentations, each implemented here from its published definition:

* Inception-style random resized crop + horizontal flip (``random_resized_crop``),
* RandAugment (Cubuk et al. 2020), 2 ops at magnitude 9 with magnitude noise std 0.5 and
  the "increasing" op set ("rand-m9-mstd0.5-inc1"; ``RandAugment``),
* random erasing with probability 0.25 (Zhong et al. 2020; ``random_erasing``),
* mixup alpha 0.8 (Zhang et al. 2018) and CutMix alpha 1.0 (Yun et al. 2019), one of the two
  per batch with even odds, and label smoothing 0.1 (``MixupCutmix``), trained with a soft
  target cross-entropy (``soft_target_cross_entropy``).

Evaluation resizes the shorter side to floor(S / 0.875) and takes the central S x S crop
(``resize_center_crop``). ``TrainTransform`` and ``EvalTransform`` chain the per-image steps
for a dataset; ``MixupCutmix`` acts on a whole batch after collation.

Randomness: every draw comes from torch's RNG, through an optional ``generator``
(``torch.Generator``, CPU); ``None`` uses torch's global RNG. DataLoader workers seed torch
per worker, so worker pipelines and seeded runs are reproducible. Random draws happen on the
CPU even when tensors live on another device.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from quadmamba.data import image_to_tensor, normalize

__all__ = [
    "RAND_INCREASING_OPS", "EvalTransform", "MixupCutmix", "RandAugment", "TrainTransform",
    "random_erasing", "random_resized_crop", "random_resized_crop_box", "resize_center_crop",
    "sample_beta", "sample_gamma", "soft_target_cross_entropy",
]

_BICUBIC = Image.Resampling.BICUBIC
_AFFINE = Image.Transform.AFFINE
_MAX_TRIES = 10

Generator = Optional[torch.Generator]


# ---------------------------------------------------------------------------------------------
# random draws (torch RNG only)
# ---------------------------------------------------------------------------------------------
def _uniform(generator: Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One draw of U[low, high)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return low + (high - low) * u


def _randint(low: int, high: int, generator: Generator) -> int:
    """One integer uniform on {low, ..., high} (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _normal(generator: Generator) -> float:
    return float(torch.randn((), generator=generator, dtype=torch.float64))


def _log_uniform(low: float, high: float, generator: Generator) -> float:
    """exp(U[log low, log high)): a ratio whose logarithm is uniform."""
    return math.exp(_uniform(generator, math.log(low), math.log(high)))


def _log_gamma(alpha: float, size: int, generator: Generator) -> torch.Tensor:
    """log X for ``size`` draws X ~ Gamma(alpha, 1), float64 on the CPU.

    Marsaglia & Tsang (2000): for a >= 1 let d = a - 1/3, c = 1 / sqrt(9 d); draw x ~ N(0, 1),
    v = (1 + c x)^3, u ~ U(0, 1); accept d v when v > 0 and either u < 1 - 0.0331 x^4 (squeeze)
    or log u < x^2 / 2 + d (1 - v + log v). Acceptance is above 95 % for every a >= 1. For
    a < 1 the boost X = Y U^(1/a) with Y ~ Gamma(a + 1), U ~ U(0, 1] is used, computed in logs
    (log X = log Y + log U / a) so that tiny a cannot underflow.

    Candidates are drawn in vectorised rounds; the number of draws used depends only on the
    generator's state, so a seeded generator gives the same samples every time.
    """
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, dtype=torch.float64)
    filled = 0
    while filled < size:
        need = size - filled
        count = need + need // 8 + 16
        x = torch.randn(count, generator=generator, dtype=torch.float64)
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        positive = v > 0
        log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
        squeeze = u < 1.0 - 0.0331 * x ** 4
        full = torch.log(u) < 0.5 * x * x + d * (1.0 - v + log_v)
        accepted = (math.log(d) + log_v)[positive & (squeeze | full)][:need]
        out[filled:filled + accepted.numel()] = accepted
        filled += accepted.numel()
    if boost:
        u = 1.0 - torch.rand(size, generator=generator, dtype=torch.float64)  # in (0, 1]
        out += torch.log(u) / alpha
    return out


def sample_gamma(alpha: float, size: int = 1, generator: Generator = None) -> torch.Tensor:
    """``size`` draws of Gamma(alpha, 1) (density x^(alpha-1) e^(-x) / Gamma(alpha)), float64, CPU.

    Uses Marsaglia & Tsang's squeeze-rejection method with torch.randn / torch.rand on
    ``generator`` (``torch._standard_gamma`` takes no generator), see ``_log_gamma``.

    Args:
        alpha: shape, > 0.
        size: number of draws, >= 1.
        generator: torch RNG; None = torch's global RNG.
    """
    _check_positive("alpha", alpha)
    _check_count("size", size)
    return torch.exp(_log_gamma(float(alpha), size, generator))


def sample_beta(alpha: float, beta: float, size: int = 1, generator: Generator = None) -> torch.Tensor:
    """``size`` draws of Beta(alpha, beta), float64 on the CPU.

    Beta(a, b) = X / (X + Y) with independent X ~ Gamma(a), Y ~ Gamma(b); computed as
    sigmoid(log X - log Y) so that small shapes stay finite. Mean a / (a + b), variance
    a b / ((a + b)^2 (a + b + 1)); for a = b: 1/2 and 1 / (4 (2a + 1)).

    Args:
        alpha, beta: shapes, > 0.
        size: number of draws, >= 1.
        generator: torch RNG; None = torch's global RNG.
    """
    _check_positive("alpha", alpha)
    _check_positive("beta", beta)
    _check_count("size", size)
    log_x = _log_gamma(float(alpha), size, generator)
    log_y = _log_gamma(float(beta), size, generator)
    return torch.sigmoid(log_x - log_y)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_positive(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_count(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_probability(name: str, value) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_range(name: str, value) -> Tuple[float, float]:
    """A (low, high) pair with 0 < low <= high, both finite."""
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) with 0 < low <= high, got {value!r}") from None
    if not (_is_number(low) and _is_number(high) and math.isfinite(low) and math.isfinite(high)
            and 0 < low <= high):
        raise ValueError(f"{name} must be a pair (low, high) with 0 < low <= high, got {value!r}")
    return float(low), float(high)


def _check_image(name: str, img, modes: Optional[Sequence[str]] = None) -> None:
    if not isinstance(img, Image.Image):
        raise ValueError(f"{name} must be a PIL.Image.Image, got {type(img).__name__}")
    if modes is not None and img.mode not in modes:
        raise ValueError(f"{name} must have mode {' or '.join(repr(m) for m in modes)}, got {img.mode!r}")
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{name} must not be empty, got size {img.size}")


def _check_crop_pct(value) -> None:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"crop_pct must be a number in (0, 1], got {value!r}")


def _describe(value) -> str:
    """What an argument that is not the tensor asked for is: its shape and dtype, or its type."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# ---------------------------------------------------------------------------------------------
# crops
# ---------------------------------------------------------------------------------------------
def _fitting_box(size_a: int, size_b: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                 generator: Generator) -> Optional[Tuple[int, int, int, int]]:
    """The first of up to 10 random boxes that fits a size_a x size_b image: (offset_a,
    offset_b, a, b), or None when none fits.

    Each try draws the area fraction s ~ U(scale) and the ratio r = a / b log-uniform on
    ``ratio``: a = round(sqrt(s A r)), b = round(sqrt(s A / r)), A = size_a * size_b; it fits
    when 1 <= a <= size_a and 1 <= b <= size_b, and is then placed uniformly, offset_a ~
    U{0..size_a-a} drawn before offset_b ~ U{0..size_b-b}. A crop window passes (width,
    height): r = w / h; an erased rectangle passes (height, width): r = h / w.
    """
    area = size_a * size_b
    for _ in range(_MAX_TRIES):
        target = area * _uniform(generator, *scale)
        aspect = _log_uniform(*ratio, generator)
        a = int(round(math.sqrt(target * aspect)))
        b = int(round(math.sqrt(target / aspect)))
        if 1 <= a <= size_a and 1 <= b <= size_b:
            offset_a = _randint(0, size_a - a, generator)
            offset_b = _randint(0, size_b - b, generator)
            return offset_a, offset_b, a, b
    return None


def random_resized_crop_box(width: int, height: int, scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3),
                            generator: Generator = None) -> Tuple[int, int, int, int]:
    """The crop window of ``random_resized_crop``: (left, top, crop_width, crop_height).

    Inception-style sampling (Szegedy et al. 2015), up to 10 tries: area fraction
    s ~ U(scale), aspect ratio r = w / h log-uniform on ``ratio``; w = round(sqrt(s A r)),
    h = round(sqrt(s A / r)) with A = width * height. A window with 1 <= w <= width and
    1 <= h <= height is placed uniformly: left ~ U{0..width-w}, top ~ U{0..height-h}.
    When no try fits, the fallback is the central crop of the whole image with its aspect
    ratio clamped to ``ratio``: width / height < ratio[0] gives w = width,
    h = round(width / ratio[0]); > ratio[1] gives h = height, w = round(height * ratio[1]);
    otherwise the whole image. Central means left = (width - w) // 2, top = (height - h) // 2.

    Args:
        width, height: image size in pixels, >= 1.
        scale: (low, high) area fractions, 0 < low <= high (high > 1 is allowed; such draws
            never fit).
        ratio: (low, high) aspect ratios w / h, 0 < low <= high.
        generator: torch RNG; None = torch's global RNG.
    """
    _check_count("width", width)
    _check_count("height", height)
    s_low, s_high = _check_range("scale", scale)
    r_low, r_high = _check_range("ratio", ratio)
    _check_generator(generator)
    box = _fitting_box(width, height, (s_low, s_high), (r_low, r_high), generator)
    if box is not None:
        return box
    in_ratio = width / height
    if in_ratio < r_low:
        w, h = width, min(height, max(1, int(round(width / r_low))))
    elif in_ratio > r_high:
        w, h = min(width, max(1, int(round(height * r_high)))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), generator: Generator = None) -> Image.Image:
    """Crop a random window (``random_resized_crop_box``) and resize it to size x size (BICUBIC).

    Args:
        img: a PIL image, any mode PIL can resize.
        size: output side S, >= 1.
        scale: (low, high) range of the window's area fraction.
        ratio: (low, high) range of the window's aspect ratio w / h (log-uniform).
        generator: torch RNG; None = torch's global RNG.
    """
    _check_image("img", img)
    _check_count("size", size)
    left, top, w, h = random_resized_crop_box(img.width, img.height, scale, ratio, generator)
    return img.crop((left, top, left + w, top + h)).resize((size, size), _BICUBIC)


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 0.875) -> Image.Image:
    """Evaluation transform: resize the shorter side, keep the aspect, take the central square.

    The shorter side becomes R = floor(size / crop_pct) (256 for 224 at 0.875) and the longer
    side int(longer * R / shorter) (BICUBIC); then the size x size crop at
    left = (W' - size) // 2, top = (H' - size) // 2 of the resized W' x H' image.

    Args:
        img: a PIL image, any mode PIL can resize.
        size: output side S, >= 1.
        crop_pct: fraction of the resized shorter side kept, in (0, 1].
    """
    _check_image("img", img)
    _check_count("size", size)
    _check_crop_pct(crop_pct)
    short = math.floor(size / crop_pct)
    w, h = img.size
    if w <= h:
        new_w, new_h = short, max(short, int(h * short / w))
    else:
        new_w, new_h = max(short, int(w * short / h)), short
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# ops whose parameter gets a random sign (+/- with even odds)
_SIGNED_OPS = frozenset({
    "Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
})
_ENHANCERS = {
    "ColorIncreasing": ImageEnhance.Color,
    "ContrastIncreasing": ImageEnhance.Contrast,
    "BrightnessIncreasing": ImageEnhance.Brightness,
    "SharpnessIncreasing": ImageEnhance.Sharpness,
}


class RandAugment:
    """RandAugment (Cubuk et al. 2020) with the "increasing" op set, as in "rand-m9-mstd0.5-inc1".

    Each call applies ``num_ops`` ops in sequence. Each op is chosen uniformly from the 15 ops
    below (with replacement) and applied with probability 0.5; an applied op draws its own
    magnitude m ~ Normal(magnitude, magnitude_std) clipped to [0, max_magnitude]
    (magnitude_std = 0: m = magnitude). With f = m / max_magnitude in [0, 1], every op grows
    stronger as m rises; signed parameters take + or - with even odds:

    ====================  ===================================================================
    op                    effect at magnitude m (f = m / max_magnitude)
    ====================  ===================================================================
    AutoContrast          per channel, stretch [min, max] to [0, 255] (no magnitude)
    Equalize              per-channel histogram equalisation (no magnitude)
    Invert                x -> 255 - x (no magnitude)
    Rotate                rotate about the centre by +/- 30 f degrees (counter-clockwise > 0)
    PosterizeIncreasing   keep the top b = 4 - floor(4 f) bits: x -> x & (256 - 2^(8-b));
                          b runs 4, 3, 2, 1, 0 (0 at f = 1: a black image)
    SolarizeIncreasing    threshold t = 256 - floor(256 f): x -> 255 - x where x >= t
                          (t = 256 changes nothing, t = 0 inverts everything)
    SolarizeAdd           a = floor(110 f): x -> min(x + a, 255) where x < 128
    ColorIncreasing       ImageEnhance.Color with factor 1 +/- 0.9 f (saturation)
    ContrastIncreasing    ImageEnhance.Contrast, factor 1 +/- 0.9 f: x -> mu + k (x - mu),
                          mu the mean grey level
    BrightnessIncreasing  ImageEnhance.Brightness, factor 1 +/- 0.9 f: x -> k x
    SharpnessIncreasing   ImageEnhance.Sharpness, factor 1 +/- 0.9 f (blend with a smoothed
                          copy; k < 1 blurs, k > 1 sharpens)
    ShearX                affine: output (x, y) samples input (x + s y, y), s = +/- 0.3 f
    ShearY                affine: output (x, y) samples input (x, y + s x), s = +/- 0.3 f
    TranslateXRel         output (x, y) samples input (x + t, y), t = +/- 0.45 f width
                          (content moves by -t pixels)
    TranslateYRel         output (x, y) samples input (x, y + t), t = +/- 0.45 f height
    ====================  ===================================================================

    At m = 0 the geometric and enhance ops, SolarizeIncreasing and SolarizeAdd are identities.
    Geometric ops resample with BICUBIC and fill uncovered pixels with ``fill`` (the ImageNet
    mean, (124, 116, 104), for RGB; the rounded mean of ``fill`` for grey "L" images).
    Integer shifts are exact.

    Draw order per op: op index, apply test, magnitude (only when applied and
    magnitude_std > 0), sign (only for signed ops).

    Args:
        num_ops: ops per image (N in the paper), >= 0.
        magnitude: mean magnitude M, in [0, max_magnitude].
        magnitude_std: standard deviation of the per-op magnitude noise, >= 0.
        max_magnitude: the magnitude of the strongest setting (10 in the paper), > 0.
        fill: RGB fill of geometric ops, three integers in [0, 255] (or one integer).
    """

    ops = RAND_INCREASING_OPS
    prob = 0.5

    def __init__(self, num_ops: int = 2, magnitude: float = 9, magnitude_std: float = 0.5,
                 max_magnitude: float = 10, fill: Union[int, Sequence[int]] = (124, 116, 104)):
        _check_count("num_ops", num_ops, minimum=0)
        _check_positive("max_magnitude", max_magnitude)
        if not _is_number(magnitude) or not 0 <= magnitude <= max_magnitude:
            raise ValueError(f"magnitude must be a number in [0, max_magnitude={max_magnitude}], got {magnitude!r}")
        if not _is_number(magnitude_std) or not math.isfinite(magnitude_std) or magnitude_std < 0:
            raise ValueError(f"magnitude_std must be a finite number >= 0, got {magnitude_std!r}")
        if isinstance(fill, (int, np.integer)) and not isinstance(fill, bool):
            fill = (fill, fill, fill)
        try:
            fill = tuple(fill)
        except TypeError:
            fill = None
        if (fill is None or len(fill) != 3
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255
                           for v in fill)):
            raise ValueError(f"fill must be three integers in [0, 255] (or one), got {fill!r}")
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.max_magnitude = float(max_magnitude)
        self.fill = tuple(int(v) for v in fill)

    def __repr__(self) -> str:
        return (f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, max_magnitude={self.max_magnitude}, fill={self.fill})")

    def sample_magnitude(self, generator: Generator = None) -> float:
        """m ~ Normal(magnitude, magnitude_std) clipped to [0, max_magnitude]."""
        if self.magnitude_std == 0:
            return self.magnitude
        m = self.magnitude + self.magnitude_std * _normal(generator)
        return min(max(m, 0.0), self.max_magnitude)

    def op_parameter(self, name: str, magnitude: float) -> Union[int, float, None]:
        """The unsigned parameter of op ``name`` at ``magnitude`` (the table above).

        Degrees for Rotate, kept bits for PosterizeIncreasing, threshold for
        SolarizeIncreasing, added value for SolarizeAdd, |k - 1| for the enhance ops, |s| for
        the shears, the fraction of the side for the translations; None for ops without one.
        """
        if name not in self.ops:
            raise ValueError(f"name must be one of {', '.join(self.ops)}, got {name!r}")
        if not _is_number(magnitude) or not 0 <= magnitude <= self.max_magnitude:
            raise ValueError(f"magnitude must be a number in [0, {self.max_magnitude}], got {magnitude!r}")
        f = magnitude / self.max_magnitude
        if name in ("AutoContrast", "Equalize", "Invert"):
            return None
        if name == "Rotate":
            return 30.0 * f
        if name == "PosterizeIncreasing":
            return 4 - int(math.floor(4 * f))
        if name == "SolarizeIncreasing":
            return 256 - int(math.floor(256 * f))
        if name == "SolarizeAdd":
            return int(math.floor(110 * f))
        if name in _ENHANCERS:
            return 0.9 * f
        if name in ("ShearX", "ShearY"):
            return 0.3 * f
        return 0.45 * f  # TranslateXRel, TranslateYRel

    def _fill_for(self, img: Image.Image) -> Union[int, Tuple[int, int, int]]:
        if img.mode == "L":
            return int(round(sum(self.fill) / 3))
        return self.fill

    def apply_op(self, img: Image.Image, name: str, magnitude: float, generator: Generator = None) -> Image.Image:
        """Apply op ``name`` at ``magnitude`` (no apply test, no magnitude noise).

        Signed ops draw their sign from ``generator``. ``img`` must be "RGB" or "L".
        """
        _check_image("img", img, ("RGB", "L"))
        _check_generator(generator)
        param = self.op_parameter(name, magnitude)
        if name in _SIGNED_OPS and _uniform(generator) < 0.5:
            param = -param
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)
        if name == "Equalize":
            return ImageOps.equalize(img)
        if name == "Invert":
            return ImageOps.invert(img)
        if name == "PosterizeIncreasing":
            keep = 256 - 2 ** (8 - param)
            return img.point([v & keep for v in range(256)] * len(img.getbands()))
        if name == "SolarizeIncreasing":
            return img.point([255 - v if v >= param else v for v in range(256)] * len(img.getbands()))
        if name == "SolarizeAdd":
            return img.point([min(v + param, 255) if v < 128 else v for v in range(256)] * len(img.getbands()))
        if name in _ENHANCERS:
            return _ENHANCERS[name](img).enhance(1.0 + param)
        fill = self._fill_for(img)
        if name == "Rotate":
            return img.rotate(param, resample=_BICUBIC, fillcolor=fill)
        if name == "ShearX":
            matrix = (1.0, param, 0.0, 0.0, 1.0, 0.0)
        elif name == "ShearY":
            matrix = (1.0, 0.0, 0.0, param, 1.0, 0.0)
        elif name == "TranslateXRel":
            matrix = (1.0, 0.0, param * img.width, 0.0, 1.0, 0.0)
        else:  # TranslateYRel
            matrix = (1.0, 0.0, 0.0, 0.0, 1.0, param * img.height)
        return img.transform(img.size, _AFFINE, matrix, resample=_BICUBIC, fillcolor=fill)

    def __call__(self, img: Image.Image, generator: Generator = None) -> Image.Image:
        """Apply ``num_ops`` random ops to an "RGB" or "L" image; returns a new image."""
        _check_image("img", img, ("RGB", "L"))
        _check_generator(generator)
        for _ in range(self.num_ops):
            name = self.ops[_randint(0, len(self.ops) - 1, generator)]
            if _uniform(generator) >= self.prob:
                continue
            img = self.apply_op(img, name, self.sample_magnitude(generator), generator)
        return img


# ---------------------------------------------------------------------------------------------
# random erasing
# ---------------------------------------------------------------------------------------------
def random_erasing(image: torch.Tensor, prob: float = 0.25, scale: Sequence[float] = (0.02, 1 / 3),
                   ratio: Sequence[float] = (0.3, 3.3), generator: Generator = None) -> torch.Tensor:
    """Random Erasing (Zhong et al. 2020), "pixel" mode, one rectangle.

    With probability ``prob``: up to 10 tries of area fraction s ~ U(scale) and aspect
    r = h / w log-uniform on ``ratio``; h = round(sqrt(s H W r)), w = round(sqrt(s H W / r)).
    The first try with 1 <= h <= H and 1 <= w <= W is placed uniformly (top ~ U{0..H-h},
    left ~ U{0..W-w}) and its pixels, every channel, are replaced by independent N(0, 1) values
    (the image is assumed normalised to zero mean, unit variance). When no try fits, nothing
    is erased. Rounding makes the erased fraction h w / (H W) differ from s by at most
    about (h + w) / (2 H W) + 1 / (4 H W).

    Args:
        image: (C, H, W) floating tensor, normalised; left untouched.
        prob: probability of erasing, in [0, 1].
        scale: (low, high) erased area fractions, 0 < low <= high.
        ratio: (low, high) aspect ratios, 0 < low <= high.
        generator: torch RNG (CPU; values are drawn there and moved to ``image``'s device).
    Returns:
        A new tensor of ``image``'s shape, dtype and device.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a (C, H, W) floating-point tensor, got {_describe(image)}")
    _check_probability("prob", prob)
    s_low, s_high = _check_range("scale", scale)
    r_low, r_high = _check_range("ratio", ratio)
    _check_generator(generator)
    out = image.clone()
    if prob == 0 or _uniform(generator) >= prob:
        return out
    c, height, width = image.shape
    box = _fitting_box(height, width, (s_low, s_high), (r_low, r_high), generator)
    if box is not None:
        top, left, h, w = box
        noise = torch.randn((c, h, w), generator=generator, dtype=torch.float32)
        out[:, top:top + h, left:left + w] = noise.to(device=image.device, dtype=image.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# mixup / CutMix
# ---------------------------------------------------------------------------------------------
class MixupCutmix:
    """Batch-wise mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) with label smoothing.

    Per call (one lambda for the whole batch), partner of sample i is sample B-1-i
    (``images.flip(0)``; with odd B the middle sample pairs with itself, which leaves it
    unchanged):

    1. with probability ``prob`` a mix is applied, else lam = 1;
    2. the mix is CutMix with probability ``switch_prob`` when both alphas are > 0, else the
       one whose alpha is > 0 (both 0: no mix ever);
    3. mixup: lam ~ Beta(a, a), a = mixup_alpha; x' = lam x + (1 - lam) x.flip(0);
    4. CutMix: lam ~ Beta(a, a), a = cutmix_alpha; a box of cut_h = int(H sqrt(1 - lam)) by
       cut_w = int(W sqrt(1 - lam)) with centre (cy, cx) uniform on the pixel grid, rows
       [cy - cut_h // 2, cy - cut_h // 2 + cut_h) and columns likewise, clipped to the image,
       is pasted from x.flip(0); lam is then corrected to the uncovered fraction
       1 - box_area / (H W).

    Targets: t = smoothed one-hot, off = label_smoothing / num_classes on every class and
    on = 1 - label_smoothing + off on the label; the result lam t + (1 - lam) t.flip(0) is
    float32, rows non-negative and summing to 1.

    Random numbers are drawn on the CPU (``sample_beta`` honours ``generator``); images may
    live on any device, the targets are made on the labels' device.

    Args:
        num_classes: K, >= 1.
        mixup_alpha: Beta parameter of mixup, >= 0 (0 disables mixup).
        cutmix_alpha: Beta parameter of CutMix, >= 0 (0 disables CutMix).
        prob: probability of mixing a batch, in [0, 1].
        switch_prob: probability of CutMix when both are enabled, in [0, 1].
        label_smoothing: epsilon of label smoothing, in [0, 1].
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
        _check_count("num_classes", num_classes)
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not _is_number(alpha) or not math.isfinite(alpha) or alpha < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {alpha!r}")
        _check_probability("prob", prob)
        _check_probability("switch_prob", switch_prob)
        _check_probability("label_smoothing", label_smoothing)
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)

    def __repr__(self) -> str:
        return (f"MixupCutmix(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"label_smoothing={self.label_smoothing})")

    def smooth_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> (B, K) float32: off = eps / K everywhere, 1 - eps + off on the label."""
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        targets = torch.full((labels.shape[0], self.num_classes), off, dtype=torch.float32, device=labels.device)
        return targets.scatter_(1, labels.long().view(-1, 1), on)

    def _check(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a 4-D (B, C, H, W) tensor, got {_describe(images)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        if images.shape[0] < 1:
            raise ValueError("images must hold at least one sample (B >= 1), got B = 0")
        if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point()
                or labels.is_complex() or labels.dtype == torch.bool):
            raise ValueError(f"labels must be a 1-D integer tensor of class indices, got {_describe(labels)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have one entry per image: batch size mismatch, "
                             f"{labels.shape[0]} labels for {images.shape[0]} images")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), got "
                             f"min {int(labels.min())} max {int(labels.max())}")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: Generator = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch: (images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, K)).

        The inputs are left untouched; the returned images are a new tensor.
        """
        self._check(images, labels)
        _check_generator(generator)
        lam = 1.0
        mixed = images.clone()
        use_mixup = self.mixup_alpha > 0
        use_cutmix = self.cutmix_alpha > 0
        if (use_mixup or use_cutmix) and self.prob > 0 and _uniform(generator) < self.prob:
            if use_mixup and use_cutmix:
                cutmix = _uniform(generator) < self.switch_prob
            else:
                cutmix = use_cutmix
            if cutmix:
                lam = float(sample_beta(self.cutmix_alpha, self.cutmix_alpha, 1, generator)[0])
                height, width = images.shape[-2:]
                side = math.sqrt(1.0 - lam)
                cut_h, cut_w = int(height * side), int(width * side)
                cy = _randint(0, height - 1, generator)
                cx = _randint(0, width - 1, generator)
                y0, x0 = cy - cut_h // 2, cx - cut_w // 2
                y0, y1 = max(y0, 0), min(y0 + cut_h, height)
                x0, x1 = max(x0, 0), min(x0 + cut_w, width)
                if y1 > y0 and x1 > x0:
                    mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - max(y1 - y0, 0) * max(x1 - x0, 0) / (height * width)
            else:
                lam = float(sample_beta(self.mixup_alpha, self.mixup_alpha, 1, generator)[0])
                # x + (1 - lam) (x' - x): one rounding, and an unpaired middle sample stays exact
                mixed = torch.lerp(images, images.flip(0), 1.0 - lam)
        targets = self.smooth_one_hot(labels)
        targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return mixed, targets


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against soft targets: mean_b (or sum_b, reduction="sum") of
    -sum_k targets[b, k] * log_softmax(logits[b])_k.

    Computed in float32 at least (float64 inputs stay float64), so bf16/fp16 logits do not lose
    precision in the log-sum-exp. With smoothed one-hot targets it equals
    ``F.cross_entropy(logits, labels, label_smoothing=eps)``.

    Args:
        logits: (B, K) floating tensor.
        targets: (B, K) tensor, rows of non-negative weights (normally summing to 1).
        reduction: "mean" or "sum" over the batch.
    Returns:
        A scalar tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a (B, K) floating-point tensor, got {_describe(logits)}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"targets must be a tensor of the logits' shape {tuple(logits.shape)}, got "
                         f"{_describe(targets)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = F.log_softmax(logits.to(dtype), dim=-1)
    per_image = -(targets.to(dtype) * log_probs).sum(dim=-1)
    return per_image.mean() if reduction == "mean" else per_image.sum()


# ---------------------------------------------------------------------------------------------
# per-image pipelines
# ---------------------------------------------------------------------------------------------
def _check_stats(in_chans, mean, std) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if in_chans not in (1, 3) or isinstance(in_chans, bool):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans!r}")
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of {in_chans} numbers, got {mean!r}, {std!r}") from None
    if len(mean) != in_chans:
        raise ValueError(f"mean must have in_chans={in_chans} values, got {mean!r}")
    if len(std) != in_chans or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"std must have in_chans={in_chans} finite values > 0, got {std!r}")
    return mean, std


def _to_normalised_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """"L"/"RGB" image -> (C, H, W) float32: (pixel / 255 - mean) / std per channel."""
    return normalize(image_to_tensor(img)[None], mean, std)[0]


class TrainTransform:
    """Training pipeline of one image (DeiT recipe without the batch-level mixing):

    convert to "L" (in_chans 1) or "RGB" (in_chans 3) -> ``random_resized_crop`` to S x S
    (scale (0.08, 1), ratio (3/4, 4/3), BICUBIC) -> horizontal flip with probability 0.5 ->
    ``randaugment`` (if given) -> float tensor (C, S, S) of pixel / 255 -> (x - mean) / std ->
    ``random_erasing`` with probability ``reprob``.

    Picklable (plain attributes), so it can run in DataLoader workers.

    Args:
        img_size: S, >= 1.
        in_chans: 1 or 3.
        mean, std: per-channel statistics of [0, 1] pixels, in_chans values each (std > 0).
        randaugment: a ``RandAugment`` or None.
        reprob: random erasing probability, in [0, 1].
    """

    def __init__(self, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 randaugment: Optional[RandAugment], reprob: float):
        _check_count("img_size", img_size)
        self.mean, self.std = _check_stats(in_chans, mean, std)
        if randaugment is not None and not isinstance(randaugment, RandAugment):
            raise ValueError(f"randaugment must be a RandAugment or None, got {type(randaugment).__name__}")
        _check_probability("reprob", reprob)
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.randaugment = randaugment
        self.reprob = float(reprob)

    def __repr__(self) -> str:
        return (f"TrainTransform(img_size={self.img_size}, in_chans={self.in_chans}, mean={self.mean}, "
                f"std={self.std}, randaugment={self.randaugment!r}, reprob={self.reprob})")

    def __call__(self, img: Image.Image, generator: Generator = None) -> torch.Tensor:
        _check_image("img", img)
        _check_generator(generator)
        img = img.convert("L" if self.in_chans == 1 else "RGB")
        img = random_resized_crop(img, self.img_size, generator=generator)
        if _uniform(generator) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, generator)
        tensor = _to_normalised_tensor(img, self.mean, self.std)
        return random_erasing(tensor, prob=self.reprob, generator=generator)


class EvalTransform:
    """Evaluation pipeline of one image: convert to "L"/"RGB" -> ``resize_center_crop``
    (shorter side floor(S / crop_pct), central S x S) -> float tensor / 255 -> (x - mean) / std.

    Deterministic and picklable.

    Args:
        img_size: S, >= 1.
        in_chans: 1 or 3.
        mean, std: per-channel statistics of [0, 1] pixels, in_chans values each (std > 0).
        crop_pct: kept fraction of the resized shorter side, in (0, 1].
    """

    def __init__(self, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 crop_pct: float = 0.875):
        _check_count("img_size", img_size)
        self.mean, self.std = _check_stats(in_chans, mean, std)
        _check_crop_pct(crop_pct)
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.crop_pct = float(crop_pct)

    def __repr__(self) -> str:
        return (f"EvalTransform(img_size={self.img_size}, in_chans={self.in_chans}, mean={self.mean}, "
                f"std={self.std}, crop_pct={self.crop_pct})")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        _check_image("img", img)
        img = img.convert("L" if self.in_chans == 1 else "RGB")
        img = resize_center_crop(img, self.img_size, self.crop_pct)
        return _to_normalised_tensor(img, self.mean, self.std)
