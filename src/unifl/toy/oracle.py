"""Oracle metrics of the toy world: one score per image for each aesthetic dimension.

They stand in for human judgement: simulated annotators prefer the image with
the higher oracle score of a dimension, and the later stages are measured by
them. All take images as float tensors [N, 3, H, W] in [0, 1] (values outside
are clamped) and return a float tensor [N]. Higher is better for every one.

* color: Hasler & Suesstrunk colourfulness on [0, 1] pixel values (their
  0-255 scale divided by 255), with ``rg = R - G`` and ``yb = (R + G) / 2 - B``
  over the image's pixels::

      color = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

  Chosen over an HSV saturation mean because it is zero for any gray image
  whatever its brightness (HSV saturation explodes on dark, slightly noisy
  pixels, and the toy world has dark and noisy backgrounds), and because it
  was fitted to human colourfulness ratings.
* lighting: exposure and contrast of the luma ``Y = 0.2126 R + 0.7152 G +
  0.0722 B`` (Rec. 709 weights on the stored values)::

      lighting = 0.5 * exp(-(mean(Y) - 0.5)^2 / (2 * 0.2^2)) + 0.5 * tanh(std(Y) / 0.2)

  The first term peaks at a mid-gray mean (neither under- nor over-exposed),
  the second grows with RMS contrast and saturates. Range [0, 1).
* detail: high-frequency energy, the RMS response of the 4-neighbour
  Laplacian of Y over the image interior (no padding, so borders add nothing)::

      detail = sqrt(mean(laplacian(Y)^2))

  Blur lowers it, sharp edges, stripes and fine texture raise it.
* layout: placement versus the caption and composition, from a semantic mask
  (ground truth for real toy images, `unifl.toy.caption_match.predicted_masks`
  for generated ones), after `clean_semantic_masks` has given each connected
  region of object pixels its majority class. An object of the caption is
  *present* when its class covers at least `MIN_OBJECT_AREA_FRACTION` of the
  image; its centroid and bounding box are those of its class's pixels (a
  scene never holds two objects of one class)::

      placement   = mean over the caption's facts: each object present, each
                    relation true of the centroids (`relation_holds`; a
                    relation with a missing object is false)
      composition = mean over present objects of [its box does not touch the
                    image border] and over pairs of present objects of
                    [1 - intersection(box_a, box_b) / min(area(box_a), area(box_b))]
                    (0 when no object is present)
      layout      = 0.5 * placement + 0.5 * composition

  Ground-truth toy scenes score 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from unifl.config import DIMENSIONS
from unifl.toy.world import (
    NUM_SEMANTIC_CLASSES,
    CaptionError,
    parse_caption,
    relation_holds,
    semantic_class,
)

MIN_OBJECT_AREA_FRACTION = 0.006
"""A class is present when it covers this share of the image (6 px at 32 px, 25 at 64).

The smallest toy object covers about 0.017 of the image, so a third of the
smallest object is enough to count, while a few stray pixels are not."""

LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)
EXPOSURE_TARGET = 0.5
EXPOSURE_WIDTH = 0.2
CONTRAST_SCALE = 0.2
_EPS = 1e-8


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    return images.clamp(0.0, 1.0)


def luma(images: torch.Tensor) -> torch.Tensor:
    """Rec. 709 luma [N, H, W] of images [N, 3, H, W]."""
    weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1)


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Suesstrunk colourfulness per image (formula in the module docstring)."""
    images = _check_images(images)
    red, green, blue = images.unbind(dim=1)
    rg = (red - green).flatten(1)
    yb = (0.5 * (red + green) - blue).flatten(1)
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + _EPS)
    mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + _EPS)
    return spread + 0.3 * mean


def lighting(images: torch.Tensor) -> torch.Tensor:
    """Exposure (mean luma near mid-gray) plus contrast (luma std), each weighted 0.5."""
    y = luma(_check_images(images)).flatten(1)
    exposure = torch.exp(-((y.mean(dim=1) - EXPOSURE_TARGET) ** 2) / (2 * EXPOSURE_WIDTH**2))
    contrast = torch.tanh(y.std(dim=1, unbiased=False) / CONTRAST_SCALE)
    return 0.5 * exposure + 0.5 * contrast


def detail(images: torch.Tensor) -> torch.Tensor:
    """RMS response of the Laplacian of luma over the image interior."""
    y = luma(_check_images(images)).unsqueeze(1)
    kernel = y.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    response = F.conv2d(y, kernel)
    return torch.sqrt(response.pow(2).flatten(1).mean(dim=1) + _EPS)


