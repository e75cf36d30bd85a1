"""Datasets for the command line: scikit-learn's bundled handwritten digits and
ImageFolder-style directories (one sub-folder per class), loaded with PIL.

Every dataset yields (image (C, S, S) float32, normalised; label int64). Images are
square: S = img_size. Normalisation statistics travel in the checkpoint (``DataSpec``) so
evaluation and visualisation see exactly what training saw.

Digits: 1,797 real 8x8 grey images (values 0..16), upscaled bilinearly to S x S, one
channel; a fixed stratified split (20 % held out, seeded) so every run and every
evaluation sees the same test images.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DIGITS = "digits"
MIN_IMG_SIZE = 32
IMG_SIZE_MULTIPLE = 32
# Training augmentations: "basic" (shift + flip of whole batches, images resized to S x S) and
# "imagenet" (the DeiT pipeline of quadmamba.augment, held-out images centre-cropped).
AUGS = ("basic", "imagenet")
IMAGENET_AUG = "imagenet"
IMAGENET_EVAL_CROP = 0.875
# ImageNet statistics for photo folders (RGB); grey folders use their mean.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A data source that cannot be used (missing folder, no classes, not an image)."""


@dataclass
class DataSpec:
    """What a model was trained on: enough to rebuild the same held-out split and inputs.

    Args:
        source: "digits" or the ImageFolder path.
        img_size: S.
        in_chans: 1 (grey) or 3 (RGB).
        mean, std: per-channel normalisation of [0, 1] pixel values.
        classes: class names, index = label.
        seed, val_fraction: the held-out split (digits, or folders without train/ and val/).
        eval_crop: how held-out images become S x S: 0 resizes the whole image to S x S; a
            fraction c in (0, 1] resizes the shorter side to floor(S / c) and takes the
            central S x S (the ImageNet evaluation, c = 0.875; training with ``--aug imagenet``).
    """

    source: str
    img_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: List[str] = field(default_factory=list)
    seed: int = 0
    val_fraction: float = 0.2
    eval_crop: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(**d)


def check_img_size(img_size: int) -> int:
    """Image sizes the models take without padding: a multiple of 32, at least 32."""
    if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE or img_size % IMG_SIZE_MULTIPLE:
        raise DataError(f"--img-size must be a multiple of {IMG_SIZE_MULTIPLE} and at least "
                        f"{MIN_IMG_SIZE} (the stage grids must divide into quadrants), got {img_size}")
    return img_size


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): per class, round(fraction * n) samples held out (>= 1 where
    the class has >= 2 samples), chosen by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


class TensorImages(Dataset):
    """Images held in memory: (N, C, S, S) normalised float32 and (N,) labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def digits_datasets(img_size: int = 32, seed: int = 0, val_fraction: float = 0.2):
    """(train, test, DataSpec) for scikit-learn's digits, upscaled to img_size, 1 channel."""
    from sklearn.datasets import load_digits

    check_img_size(img_size)
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (N, 1, 8, 8)
    images = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = stratified_split(digits.target, val_fraction, seed)
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    images = normalize(images, (mean,), (std,))
    spec = DataSpec(DIGITS, img_size, 1, (mean,), (std,), [str(c) for c in digits.target_names.tolist()],
                    seed, val_fraction)
    train = TensorImages(images[train_idx], labels[train_idx])
    test = TensorImages(images[test_idx], labels[test_idx])
    return train, test, spec


