"""The ``quadmamba`` command: argument parsing and dispatch.

    quadmamba train      train a classifier (default: quadmamba_nano on the bundled digits, CPU)
    quadmamba eval       top-1 / top-5 and a confusion-matrix PNG of a checkpoint
    quadmamba visualize  the quadtree partitions a checkpoint picks on an image (PNG)
    quadmamba bench      throughput and latency, fused kernels vs reference ops
    quadmamba info       variants table and the kernels of this install
    quadmamba ablation   the same small model trained with the quadtree scan and the raster scan

Bad input ends with one line ``quadmamba: error: ...`` on stderr and exit status 1 (2 for
malformed arguments); set QUADMAMBA_TRACEBACK=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional

DEFAULT_OUTPUT = "runs/quadmamba"
DIGITS_IMG_SIZE = 32
FOLDER_IMG_SIZE = 224


class CommandError(Exception):
    """A problem with the command's input, reported as one line."""


# ---------------------------------------------------------------------------------------------
# argument definitions
# ---------------------------------------------------------------------------------------------
def _integer_at_least(minimum: int, word: str):
    """An argparse type: an integer >= minimum (word: how the message names such integers)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {word} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {word} integer, got {value}")
        return value
    return parse


_positive_int = _integer_at_least(1, "positive")
_non_negative_int = _integer_at_least(0, "non-negative")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _add_train_options(p: argparse.ArgumentParser, *, ablation: bool) -> None:
    """Training options; defaults are None here and resolved from TrainConfig, so an explicit
    option can be told apart from a default (needed by --resume)."""
    p.add_argument("--model", help="variant name (default quadmamba_nano; see `quadmamba info`)")
    p.add_argument("--data", help="ImageFolder directory (class per sub-folder, or train/ and val/ "
                                  "sub-folders); default (or 'digits' where no such folder exists): "
                                  "scikit-learn's bundled digits")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default 20)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="batch size (default 64); under torchrun the global batch, split across the processes")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up, in epochs (default 1; at most half the run)")
    p.add_argument("--label-smoothing", type=float, help="default 0.1")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the variant's)")
    p.add_argument("--clip-grad", type=float, help="gradient-norm clip, 0 = off (default 5)")
    p.add_argument("--ema", type=float, dest="ema_decay", help="EMA decay of the weights, 0 = off (default 0)")
    p.add_argument("--img-size", type=int, help=f"square input size, a multiple of 32 (default {DIGITS_IMG_SIZE} "
                                                f"for the digits, {FOLDER_IMG_SIZE} for folders)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--seed", type=_non_negative_int,
                   help="seed of the split, initialisation and data order (default 0)")
    p.add_argument("--kernels", choices=("fused", "reference"),
                   help="fused kernels or the plain-PyTorch reference ops (default fused)")
    if not ablation:
        p.add_argument("--quad-scan", choices=("quadtree", "raster"),
                       help="quadtree scan (default) or the raster-scan ablation (same parameters)")
    p.add_argument("--val-fraction", type=float, help="held-out share of the split (default 0.2)")
    p.add_argument("--train-limit", type=_non_negative_int, help="use only the first N training images (quick runs)")
    p.add_argument("--test-limit", type=_non_negative_int, help="use only the first N held-out images (quick runs)")
    p.add_argument("--workers", type=_non_negative_int, help="data-loading processes (default 0)")
    p.add_argument("--aug", choices=("basic", "imagenet"),
                   help="basic (default): images resized to the input size, batches shifted (and flipped for "
                        "folders); imagenet: random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1 and "
                        "random erasing 0.25 per image, held-out images resized to size/0.875 and centre-cropped")
    p.add_argument("--mixup", type=float, help="mixup alpha, 0 = off (default 0; the paper: 0.8)")
    p.add_argument("--cutmix", type=float, help="CutMix alpha, 0 = off (default 0; the paper: 1.0); with both, "
                                                "each batch takes one of the two at even odds")
    p.add_argument("--recipe", choices=("paper",),
                   help="paper: the ImageNet recipe of the paper as defaults (300 epochs, 20 warm-up, AdamW lr "
                        "1e-3 per 1024 images of --batch-size, weight decay 0.05, --aug imagenet, mixup 0.8, "
                        "cutmix 1.0, label smoothing 0.1, EMA 0.9999, gradient clip 5); other options override")
    p.add_argument("--output", "-o", default=None,
                   help=f"run directory (default {DEFAULT_OUTPUT}{'-ablation' if ablation else ''})")
    p.add_argument("--force", action="store_true", help="overwrite a previous run in --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quadmamba", description="QuadMamba: train, evaluate, visualise and benchmark quadtree-scan "
                                      "vision state-space models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a classifier; writes checkpoint.pt, metrics.csv, curves.png",
                       description="Train a QuadMamba classifier. With no arguments: quadmamba_nano on "
                                   "scikit-learn's digits (8x8 upscaled to 32x32, 1 channel, stratified "
                                   "20% held out with seed 0) on the CPU. Data-parallel on several "
                                   "processes: torchrun --nproc-per-node N -m quadmamba train ...")
    _add_train_options(p, ablation=False)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last completed epoch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 and a confusion-matrix PNG of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `quadmamba train`")
    p.add_argument("--data", help="test images: an ImageFolder directory, every image scored (its val/ "
                                  "when it has train/ and val/); default: the checkpoint's own held-out split")
    p.add_argument("--output", "-o", help="confusion-matrix PNG (default: confusion.png beside the checkpoint)")
    p.add_argument("--model", help="refuse a checkpoint of another variant")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernels", choices=("fused", "reference"), default="fused")
    p.add_argument("--test-limit", type=_non_negative_int, default=0,
                   help="use only the first N test images (default 0: all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("visualize", help="draw the quadtree partitions a checkpoint picks on an image")
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (any size; resized to the model's input size)")
    src.add_argument("--sample", help="one of scikit-learn's bundled photos: china or flower")
    p.add_argument("--output", "-o", default="partitions.png", help="PNG to write (default partitions.png)")
    p.add_argument("--img-size", type=int, help="input size (default: the checkpoint's training size)")
    p.add_argument("--model", help="refuse a checkpoint of another variant")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernels", choices=("fused", "reference"), default="fused")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("bench", help="throughput and latency: fused kernels vs reference ops")
    p.add_argument("--model", default="quadmamba_nano")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--warmup", type=_positive_int, default=2,
                   help="untimed calls of each model first (at least 1: a first call carries one-time costs, "
                        "such as loading the ops, that would distort the comparison)")
    p.add_argument("--iters", type=_positive_int, default=10)
    p.add_argument("--max-seconds", type=_positive_seconds, default=30.0, help="time budget per kernel set")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="variants table and the kernels of this install")
    p.add_argument("--img-size", type=int, default=224, help="input size for GFLOPs and shapes")
    p.add_argument("--model", action="append", help="only this variant (repeatable; default all)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ablation", help="train the same model with the quadtree scan and the raster scan",
                       description="Train one model twice with identical settings and seed: quadtree scan "
                                   "vs raster scan (same parameters); print both held-out accuracies. "
                                   "Runs go to OUTPUT/quadtree and OUTPUT/raster.")
    _add_train_options(p, ablation=True)
    p.set_defaults(func=cmd_ablation)
    return parser


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
_TRAIN_KEYS = ("model", "data", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
               "label_smoothing", "drop_path", "clip_grad", "ema_decay", "img_size", "device", "amp",
               "seed", "kernels", "quad_scan", "val_fraction", "train_limit", "test_limit", "workers",
               "aug", "mixup", "cutmix")

# --recipe paper: the paper's ImageNet recipe (DeiT's), as defaults under the explicit options;
# the learning rate is PAPER_LR per PAPER_LR_BATCH images of the global batch.
PAPER_RECIPE = dict(epochs=300, warmup_epochs=20.0, weight_decay=0.05, aug="imagenet", mixup=0.8, cutmix=1.0,
                    label_smoothing=0.1, ema_decay=0.9999, clip_grad=5.0)
PAPER_LR, PAPER_LR_BATCH = 1e-3, 1024


def _explicit(args) -> dict:
    return {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k, None) is not None}


def _train_config(args, **fixed):
    from quadmamba.data import DIGITS
    from quadmamba.train import TrainConfig

    given = _explicit(args)
    given.update(fixed)
    if getattr(args, "recipe", None) == "paper":
        batch = given.get("batch_size", TrainConfig.batch_size)
        given = {**PAPER_RECIPE, "lr": PAPER_LR * batch / PAPER_LR_BATCH, **given}
    if "model" in given:
        _check_model(given["model"])
    data = _data_source(given.get("data"))
    if data is not None:
        given["data"] = data
        if data != DIGITS:
            given.setdefault("img_size", FOLDER_IMG_SIZE)
    return TrainConfig(**given)


def _data_source(data: Optional[str]) -> Optional[str]:
    """--data as the library takes it: a folder as its absolute path (a folder named "digits"
    included), "digits" for the bundled digits where no such folder exists, None if absent."""
    from quadmamba.data import DIGITS

    if data is None:
        return None
    if os.path.isdir(data):
        return os.path.abspath(data)
    if data == DIGITS:
        return DIGITS
    raise CommandError(f"data folder not found: {data}")


def _check_model(name: str) -> None:
    import quadmamba

    if name not in quadmamba.list_models():
        raise CommandError(f"unknown model {name!r}; choose from {', '.join(quadmamba.list_models())}")


def cmd_train(args) -> int:
    from quadmamba.train import run_training

    if args.resume:
        extra = sorted(set(_explicit(args)) - {"device"}) + (["recipe"] if args.recipe else [])
        if extra:
            raise CommandError("--resume continues with the checkpoint's settings; drop "
                               + ", ".join("--" + k.replace("_", "-") for k in extra))
        if args.force:
            raise CommandError("--resume and --force exclude each other")
        from quadmamba.train import TrainConfig

        cfg = TrainConfig(device=args.device) if args.device else None
    else:
        cfg = _train_config(args)
    run_training(cfg, args.output or DEFAULT_OUTPUT, resume=args.resume, force=args.force)
    return 0


def cmd_ablation(args) -> int:
    from quadmamba.distributed import launched_group
    from quadmamba.train import CHECKPOINT_NAME, run_training

    main = launched_group().main
    output = args.output or DEFAULT_OUTPUT + "-ablation"
    results = {}
    configs = {scan: _train_config(args, quad_scan=scan) for scan in ("quadtree", "raster")}
    done = [scan for scan in configs if os.path.exists(os.path.join(output, scan, CHECKPOINT_NAME))]
    if done and not args.force:
        raise CommandError(f"{output} already holds an ablation run ({', '.join(done)}); "
                           "pass --force to start over, or another --output")
    for scan, cfg in configs.items():
        if main:
            print(f"== {scan} scan ==")
        results[scan] = run_training(cfg, os.path.join(output, scan), force=args.force)
    if not main:   # under torchrun process 0 reports
        return 0
    cfg = configs["quadtree"]
    print(f"\nablation: {cfg.model}, {cfg.epochs} epochs, seed {cfg.seed}, held-out top-1")
    print(f"{'scan':<10} {'accuracy':>9} {'correct':>9} {'seconds':>8}")
    for scan, r in results.items():
        print(f"{scan:<10} {100 * r['test_acc']:>8.2f}% {r['correct']:>4}/{r['count']:<4} {r['seconds_total']:>8.1f}")
    return 0


def _check_png_output(path: str) -> None:
    if os.path.isdir(path):
        raise CommandError(f"--output {path} is a directory; give a .png file name")
    if not path.lower().endswith(".png"):
        raise CommandError(f"--output {path}: the picture is written as PNG; give a .png file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"cannot write {path}: folder {folder} is not writable")


def cmd_eval(args) -> int:
    from quadmamba.distributed import launched_group
    from quadmamba.train import evaluate_checkpoint, plot_confusion

    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "confusion.png")
    _check_png_output(output)
    if args.model is not None:
        _check_model(args.model)
    r = evaluate_checkpoint(args.checkpoint, _data_source(args.data), device=args.device, kernels=args.kernels,
                            batch_size=args.batch_size, test_limit=args.test_limit, expect_model=args.model)
    if not launched_group().main:   # under torchrun process 0 reports the group's result
        return 0
    plot_confusion(output, r["confusion"], r["classes"],
                   f"{r['model']}: top-1 {100 * r['top1']:.2f}% on {r['count']} images")
    print(f"top-1 {100 * r['top1']:.2f}% ({r['correct']}/{r['count']})  top-5 {100 * r['top5']:.2f}%  "
          f"loss {r['loss']:.4f}")
    print(f"confusion matrix: {output}")
    return 0


def cmd_visualize(args) -> int:
    from quadmamba.visualize import sample_image_path, visualize_checkpoint

    _check_png_output(args.output)
    if args.model is not None:
        _check_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        image = sample_image_path(args.sample, tmp) if args.sample else args.image
        r = visualize_checkpoint(args.checkpoint, image, args.output, img_size=args.img_size,
                                 kernels=args.kernels, device=args.device, expect_model=args.model)
    print(f"{r['blocks']} quadtree blocks, refined quadrants {' '.join(r['decisions'])}; "
          f"predicted class {r['predicted']}")
    print(f"wrote {args.output} ({r['size'][0]}x{r['size'][1]})")
    return 0


def cmd_bench(args) -> int:
    import torch

    from quadmamba.bench import benchmark, format_results
    from quadmamba.data import check_img_size
    from quadmamba.train import resolve_device

    _check_model(args.model)
    check_img_size(args.img_size)
    device = resolve_device(args.device)
    mode = "train (forward+backward)" if args.train else "inference"
    print(f"{args.model}, batch {args.batch_size}, {args.img_size}x{args.img_size}, {mode}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if device.type == "cpu":
        from quadmamba.allocator import describe_allocator
        from quadmamba.layers.common import linear_route

        if not args.amp:
            print(f"float32 Linears: fused {linear_route()}, reference F.linear")
        print(f"CPU allocator: {describe_allocator()}")
    results = benchmark(args.model, batch_size=args.batch_size, img_size=args.img_size, device=device,
                        train=args.train, warmup=args.warmup, iters=args.iters, max_seconds=args.max_seconds,
                        amp=args.amp)
    for line in format_results(results):
        print(line)
    return 0


def cmd_info(args) -> int:
    import quadmamba
    from quadmamba.data import check_img_size
    from quadmamba.info import format_variants, kernel_status, variant_rows

    check_img_size(args.img_size)
    for name in args.model or ():
        _check_model(name)
    print(f"quadmamba {quadmamba.__version__}")
    for line in format_variants(variant_rows(args.img_size, args.model), args.img_size):
        print(line)
    print()
    for line in kernel_status():
        print(line)
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("QUADMAMBA_TUNE_ALLOCATOR", "1") != "0":
        from quadmamba.allocator import tune_allocator

        tune_allocator()   # large buffers reused instead of page-faulted on every call
    if os.environ.get("QUADMAMBA_TRACEBACK"):
        return args.func(args)
    import torch

    from quadmamba.train import TrainingError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("quadmamba: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        print(f"quadmamba: error: this command needs the optional package {exc.name!r}: "
              "pip install 'quadmamba[cli]'", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print("quadmamba: error: out of memory; lower --batch-size or --img-size", file=sys.stderr)
        return 1
    except (CommandError, ValueError, OSError, TrainingError) as exc:
        print(f"quadmamba: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