_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def clean_semantic_masks(semantic_masks: torch.Tensor) -> torch.Tensor:
    """Give every connected region of object pixels its majority class.

    Regions are 8-connected groups of non-background pixels. A segmenter
    unsure of a shape may split one object between several classes; after
    cleaning, each region counts as one object of one class, so hedging
    cannot find two objects where the image shows one. Ground-truth toy masks
    are unchanged (the world keeps objects at least a pixel apart).
    """
    if semantic_masks.ndim != 3:
        raise ValueError(
            f"expected semantic masks [N, H, W], got shape {tuple(semantic_masks.shape)}"
        )
    masks = semantic_masks.detach().cpu().long().numpy()
    num_classes = int(masks.max(initial=0)) + 1
    cleaned = np.zeros_like(masks)
    for index, mask in enumerate(masks):
        regions, count = ndimage.label(mask > 0, structure=_EIGHT_NEIGHBOURS)
        if count == 0:
            continue
        votes = np.bincount(
            (regions * num_classes + mask).ravel(), minlength=(count + 1) * num_classes
        ).reshape(count + 1, num_classes)
        majority = votes[:, 1:].argmax(axis=1) + 1
        majority[0] = 0
        cleaned[index] = majority[regions]
    return torch.from_numpy(cleaned).to(semantic_masks.device)


def object_region_counts(semantic_masks: torch.Tensor, min_pixels: float) -> torch.Tensor:
    """Per image, the connected regions of object pixels with at least `min_pixels` pixels.

    Regions as in `clean_semantic_masks` (8-connected non-background pixels);
    smaller specks are not counted. Returns float [N].
    """
    if semantic_masks.ndim != 3:
        raise ValueError(
            f"expected semantic masks [N, H, W], got shape {tuple(semantic_masks.shape)}"
        )
    masks = semantic_masks.detach().cpu().numpy() > 0
    counts = torch.zeros(masks.shape[0])
    for index, mask in enumerate(masks):
        regions, count = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
        if count:
            sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
            counts[index] = float((sizes >= min_pixels).sum())
    return counts


@dataclass
class MaskStatistics:
    """Per image and class: pixel count, centroid and bounding box, in normalised units.

    counts [N, C]; centroids [N, C, 2] as (x, y); boxes [N, C, 4] as (x0, y0, x1, y1)
    with exclusive ends, all divided by the image side. Entries of absent
    classes are 0.
    """

    counts: torch.Tensor
    centroids: torch.Tensor
    boxes: torch.Tensor
    height: int
    width: int


def mask_statistics(
    semantic_masks: torch.Tensor, num_classes: int = NUM_SEMANTIC_CLASSES
) -> MaskStatistics:
    """Counts, centroids and boxes of every class of a batch of masks [N, H, W], vectorised."""
    if semantic_masks.ndim != 3:
        raise ValueError(
            f"expected semantic masks [N, H, W], got shape {tuple(semantic_masks.shape)}"
        )
    masks = semantic_masks.long()
    if masks.numel() and (masks.min() < 0 or masks.max() >= num_classes):
        raise ValueError(
            f"semantic mask values must lie in [0, {num_classes}), got {masks.min()}..{masks.max()}"
        )
    count, height, width = masks.shape
    flat = masks.reshape(count, -1)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5).repeat(height).expand(count, -1)
    ys = (
        (torch.arange(height, dtype=torch.float32) + 0.5).repeat_interleave(width).expand(count, -1)
    )
    zeros = torch.zeros(count, num_classes)
    counts = zeros.scatter_add(1, flat, torch.ones_like(xs))
    safe = counts.clamp_min(1.0)
    centroids = torch.stack(
        [
            zeros.scatter_add(1, flat, xs) / safe / width,
            zeros.scatter_add(1, flat, ys) / safe / height,
        ],
        dim=-1,
    )
    x0 = zeros.scatter_reduce(1, flat, xs - 0.5, "amin", include_self=False)
    y0 = zeros.scatter_reduce(1, flat, ys - 0.5, "amin", include_self=False)
    x1 = zeros.scatter_reduce(1, flat, xs + 0.5, "amax", include_self=False)
    y1 = zeros.scatter_reduce(1, flat, ys + 0.5, "amax", include_self=False)
    present = counts > 0
    boxes = torch.stack([x0 / width, y0 / height, x1 / width, y1 / height], dim=-1)
    boxes = boxes * present.unsqueeze(-1)
    return MaskStatistics(counts, centroids * present.unsqueeze(-1), boxes, height, width)