def open_image(path: str, in_chans: int):
    """A file -> a decoded PIL image of mode "L" (in_chans 1) or "RGB" (3), 8 bits per channel."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _to_8bit(img).convert("L" if in_chans == 1 else "RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected an image file, got a directory: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"not a readable image: {path} ({type(exc).__name__})") from None


def load_image(path: str, img_size: int, in_chans: int) -> torch.Tensor:
    """A file -> (in_chans, img_size, img_size) float32 in [0, 1] (resized, not normalised)."""
    from PIL import Image

    return image_to_tensor(open_image(path, in_chans).resize((img_size, img_size), Image.BILINEAR))


def image_to_tensor(img) -> torch.Tensor:
    """An "L" or "RGB" PIL image -> (1 or 3, H, W) float32 pixel / 255 in [0, 1]."""
    if getattr(img, "mode", None) not in ("L", "RGB"):
        raise ValueError(f"img must be a PIL image of mode 'L' or 'RGB', got "
                         f"{type(img).__name__}{' of mode ' + repr(img.mode) if hasattr(img, 'mode') else ''}")
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _to_8bit(img):
    """Images of more than 8 bits per channel (16-bit and 32-bit integer grey, float grey)
    scaled to 8-bit grey: PIL's convert() would clip them (a 16-bit image turns almost white,
    a float image in [0, 1] black). Integer images keep their scale (a 16-bit one: / 257);
    float images are taken as [0, 1] when they lie in it, else stretched from their min to max."""
    from PIL import Image

    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return img
    array = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(array.min()), float(array.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("the image has non-finite pixel values")
        if lo < 0.0 or hi > 1.0:
            array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
        array = array * 255.0
    elif img.mode.startswith("I;16") or array.max() <= 65535:
        array = array / 257.0
    else:
        array = array / (2**32 - 1) * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _verify_image(path: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"not a readable image: {path} ({type(exc).__name__})") from None


def scan_folder(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(classes, [(path, label)]) of an ImageFolder directory: every sub-folder is a class,
    every file with an image extension inside it (recursively) a sample. Files are verified
    (decoded headers); launched by torchrun, each process verifies its share of them."""
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fn), label))
    if not samples:
        raise DataError(f"data folder {root} has class folders {classes} but no images "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    from quadmamba.distributed import launched_group

    group = launched_group()
    for path, _ in samples[group.rank::group.world]:
        _verify_image(path)
    return classes, samples


class FolderImages(Dataset):
    """Images read from disk on access: samples [(path, label)], resized to S x S and
    normalised, or, with ``transform``, the decoded PIL image (mode "L" or "RGB") passed
    through it (a callable returning the normalised (C, S, S) tensor, e.g. the ImageNet
    pipelines of quadmamba.augment)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], img_size: int, in_chans: int,
                 mean: Sequence[float], std: Sequence[float],
                 transform: Optional[Callable[[object], torch.Tensor]] = None):
        self.samples = list(samples)
        self.img_size, self.in_chans = img_size, in_chans
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        if self.transform is not None:
            image = self.transform(open_image(path, self.in_chans))
        else:
            image = normalize(load_image(path, self.img_size, self.in_chans)[None], self.mean, self.std)[0]
        return image, torch.tensor(label, dtype=torch.long)


def folder_stats(in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,), (0.25,)


def folder_datasets(root: str, img_size: int = 224, in_chans: int = 3, seed: int = 0,
                    val_fraction: float = 0.2, aug: str = "basic", eval_crop: float = 0.0):
    """(train, val, DataSpec) of an ImageFolder directory.

    With ``root/train`` and ``root/val`` sub-folders those are the splits (same class names
    required); otherwise the class folders are split stratified (``val_fraction``, seeded).
    ``aug`` "basic": both splits resized to S x S (the batch augmentation is ``augment``);
    "imagenet": training images through quadmamba.augment.TrainTransform (random resized
    crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25), held-out ones
    resized and centre-cropped (``eval_crop``, 0.875 when 0).
    """
    check_img_size(img_size)
    check_aug(aug)
    mean, std = folder_stats(in_chans)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        classes, train_samples = scan_folder(train_dir)
        val_classes, val_samples = scan_folder(val_dir)
        if val_classes != classes:
            raise DataError(f"{train_dir} and {val_dir} have different class folders: {classes} vs {val_classes}")
    else:
        classes, samples = scan_folder(root)
        labels = np.array([label for _, label in samples])
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        if len(val_idx) == 0:
            raise DataError(f"data folder {root} is too small for a held-out split "
                            "(every class needs at least 2 images)")
        train_samples = [samples[i] for i in train_idx]
        val_samples = [samples[i] for i in val_idx]
    if len(classes) < 2:
        raise DataError(f"data folder {root} has {len(classes)} class; a classifier needs at least 2")
    train_transform = None
    if aug == IMAGENET_AUG:
        from quadmamba.augment import RandAugment, TrainTransform

        eval_crop = eval_crop or IMAGENET_EVAL_CROP
        train_transform = TrainTransform(img_size, in_chans, mean, std, RandAugment(2, 9, 0.5), reprob=0.25)
    spec = DataSpec(os.path.abspath(root), img_size, in_chans, mean, std, classes, seed, val_fraction, eval_crop)
    return (FolderImages(train_samples, img_size, in_chans, mean, std, train_transform),
            FolderImages(val_samples, img_size, in_chans, mean, std, eval_transform(spec)), spec)


def check_aug(aug: str) -> str:
    if aug not in AUGS:
        raise DataError(f"--aug must be one of {', '.join(AUGS)}, got {aug!r}")
    return aug


def eval_transform(spec: DataSpec):
    """The held-out pipeline a DataSpec asks for: None (resize to S x S) or a centre crop."""
    if not spec.eval_crop:
        return None
    from quadmamba.augment import EvalTransform

    return EvalTransform(spec.img_size, spec.in_chans, spec.mean, spec.std, spec.eval_crop)


def build_datasets(source: Optional[str], img_size: int, in_chans: Optional[int], seed: int,
                   val_fraction: float = 0.2, aug: str = "basic"):
    """(train, held-out, DataSpec) for "digits"/None or a folder path (``aug``: see folder_datasets)."""
    check_aug(aug)
    if source in (None, DIGITS):
        if in_chans not in (None, 1):
            raise DataError("the digits are grey: they train with 1 input channel")
        if aug != "basic":
            raise DataError(f"--aug {aug} crops photos; the digits (8x8 pixels) train with --aug basic")
        return digits_datasets(img_size, seed, val_fraction)
    return folder_datasets(source, img_size, 3 if in_chans is None else in_chans, seed, val_fraction, aug)


def datasets_for_spec(spec: DataSpec, source: Optional[str] = None):
    """(train, held-out) rebuilt from a checkpoint's DataSpec, with the checkpoint's size,
    channels and normalisation.

    source None (or the training data itself): the checkpoint's own split. Another folder
    is test data: held-out = its val/ sub-folder when it has train/ and val/, else every
    image in it (train = None); its classes must be the checkpoint's.
    """
    if source == DIGITS and spec.source != DIGITS:
        raise DataError("this checkpoint was not trained on the digits")
    if source is None or source == DIGITS or _same_folder(source, spec.source):
        if spec.source == DIGITS:
            train, test, _ = digits_datasets(spec.img_size, spec.seed, spec.val_fraction)
            return train, test
        source = spec.source                                  # the training folder: its own split
    elif not (os.path.isdir(os.path.join(source, "train")) and os.path.isdir(os.path.join(source, "val"))):
        classes, samples = scan_folder(source)                # test data: every image
        _check_classes(spec, source, classes)
        return None, FolderImages(samples, spec.img_size, spec.in_chans, spec.mean, spec.std, eval_transform(spec))
    train, test, new = folder_datasets(source, spec.img_size, spec.in_chans, spec.seed, spec.val_fraction,
                                       eval_crop=spec.eval_crop)
    _check_classes(spec, source, new.classes)
    return train, test


def _same_folder(a: str, b: str) -> bool:
    return b != DIGITS and os.path.abspath(a) == os.path.abspath(b)


def _check_classes(spec: DataSpec, source: str, classes: List[str]) -> None:
    if spec.classes and classes != spec.classes:
        raise DataError(f"data folder {source} has classes {classes}, the checkpoint was trained on {spec.classes}")


def random_shift(images: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Translate each image by integers in [-max_shift, max_shift] on both axes; the border
    pixels are repeated into the uncovered margin."""
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])                     # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None])                     # (B, W)
    bidx = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]   # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment(images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Training augmentation: digits shift by up to img_size / 8 pixels (one pixel of the
    original 8x8 image; no flips, digits are not mirror-symmetric); folders shift by up to
    img_size / 16 pixels and flip left-right."""
    if spec.source == DIGITS:
        return random_shift(images, spec.img_size // 8)
    return random_hflip(random_shift(images, spec.img_size // 16))
