"""Model throughput and latency: the fused kernels and the plain-PyTorch reference ops
timed side by side in one run (same model weights, same input)."""
from __future__ import annotations

import time
from typing import Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(model, x: torch.Tensor, *, train: bool, warmup: int, iters: int,
               max_seconds: float) -> List[float]:
    """Seconds per call (forward, or forward + backward with ``train``), after warm-up;
    stops early once ``max_seconds`` of timed calls have run (at least one call)."""
    device = x.device
    model.train(train)
    times: List[float] = []

    def step():
        if train:
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)

    for _ in range(warmup):
        step()
    _sync(device)
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > max_seconds:
            break
    return times


def benchmark(name: str, *, batch_size: int, img_size: int, device: torch.device, train: bool = False,
              warmup: int = 2, iters: int = 10, max_seconds: float = 30.0, amp: bool = False,
              num_classes: int = 1000) -> Dict[str, dict]:
    """{kernels: {"ms": median ms per batch, "img_s": images/s, "runs": n} or {"error": why}}."""
    import quadmamba
    from quadmamba.train import check_kernels

    torch.manual_seed(0)
    reference = quadmamba.create_model(name, num_classes=num_classes, kernels="reference").to(device)
    x = torch.randn(batch_size, reference.config.in_chans, img_size, img_size, device=device)
    results: Dict[str, dict] = {}
    for kernels in ("fused", "reference"):
        if kernels == "fused":
            try:
                check_kernels(kernels)
            except ValueError as exc:
                results[kernels] = {"error": str(exc)}
                continue
        if kernels == "fused":
            model = quadmamba.create_model(name, num_classes=num_classes, kernels="fused").to(device)
            model.load_state_dict(reference.state_dict())
        else:
            model = reference
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            times = time_model(model, x, train=train, warmup=warmup, iters=iters, max_seconds=max_seconds)
        median = sorted(times)[len(times) // 2]
        results[kernels] = {"ms": 1e3 * median, "img_s": batch_size / median, "runs": len(times)}
    return results


def format_results(results: Dict[str, dict]) -> List[str]:
    lines = [f"{'kernels':<10} {'ms/batch':>10} {'images/s':>10} {'runs':>5}"]
    for kernels, r in results.items():
        if "error" in r:
            lines.append(f"{kernels:<10} {r['error']}")
        else:
            lines.append(f"{kernels:<10} {r['ms']:>10.2f} {r['img_s']:>10.1f} {r['runs']:>5}")
    fused, ref = results.get("fused", {}), results.get("reference", {})
    if "ms" in fused and "ms" in ref:
        lines.append(f"fused speed-up over reference: {ref['ms'] / fused['ms']:.2f}x")
    else:
        lines.append("fused speed-up over reference: n/a (fused kernels unavailable)")
    return lines