def _box_overlap_share(a: list[float], b: list[float]) -> float:
    """Intersection of two boxes over the smaller box's area (0: apart, 1: one inside the other)."""
    inter_w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    inter_h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter_w * inter_h / max(smaller, _EPS)


def _check_captions(captions: Sequence[str], count: int) -> None:
    if isinstance(captions, str):
        raise ValueError("captions must be a sequence of strings, not one string")
    if len(captions) != count:
        raise ValueError(f"got {len(captions)} captions for {count} images or masks")


def layout_parts(
    captions: Sequence[str],
    semantic_masks: torch.Tensor,
    min_area_fraction: float = MIN_OBJECT_AREA_FRACTION,
    clean: bool = True,
) -> dict[str, torch.Tensor]:
    """`layout` per image and its parts, each float64 [N]: `objects_present` and
    `relations_hold` (how many of the caption's objects are present and of its relations
    true), `placement`, `composition` and `layout` itself (see the module docstring).

    `clean=True` first applies `clean_semantic_masks` (one class per connected region).
    """
    _check_captions(captions, semantic_masks.shape[0])
    stats = mask_statistics(clean_semantic_masks(semantic_masks) if clean else semantic_masks)
    min_pixels = min_area_fraction * stats.height * stats.width
    border_x = 1.0 / stats.width
    border_y = 1.0 / stats.height
    # Plain Python lists: per-element tensor indexing would dominate the cost.
    all_counts = stats.counts.tolist()
    all_centroids = stats.centroids.tolist()
    all_boxes = stats.boxes.tolist()
    # float64, so that `layout` rounds each score to float32 once.
    parts = {
        name: torch.zeros(len(captions), dtype=torch.float64)
        for name in ("objects_present", "relations_hold", "placement", "composition", "layout")
    }
    for index, caption in enumerate(captions):
        try:
            parsed = parse_caption(caption)
        except CaptionError as exc:
            raise CaptionError(f"image {index}: {exc}") from None
        counts, centroids, boxes = all_counts[index], all_centroids[index], all_boxes[index]
        classes = [semantic_class(shape, color) for _, color, shape in parsed.objects]
        present = [counts[c] >= min_pixels for c in classes]
        holds = [
            present[i]
            and present[j]
            and relation_holds(relation, centroids[classes[i]], centroids[classes[j]])
            for i, relation, j in parsed.relations
        ]
        facts = [*present, *holds]
        terms: list[float] = []
        present_boxes = [boxes[c] for c, p in zip(classes, present, strict=True) if p]
        for box in present_boxes:
            touches = (
                box[0] < border_x - _EPS
                or box[1] < border_y - _EPS
                or box[2] > 1.0 - border_x + _EPS
                or box[3] > 1.0 - border_y + _EPS
            )
            terms.append(0.0 if touches else 1.0)
        for a in range(len(present_boxes)):
            for b in range(a + 1, len(present_boxes)):
                terms.append(1.0 - _box_overlap_share(present_boxes[a], present_boxes[b]))
        placement = sum(facts) / len(facts)
        composition = sum(terms) / len(terms) if terms else 0.0
        parts["objects_present"][index] = sum(present)
        parts["relations_hold"][index] = sum(holds)
        parts["placement"][index] = placement
        parts["composition"][index] = composition
        parts["layout"][index] = 0.5 * placement + 0.5 * composition
    return parts


def layout(
    captions: Sequence[str],
    semantic_masks: torch.Tensor,
    min_area_fraction: float = MIN_OBJECT_AREA_FRACTION,
    clean: bool = True,
) -> torch.Tensor:
    """Placement versus the caption and composition, from semantic masks (see module docstring).

    `clean=True` first applies `clean_semantic_masks` (one class per connected region).
    """
    return layout_parts(captions, semantic_masks, min_area_fraction, clean)["layout"].float()


def oracle_scores(
    images: torch.Tensor,
    captions: Sequence[str],
    semantic_masks: torch.Tensor,
    min_area_fraction: float = MIN_OBJECT_AREA_FRACTION,
) -> dict[str, torch.Tensor]:
    """Every oracle metric, keyed by `unifl.config.DIMENSIONS` in that order, each [N]."""
    images = _check_images(images)
    if semantic_masks.shape[0] != images.shape[0] or semantic_masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"semantic masks {tuple(semantic_masks.shape)} do not match images {tuple(images.shape)}"
        )
    with torch.no_grad():
        by_dimension = {
            "color": colorfulness(images),
            "layout": layout(captions, semantic_masks, min_area_fraction),
            "detail": detail(images),
            "lighting": lighting(images),
        }
    return {dimension: by_dimension[dimension] for dimension in DIMENSIONS}
