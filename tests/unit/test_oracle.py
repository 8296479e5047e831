"""Oracle metrics: hand-computed values and the right direction on constructed images."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unifl.config import DIMENSIONS
from unifl.toy.dataset import generate_toy_batch, images_to_tensor
from unifl.toy.oracle import (
    clean_semantic_masks,
    colorfulness,
    detail,
    layout,
    layout_parts,
    lighting,
    mask_statistics,
    oracle_scores,
)
from unifl.toy.world import Background, CaptionError, Scene, ToyObject, render_scene


@pytest.fixture(scope="module")
def toy():
    batch = generate_toy_batch(64, seed=21)
    return batch, batch.image_tensor(), batch.semantic_tensor()


def _box_blur(images: torch.Tensor) -> torch.Tensor:
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(padded, 3, stride=1)


def test_colorfulness_matches_the_formula_by_hand() -> None:
    # Two pixels: pure red and pure blue.
    image = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 1.0]]]).unsqueeze(0)
    rg = np.array([1.0, 0.0])
    yb = np.array([0.5, -1.0])
    expected = math.sqrt(rg.var() + yb.var()) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert colorfulness(image).item() == pytest.approx(expected, abs=1e-6)


def test_gray_copies_have_no_colour(toy) -> None:
    _, images, _ = toy
    gray = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert (colorfulness(gray) < 1e-3).all()
    assert (colorfulness(gray) < colorfulness(images)).all()
    # Halfway desaturated lies in between.
    half = 0.5 * (images + gray)
    assert (colorfulness(half) < colorfulness(images)).all()
    assert (colorfulness(half) > colorfulness(gray)).all()


def test_lighting_prefers_good_exposure_and_contrast(toy) -> None:
    _, images, _ = toy
    dark = images * 0.3
    brighter = images * 0.6
    assert (lighting(brighter) > lighting(dark)).all()
    washed_out = 0.7 + 0.3 * images  # over-exposed and flat
    assert (lighting(washed_out) < lighting(images)).float().mean() > 0.9
    flat = torch.full((1, 3, 8, 8), 0.5)
    striped = flat.clone()
    striped[..., ::2, :] = 0.25
    striped[..., 1::2, :] = 0.75
    # Same mean luma 0.5 (exposure term 0.5), contrast 0 vs std 0.25 -> 0.5 * tanh(1.25).
    assert lighting(flat).item() == pytest.approx(0.5, abs=1e-6)
    assert lighting(striped).item() == pytest.approx(0.5 + 0.5 * math.tanh(1.25), abs=1e-5)


def test_detail_is_high_frequency_energy(toy) -> None:
    _, images, _ = toy
    assert (detail(_box_blur(images)) < detail(images)).all()
    assert detail(torch.full((1, 3, 8, 8), 0.3)).item() < 1e-3
    checker = torch.zeros(1, 3, 6, 6)
    checker[..., ::2, ::2] = 1.0
    checker[..., 1::2, 1::2] = 1.0
    # Every interior Laplacian response of a 0/1 checkerboard is +-4 (luma weights sum to 1).
    assert detail(checker).item() == pytest.approx(4.0, abs=1e-4)


def _two_object_scene(subject_y: float, other_y: float, other_x: float = 0.5) -> Scene:
    red = ToyObject("circle", "red", None, 0.5, subject_y, 0.14, (0.86, 0.16, 0.14))
    blue = ToyObject("square", "blue", None, other_x, other_y, 0.14, (0.16, 0.30, 0.90))
    return Scene((red, blue), ((0, "above", 1),), Background("gray", 0.5))


def _layout_of(scene: Scene, caption: str | None = None) -> float:
    rendering = render_scene(scene, 32)
    masks = torch.from_numpy(rendering.semantic_mask.astype(np.int64))[None]
    return layout([caption or scene.caption()], masks).item()


def test_layout_scores_placement_against_the_caption() -> None:
    right = _two_object_scene(subject_y=0.25, other_y=0.75)
    wrong = _two_object_scene(subject_y=0.75, other_y=0.25)  # same caption, red below blue
    assert (
        right.caption()
        == wrong.caption()
        == ("a red circle above a blue square on a gray background")
    )
    assert _layout_of(right) == pytest.approx(1.0)
    # Facts: both objects present, relation false -> placement 2/3, composition 1.
    assert _layout_of(wrong) == pytest.approx(0.5 * 2 / 3 + 0.5)
    # An object of the caption missing from the image: a green triangle never drawn.
    missing = "a red circle above a green triangle on a gray background"
    assert _layout_of(right, missing) == pytest.approx(0.5 * 1 / 3 + 0.5)


def test_layout_parts_count_what_the_layout_is_made_of() -> None:
    right = _two_object_scene(subject_y=0.25, other_y=0.75)
    wrong = _two_object_scene(subject_y=0.75, other_y=0.25)
    missing = "a red circle above a green triangle on a gray background"
    scenes = [(right, None), (wrong, None), (right, missing)]
    masks = torch.cat(
        [
            torch.from_numpy(render_scene(s, 32).semantic_mask.astype(np.int64))[None]
            for s, _ in scenes
        ]
    )
    captions = [caption or scene.caption() for scene, caption in scenes]
    parts = layout_parts(captions, masks)
    assert parts["objects_present"].tolist() == [2, 2, 1]
    assert parts["relations_hold"].tolist() == [1, 0, 0]
    assert parts["placement"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert parts["composition"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert parts["layout"].tolist() == pytest.approx([1.0, 0.5 * 2 / 3 + 0.5, 0.5 * 1 / 3 + 0.5])
    assert torch.equal(layout(captions, masks), parts["layout"].float())


def test_layout_scores_composition() -> None:
    touching_border = _two_object_scene(subject_y=0.25, other_y=0.9)
    assert _layout_of(touching_border) == pytest.approx(0.5 + 0.5 * 2 / 3)
    red, blue = _two_object_scene(0.4, 0.6).objects
    overlapping = Scene(
        (red, replace(blue, x=0.5, y=0.58)), ((0, "above", 1),), Background("gray", 0.5)
    )
    score = _layout_of(overlapping)
    assert score < _layout_of(_two_object_scene(0.25, 0.75))
    # Overlap is judged on bounding boxes: the composition term loses the pair's share.
    assert 0.5 < score < 0.95


def test_ground_truth_scenes_have_perfect_layout_and_shuffled_captions_do_not(toy) -> None:
    batch, _, masks = toy
    assert torch.equal(layout(batch.captions, masks), torch.ones(len(batch)))
    shuffled = batch.captions[1:] + batch.captions[:1]
    assert layout(shuffled, masks).mean() < 0.6


def test_oracle_scores_keys_shapes_and_errors(toy) -> None:
    batch, images, masks = toy
    scores = oracle_scores(images, batch.captions, masks)
    assert tuple(scores) == DIMENSIONS
    assert all(score.shape == (len(batch),) for score in scores.values())
    assert torch.equal(scores["color"], colorfulness(images))
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        oracle_scores(images[:, :1], batch.captions, masks)
    with pytest.raises(ValueError, match="do not match images"):
        oracle_scores(images, batch.captions, masks[:3])
    with pytest.raises(ValueError, match="got 63 captions for 64"):
        oracle_scores(images, batch.captions[:-1], masks)
    bad = list(batch.captions)
    bad[5] = "a red dragon on a dark background"
    with pytest.raises(CaptionError, match="image 5: caption 'a red dragon"):
        oracle_scores(images, bad, masks)


def test_mask_statistics_by_hand() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, 1:3, 2:6] = 4  # rows 1-2, columns 2-5
    stats = mask_statistics(mask)
    assert stats.counts[0, 4].item() == 8 and stats.counts[0, 0].item() == 56
    assert stats.centroids[0, 4].tolist() == pytest.approx([4.0 / 8, 2.0 / 8])
    assert stats.boxes[0, 4].tolist() == pytest.approx([2 / 8, 1 / 8, 6 / 8, 3 / 8])
    assert stats.counts[0, 5].item() == 0 and stats.boxes[0, 5].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"must lie in \[0, 13\)"):
        mask_statistics(mask + 20)


def test_cleaning_gives_each_region_its_majority_class() -> None:
    mask = torch.zeros(1, 6, 8, dtype=torch.long)
    mask[0, 1:4, 1:4] = 1
    mask[0, 1, 1:3] = 5  # a minority of another class inside the same region
    mask[0, 2:4, 6:8] = 9  # a separate region
    cleaned = clean_semantic_masks(mask)
    expected = torch.zeros_like(mask)
    expected[0, 1:4, 1:4] = 1
    expected[0, 2:4, 6:8] = 9
    assert torch.equal(cleaned, expected)


def test_images_to_tensor_layout() -> None:
    pixels = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    pixels[1, 0, 0] = (255, 0, 51)
    tensor = images_to_tensor(pixels)
    assert tensor.shape == (2, 3, 4, 4)
    assert tensor[1, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
