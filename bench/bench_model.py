"""Model throughput: images/s for inference and for a training step, fused kernels next to
the plain-PyTorch reference kernels, measured side by side in one run.

    python bench/bench_model.py --variants t --batches 1 16 --device cpu
    python bench/bench_model.py --variants li t s b --batches 1 16 --device cuda --img-size 224
    python bench/bench_model.py --variants t --kernels fused compiled reference
    python bench/bench_model.py --variants t --kernels fused fused-flinear reference
    python bench/bench_model.py --variants t li --batches 16 --compare-allocator

Columns: images/s per kernel set and each set's ratio to the reference. The kernel sets are timed
in turns (one call of each per round, median of the rounds), so drifts of the machine reach
every set alike. A training step is forward + cross-entropy backward + SGD step in train mode
(Gumbel decisions). Kernel sets: fused (the package's kernels; on the CPU its float32 Linears
through oneDNN, see quadmamba.layers.common.Linear), fused-flinear (the same model with every
Linear on F.linear: the oneDNN route's share), compiled (fused under torch.compile), reference
(the plain-PyTorch ops and F.linear). On the CPU the run keeps large freed buffers for reuse
(quadmamba.tune_allocator(), as the quadmamba command does; --allocator default: glibc's
settings, under which every large buffer page-faults on every call); --compare-allocator times
each row under both settings, in child processes taking turns.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

# The source tree's package where it holds a built module (the development build); otherwise
# the installed one.
_SOURCE = Path(__file__).resolve().parents[1] / "python"
if any((_SOURCE / "quadmamba").glob("_C*")):
    sys.path.insert(0, str(_SOURCE))
import quadmamba  # noqa: E402
from quadmamba.allocator import describe_allocator  # noqa: E402
from quadmamba.layers.common import Linear, linear_route  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_allocator_option, apply_allocator, time_interleaved  # noqa: E402


def make_step(name: str, kernels: str, batch: int, mode: str, args, device: torch.device):
    """One inference call or one training step of a fresh model (seed 0) on a random batch.
    kernels "compiled": the fused model under torch.compile (compiled during the warm-up);
    "fused-flinear": the fused model with its Linears on F.linear."""
    torch.manual_seed(0)
    model = quadmamba.create_model(name, kernels="reference" if kernels == "reference" else "fused").to(device)
    if kernels == "fused-flinear":
        for module in model.modules():
            if isinstance(module, Linear):
                module.fused = False
    if kernels == "compiled":
        torch._dynamo.reset()  # a fresh compile per row (no recompile limit reached across rows)
        model = torch.compile(model)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                model(x)
        return step
    model.train()
    target = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return step


def time_row(name: str, batch: int, mode: str, kernels, args, device: torch.device) -> dict:
    """Seconds per call of each kernel set on one row, timed in turns (median of the rounds)."""
    steps = {k: make_step(name, k, batch, mode, args, device) for k in kernels}
    return time_interleaved(steps, device, warmup=args.warmup, reps=args.iters, max_seconds=args.max_seconds)


def describe_run(args, device: torch.device) -> str:
    """The first header line: versions, device, image size, autocast."""
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return (f"torch {torch.__version__}, python {platform.python_version()}, device {device} ({where}), "
            f"image {args.img_size}x{args.img_size}, autocast {args.amp}")


def compare_allocator(args, names, kernels) -> None:
    """Each row under glibc's default settings and under quadmamba.tune_allocator(), in child
    processes taking turns (`--rounds` of each; the median of their medians), with the peak
    resident memory of each child (model, batch and every kernel set it ran)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"{describe_run(args, torch.device('cpu'))}; {args.rounds} rounds of child processes")
    print("default: glibc's malloc settings; tuned: quadmamba.tune_allocator()")
    header = f"{'variant':<16}{'batch':>6} {'mode':<6}" + "".join(
        f"{k + ' img/s default':>{len(k) + 18}}{'tuned':>9}{'tuned/default':>15}" for k in kernels)
    header += f"{'peak RSS MB default':>21}{'tuned':>8}"
    print(header)
    print("-" * len(header))
    passed = ["--device", "cpu", "--kernels", *kernels, "--img-size", str(args.img_size), "--amp", args.amp,
              "--warmup", str(args.warmup), "--iters", str(args.iters), "--max-seconds", str(args.max_seconds)]
    if args.threads:
        passed += ["--threads", str(args.threads)]
    for name in names:
        for batch in args.batches:
            for mode in args.modes:
                runs = {"default": [], "tuned": []}
                for _ in range(args.rounds):
                    for allocator in runs:
                        cmd = [sys.executable, __file__, "--child", "--variants", name, "--batches", str(batch),
                               "--modes", mode, "--allocator", allocator, *passed]
                        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                        if proc.returncode != 0:
                            sys.exit(f"the {allocator} child of {name}, batch {batch}, {mode} failed:\n"
                                     f"{proc.stderr[-2000:]}")
                        runs[allocator].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                line = f"{name:<16}{batch:>6} {mode:<6}"
                for k in kernels:
                    sec = {a: statistics.median(r["seconds"][k] for r in runs[a]) for a in runs}
                    line += (f"{batch / sec['default']:>{len(k) + 18}.2f}{batch / sec['tuned']:>9.2f}"
                             f"{sec['default'] / sec['tuned']:>14.2f}x")
                rss = {a: max(r["maxrss_mb"] for r in runs[a]) for a in runs}
                line += f"{rss['default']:>21.0f}{rss['tuned']:>8.0f}"
                print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["li", "t", "s", "b"],
                        help="variants (li t s b nano)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--kernels", nargs="+", default=["fused", "reference"],
                        choices=["fused", "fused-flinear", "reference", "compiled"],
                        help="kernel sets; fused-flinear: the fused model with its Linears on F.linear; "
                             "compiled: the fused model under torch.compile (the reference model's "
                             "step-by-step scans are not practical to compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="autocast dtype for every kernel set (the scan itself stays float32)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="time budget per row (the kernel sets are timed in turns)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    add_allocator_option(parser)
    parser.add_argument("--compare-allocator", action="store_true",
                        help="time every row under both allocator settings, in child processes taking turns")
    parser.add_argument("--rounds", type=int, default=3, help="--compare-allocator: rounds of the child processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.compare_allocator:   # (compared: each child process sets its own)
        tuned = apply_allocator(args.allocator)
        if args.child and args.allocator == "tuned" and not tuned:
            sys.exit(f"cannot tune the allocator here: {describe_allocator()}")
    device = torch.device(args.device)
    names = [v if v.startswith("quadmamba_") else f"quadmamba_{v}" for v in args.variants]
    for name in names:
        if name not in quadmamba.list_models():
            parser.error(f"unknown variant {name!r}; valid: {quadmamba.list_models()}")
    kernels = list(args.kernels)
    if args.child:   # one row, timed; the parent (--compare-allocator) reads the JSON line
        (name,), (batch,), (mode,) = names, args.batches, args.modes
        seconds = time_row(name, batch, mode, kernels, args, device)
        print(json.dumps({"seconds": seconds, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    if args.compare_allocator:
        if device.type != "cpu":
            parser.error("--compare-allocator compares CPU allocator settings: use --device cpu")
        compare_allocator(args, names, kernels)
        return
    print(describe_run(args, device))
    if device.type == "cpu" and args.amp == "none":
        print(f"float32 Linears: fused {linear_route()}; compiled, fused-flinear and reference F.linear")
    if device.type == "cpu":
        print(f"CPU allocator: {describe_allocator()}")
    ratios = [k for k in kernels if k != "reference"] if "reference" in kernels else []
    width = {k: max(18, len(k) + 8) for k in kernels}                 # columns: images/s, ratio
    ratio_width = {k: max(14, len(k) + 6) for k in ratios}
    header = f"{'variant':<16}{'batch':>6} {'mode':<6}" + "".join(f"{k + ' img/s':>{width[k]}}" for k in kernels)
    header += "".join(f"{k + '/ref':>{ratio_width[k]}}" for k in ratios)
    print(header)
    print("-" * len(header))
    for name in names:
        for batch in args.batches:
            for mode in args.modes:
                seconds = time_row(name, batch, mode, kernels, args, device)
                line = f"{name:<16}{batch:>6} {mode:<6}" + "".join(f"{batch / seconds[k]:>{width[k]}.2f}"
                                                                    for k in kernels)
                line += "".join(f"{seconds['reference'] / seconds[k]:>{ratio_width[k] - 1}.2f}x" for k in ratios)
                print(line, flush=True)


if __name__ == "__main__":
    main()
