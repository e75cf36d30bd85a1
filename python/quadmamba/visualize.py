"""Drawing the quadtree partitions a trained model chooses (the paper's Fig. 6 / Fig. 10).

One panel per quadtree block: the input image with the block's windows outlined. Window ids
come from ``model.partition_maps`` (0..3 coarse quadrants, 4..7 the fine sub-windows of
the selected quadrant, in the image frame after the block's roll is undone); a border is
drawn wherever two neighbouring tokens have different ids, scaled by the stage's stride
(input pixels per token), so rolled windows that wrap around the image edge come out right.
The selected quadrant is tinted. A last panel shows the first block's locality score (log-probability of
"local"), min-max scaled.
"""
from __future__ import annotations

import io
import os
from typing import Optional, Tuple

import numpy as np

PANEL_INCHES = 3.0
DPI = 100
COARSE_COLOR = "#ffd400"
FINE_COLOR = "#ff2a2a"


def window_borders(windows: np.ndarray, stride: int) -> Tuple[list, list]:
    """Segments ((x0, y0), (x1, y1)) in input pixels between tokens of different windows.

    Args:
        windows: (H0, W0) window ids.
        stride: input pixels per token.

    Returns:
        (coarse, fine): borders between two coarse quadrants, and borders touching a fine
        sub-window (id >= 4).
    """
    coarse, fine = [], []
    height, width = windows.shape
    for y in range(height):
        for x in range(width - 1):
            a, b = windows[y, x], windows[y, x + 1]
            if a != b:
                seg = ((stride * (x + 1), stride * y), (stride * (x + 1), stride * (y + 1)))
                (fine if max(a, b) >= 4 else coarse).append(seg)
    for y in range(height - 1):
        for x in range(width):
            a, b = windows[y, x], windows[y + 1, x]
            if a != b:
                seg = ((stride * x, stride * (y + 1)), (stride * (x + 1), stride * (y + 1)))
                (fine if max(a, b) >= 4 else coarse).append(seg)
    return coarse, fine


def figure_size(num_quad_blocks: int) -> Tuple[int, int]:
    """(width, height) in pixels of the PNG that draw_partitions writes."""
    return int(round(PANEL_INCHES * (num_quad_blocks + 1) * DPI)), int(round((PANEL_INCHES + 0.5) * DPI))


def draw_partitions(path: str, image: np.ndarray, maps: list, title: str, index: int = 0) -> Tuple[int, int]:
    """Write the partition figure for sample ``index`` of ``maps``.

    Args:
        path: PNG file to write.
        image: (S, S) grey or (S, S, 3) RGB in [0, 1]: the model's input before normalisation.
        maps: the model's PartitionMap list (one per quad block).
        title: figure title.

    Returns:
        (width, height) of the PNG in pixels.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    size = image.shape[0], image.shape[1]
    n = len(maps)
    fig, axes = plt.subplots(1, n + 1, figsize=(PANEL_INCHES * (n + 1), PANEL_INCHES + 0.5), dpi=DPI)
    axes = np.atleast_1d(axes)
    cmap = "gray" if image.ndim == 2 else None
    for ax, pm in zip(axes[:n], maps):
        windows = pm.windows[index].cpu().numpy()
        ax.imshow(image, cmap=cmap, vmin=0, vmax=1, extent=(0, size[1], size[0], 0))
        selected = (windows >= 4).astype(float)
        tint = np.zeros(windows.shape + (4,))
        tint[..., 0], tint[..., 3] = 1.0, 0.22 * selected
        ax.imshow(tint, extent=(0, windows.shape[1] * pm.stride, windows.shape[0] * pm.stride, 0),
                  interpolation="nearest")
        coarse, fine = window_borders(windows, pm.stride)
        ax.add_collection(LineCollection(coarse, colors=COARSE_COLOR, linewidths=1.6))
        ax.add_collection(LineCollection(fine, colors=FINE_COLOR, linewidths=1.2))
        quadrant = ("TL", "TR", "BL", "BR")[int(pm.decision[index].argmax())]
        ax.set_title(f"stage {pm.stage} block {pm.block}\nshift {pm.shift}, refine {quadrant}", fontsize=9)
        ax.set_xlim(0, size[1])
        ax.set_ylim(size[0], 0)
        ax.axis("off")
    ax = axes[n]
    if n:
        score = maps[0].score[index].float().cpu().numpy()
        low, high = float(score.min()), float(score.max())
        scaled = (score - low) / (high - low) if high > low else np.zeros_like(score)
        im = ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1,
                       extent=(0, score.shape[1] * maps[0].stride, score.shape[0] * maps[0].stride, 0))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, ticks=(0, 0.5, 1))
        ax.set_title(f"stage {maps[0].stage} block {maps[0].block} locality score\n"
                     f"(min-max scaled, spread {high - low:.2g})", fontsize=9)
    ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.96, bottom=0.02, top=0.78, wspace=0.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return figure_size(n)


def sample_image_path(name: str, folder: str) -> str:
    """Save one of scikit-learn's bundled photos ("china" or "flower") as PNG in folder."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    names = [os.path.splitext(os.path.basename(f))[0] for f in photos.filenames]
    if name not in names:
        raise ValueError(f"--sample must be one of {names}, got {name!r}")
    path = os.path.join(folder, f"{name}.png")
    Image.fromarray(photos.images[names.index(name)]).save(path)
    return path


def visualize_checkpoint(checkpoint: str, image_path: str, output: str, *, img_size: Optional[int] = None,
                         kernels: Optional[str] = None, device: str = "cpu",
                         expect_model: Optional[str] = None) -> dict:
    """Run a checkpoint's model on one image and draw its partitions into ``output``.

    The image is resized to the checkpoint's training size (or ``img_size``) and converted to
    the checkpoint's channels. Returns the figure size and the per-block decisions.
    """
    from quadmamba.data import DataSpec, check_img_size, load_image, normalize
    from quadmamba.train import CheckpointError, load_checkpoint, resolve_device, restore_model

    state = load_checkpoint(checkpoint)
    if state["config"].get("quad_scan") != "quadtree":
        raise CheckpointError(f"checkpoint {checkpoint} uses the {state['config'].get('quad_scan')} scan "
                              "(ablation model): it has no quadtree partition to draw")
    spec = DataSpec.from_dict(state["data"])
    size = check_img_size(spec.img_size if img_size is None else img_size)
    dev = resolve_device(device)
    pixels = load_image(image_path, size, spec.in_chans)                      # (C, S, S) in [0, 1]
    model = restore_model(state, kernels, expect_model).to(dev)
    x = normalize(pixels[None], spec.mean, spec.std).to(dev)
    maps = model.partition_maps(x)
    logits = model(x)
    pred = int(logits.argmax(1))
    label = spec.classes[pred] if pred < len(spec.classes) else str(pred)
    shown = pixels[0].numpy() if spec.in_chans == 1 else pixels.permute(1, 2, 0).numpy()
    title = (f"{state['config'].get('name')} on {os.path.basename(image_path)} at {size}x{size} "
             f"(predicted class {label})")
    width, height = draw_partitions(output, shown, maps, title)
    return {"size": (width, height), "blocks": len(maps),
            "decisions": [("TL", "TR", "BL", "BR")[int(pm.decision[0].argmax())] for pm in maps],
            "predicted": label}
