"""What this install offers: the variants (parameters, GFLOPs, stage shapes, computed from
the models themselves) and which kernels are built and usable."""
from __future__ import annotations

from typing import List, Optional


def variant_rows(img_size: int = 224, names: Optional[List[str]] = None) -> List[dict]:
    """One row per variant: params (ImageNet classifier), GFLOPs at img_size, stage shapes."""
    import quadmamba

    rows = []
    for name in names or quadmamba.list_models():
        model = quadmamba.create_model(name, kernels="reference")
        cfg = model.config
        side, shapes = -(-img_size // 4), []
        for dim in cfg.dims:
            shapes.append(f"{side}x{side}x{dim}")
            side = -(-side // 2)
        rows.append({"name": name, "params": quadmamba.count_params(model),
                     "gflops": quadmamba.count_flops(model, img_size), "depths": cfg.depths,
                     "ssm_ratio": cfg.ssm_ratio, "stages": shapes,
                     "quad_stages": cfg.quad_stages})
    return rows


def format_variants(rows: List[dict], img_size: int) -> List[str]:
    head = f"{'variant':<16} {'params':>12} {f'GFLOPs@{img_size}':>11} {'depths':<10} {'ssm':>4}  stage outputs (HxWxC)"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<16} {r['params']:>12,} {r['gflops']:>11.3f} "
                     f"{','.join(map(str, r['depths'])):<10} {r['ssm_ratio']:>4g}  {'  '.join(r['stages'])}")
    return lines


def kernel_status() -> List[str]:
    """Lines describing the fused ops, the compiled core and CUDA."""
    import torch

    lines = []
    try:
        from quadmamba._backend import core
        core()
    except ImportError as exc:
        lines.append(f"compiled core: not importable ({str(exc).splitlines()[0][:120]})")
        lines.append("CPU kernels: no; CUDA kernels: no")
    else:
        import quadmamba
        lines.append("compiled core: yes")
        cuda = quadmamba.cuda_status()
        lines.append(f"CPU kernels: yes; CUDA kernels built: {'yes' if cuda['built'] else 'no'}; "
                     f"CUDA usable now: {'yes' if cuda['usable'] else 'no'}")
        if cuda["built"]:
            lines.append(f"CUDA runtime (linked in): {cuda['runtime']}; NVIDIA driver supports CUDA: "
                         f"{cuda['driver'] or 'no driver'}; devices: {cuda['devices']}")
        if cuda["reason"] is not None:
            lines.append(f"CUDA: {cuda['reason']}")
        isa = core().cpu_isa()
        lines.append(f"CPU instruction sets: selective scan {isa['selective_scan']}, quad scan {isa['quad_scan']} "
                     f"(QUADMAMBA_CPU_NO_AVX512=1 holds the scan at AVX2, QUADMAMBA_CPU_GENERIC=1 turns AVX off, "
                     f"=2 all x86 intrinsics); threads: {torch.get_num_threads()}")
    from quadmamba.layers.common import linear_route
    lines.append("float32 CPU Linears of the fused models: " + linear_route())
    from quadmamba.allocator import describe_allocator
    lines.append("CPU allocator: " + describe_allocator())
    lines.append(f"torch {torch.__version__}; CUDA device visible to torch: "
                 f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    lines.append("reference kernels (plain PyTorch): always available")
    return lines
