"""Sample grids: the same prompts and seeds side by side, one labelled row per model.

People judge a fine-tune by looking at it, so every evaluation writes a grid
of before/after samples. Columns are prompts (the prompt printed above,
wrapped), rows are models or step counts (the label printed on the left).
Toy images are 32 px; each cell is drawn `cell_inches` wide with nearest
interpolation so pixels stay crisp instead of blurred.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from unifl.io import atomic_path


class GridError(ValueError):
    """Grid rows and prompts do not fit together."""


def _to_numpy(images: Tensor, label: str, count: int) -> np.ndarray:
    if images.ndim != 4 or images.shape[1] != 3:
        raise GridError(f"row {label!r}: images must be [N, 3, H, W], got {list(images.shape)}")
    if images.shape[0] != count:
        raise GridError(f"row {label!r}: {images.shape[0]} images for {count} prompts")
    array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return array


def save_comparison_grid(
    rows: Mapping[str, Tensor],
    prompts: Sequence[str],
    path: str | Path,
    title: str | None = None,
    cell_inches: float = 1.6,
    dpi: int = 100,
    wrap_chars: int = 22,
) -> Path:
    """Write a PNG grid: one row per label in `rows` (images [N, 3, H, W] in [0, 1]),
    one column per prompt. Returns the path. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise GridError("a grid needs at least one row")
    if not prompts:
        raise GridError("a grid needs at least one prompt")
    arrays = {label: _to_numpy(images, label, len(prompts)) for label, images in rows.items()}
    num_rows, num_cols = len(arrays), len(prompts)
    # Row labels are drawn at 9 pt, about 0.075 inches a character.
    label_inches = max(1.2, 0.075 * max(len(label) for label in arrays) + 0.2)
    header_inches, margin_inches = 1.0 + (0.3 if title else 0.0), 0.1
    figure = Figure(
        figsize=(
            label_inches + num_cols * cell_inches + margin_inches,
            header_inches + num_rows * cell_inches + margin_inches,
        ),
        dpi=dpi,
    )
    FigureCanvasAgg(figure)
    width, height = figure.get_size_inches()
    for row, (label, images) in enumerate(arrays.items()):
        for col in range(num_cols):
            left = (label_inches + col * cell_inches) / width
            bottom = 1 - (header_inches + (row + 1) * cell_inches - 0.04 * cell_inches) / height
            axes = figure.add_axes(
                (left, bottom, cell_inches / width * 0.96, cell_inches / height * 0.96)
            )
            axes.imshow(images[col], interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                wrapped = "\n".join(
                    textwrap.wrap(prompts[col], wrap_chars, max_lines=5, placeholder=" ...")
                )
                axes.set_title(wrapped, fontsize=7, loc="center")
            if col == 0:
                axes.set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
    if title:
        figure.suptitle(title, fontsize=10, y=1 - 0.1 / height)
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return target
