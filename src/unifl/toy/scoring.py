"""The toy oracle as an image scorer for simulated annotators.

Simulated annotators (`unifl.labeling.annotators`) take a factory
`(params) -> scorer(paths, prompts) -> {dimension: scores}`; this is the toy
world's: it reads the images, segments them with the bootstrapped toy
segmenter (generated images have no ground-truth masks, and the layout score
needs masks) and returns the oracle metrics of `unifl.toy.oracle`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unifl.config import Params

ImageScorer = Callable[[Sequence[str | Path], Sequence[str]], dict[str, np.ndarray]]


def read_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """PNG files -> float [N, 3, H, W] in [0, 1]; an unreadable file is named."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read image: {exc}") from None
    stacked = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    return stacked.permute(0, 3, 1, 2).contiguous()


def image_scorer(params: Params) -> ImageScorer:
    """The oracle scorer of the toy world, with the segmenter of `params`' bootstrap."""
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.bootstrap import bootstrap_toy_world
    from unifl.toy.caption_match import predicted_masks
    from unifl.toy.oracle import oracle_scores

    segmenter = ToySegmenter.load(bootstrap_toy_world(params, progress=False).segmenter_dir)

    def score(paths: Sequence[str | Path], prompts: Sequence[str]) -> dict[str, np.ndarray]:
        images = read_images(paths)
        masks = predicted_masks(segmenter, images)
        scores = oracle_scores(images, list(prompts), masks)
        return {dimension: values.numpy() for dimension, values in scores.items()}

    return score
