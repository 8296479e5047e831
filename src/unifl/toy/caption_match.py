"""Caption-match: does an image show the objects its caption names?

Rule: each connected region of object pixels in the semantic mask takes its
majority class (`unifl.toy.oracle.clean_semantic_masks`); an object of the
caption ("a small red circle") is *matched* when the cleaned mask holds at
least ``min_area_fraction * H * W`` pixels of its class (the (shape, colour)
pair; the size word and the relations are not checked here, the layout
oracle checks relations). The majority vote keeps a segmenter that hedges
between shapes from matching two objects with one region. For generated images the mask is
the toy segmenter's prediction. The rate is matched objects over all caption
objects, pooled over the images; `per_image` is each image's own share.

Extra objects: caption-match counts an object as found when any region of its
class is large enough, so an image that scatters fragments of its objects
about scores no worse than a clean one. `extra_objects` is, per image, the
number of object regions (at least ``min_area_fraction * H * W`` pixels, after
the majority vote) beyond the number of objects the caption names, or 0:
ground-truth toy images score 0.

Misses by kind: a caption object that is not matched is a *wrong shape* when
a large-enough region of its colour is there as another shape, a *wrong
colour* when its shape is there in another colour (both can hold), so that a
rate below the ceiling says whether the model loses shapes or colours.

Chance level: an image that shows other objects than its caption's (or no
objects) matches only through segmentation errors; with captions shuffled
across ground-truth toy images a perfect segmenter matches about 1 object in 6
(the probability that a random class is among a scene's 1-3 classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unifl.models.segmenter import ToySegmenter, as_image_tensor
from unifl.toy.oracle import (
    MIN_OBJECT_AREA_FRACTION,
    clean_semantic_masks,
    mask_statistics,
    object_region_counts,
)
from unifl.toy.vocabulary import COLORS, SHAPES
from unifl.toy.world import CaptionError, parse_caption, semantic_class


@dataclass
class CaptionMatch:
    """rate: matched / all caption objects; per_image: float [N]; matched, total: counts;
    objects: float [N], the objects each caption names; extra_objects: float [N], object
    regions beyond them; wrong_shape, wrong_colour: counts of the missed objects whose colour
    (shape) is there as another shape (in another colour)."""

    rate: float
    per_image: torch.Tensor
    matched: int
    total: int
    objects: torch.Tensor
    extra_objects: torch.Tensor
    wrong_shape: int
    wrong_colour: int


@torch.no_grad()
def predicted_masks(
    segmenter: ToySegmenter, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """The segmenter's semantic masks (long [N, H, W], on the CPU) of images [N, 3, H, W]."""
    images = as_image_tensor(images)
    device = next(segmenter.parameters()).device
    was_training = segmenter.training
    segmenter.eval()
    try:
        parts = [
            segmenter.predict(images[start : start + batch_size].to(device)).cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        segmenter.train(was_training)
    if not parts:
        return torch.zeros((0, *images.shape[-2:]), dtype=torch.long)
    return torch.cat(parts)


def match_masks(
    semantic_masks: torch.Tensor,
    captions: Sequence[str],
    min_area_fraction: float = MIN_OBJECT_AREA_FRACTION,
    clean: bool = True,
) -> CaptionMatch:
    """Caption-match of semantic masks [N, H, W] (ground truth or predicted) against captions.

    `clean=False` skips the majority vote per region (counts raw class pixels).
    """
    if isinstance(captions, str) or len(captions) != semantic_masks.shape[0]:
        raise ValueError(
            f"need one caption per mask: {semantic_masks.shape[0]} masks, "
            f"{1 if isinstance(captions, str) else len(captions)} captions"
        )
    masks = clean_semantic_masks(semantic_masks) if clean else semantic_masks
    stats = mask_statistics(masks)
    min_pixels = min_area_fraction * stats.height * stats.width
    counts = stats.counts.tolist()
    per_image = torch.zeros(len(captions))
    objects = torch.zeros(len(captions))
    matched = total = wrong_shape = wrong_colour = 0
    for index, caption in enumerate(captions):
        try:
            parsed = parse_caption(caption)
        except CaptionError as exc:
            raise CaptionError(f"image {index}: {exc}") from None
        present = {
            (shape, color)
            for shape in SHAPES
            for color in COLORS
            if counts[index][semantic_class(shape, color)] >= min_pixels
        }
        hits = 0
        for _, color, shape in parsed.objects:
            if (shape, color) in present:
                hits += 1
                continue
            wrong_shape += any(c == color for _, c in present)
            wrong_colour += any(s == shape for s, _ in present)
        per_image[index] = hits / len(parsed.objects)
        objects[index] = len(parsed.objects)
        matched += hits
        total += len(parsed.objects)
    extra = (object_region_counts(masks, min_pixels) - objects).clamp_min(0.0)
    rate = matched / total if total else 0.0
    return CaptionMatch(rate, per_image, matched, total, objects, extra, wrong_shape, wrong_colour)


def caption_match(
    segmenter: ToySegmenter,
    images: torch.Tensor,
    captions: Sequence[str],
    min_area_fraction: float = MIN_OBJECT_AREA_FRACTION,
    batch_size: int = 256,
) -> CaptionMatch:
    """Caption-match of images [N, 3, H, W] in [0, 1], segmented by `segmenter`."""
    masks = predicted_masks(segmenter, images, batch_size)
    return match_masks(masks, captions, min_area_fraction)
