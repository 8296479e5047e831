"""Pairs directories for the labeling tests: flat-colour images and their pair manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from unifl.labeling.tasks import write_pair_manifest

Colour = tuple[int, int, int]


def write_pair_directory(
    directory: Path, colours: Sequence[tuple[Colour, Colour]], size: int = 8
) -> list[dict]:
    """Pair `i` of `directory` shows `colours[i]` (image A, image B) as flat `size` px images;
    returns the manifest rows it writes."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, pair in enumerate(colours):
        for side, colour in zip("ab", pair, strict=True):
            Image.new("RGB", (size, size), colour).save(directory / "images" / f"p{i}_{side}.png")
        rows.append(
            {
                "pair_id": f"p{i}",
                "prompt": f"prompt {i}",
                "image_a": f"images/p{i}_a.png",
                "image_b": f"images/p{i}_b.png",
                "seed_a": 2 * i,
                "seed_b": 2 * i + 1,
                "model_version": "toy-test",
                "steps": 2,
                "guidance_scale": 7.5,
                "timestep_spacing": "leading",
            }
        )
    write_pair_manifest(directory, rows)
    return rows
