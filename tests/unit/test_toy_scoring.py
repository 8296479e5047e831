"""The toy oracle scorer that drives simulated annotators."""

import numpy as np
import pytest
from PIL import Image

from unifl.config import DIMENSIONS, load_params
from unifl.toy.dataset import generate_toy_batch
from unifl.toy.scoring import image_scorer, read_images


def test_scores_follow_the_oracle_on_real_toy_images(ci_bootstrap, tmp_path):
    params = load_params(
        None, preset="ci", overrides=[f"bootstrap.cache_dir={ci_bootstrap.directory.parent}"]
    )
    batch = generate_toy_batch(4, seed=7)
    paths = []
    for index, image in enumerate(batch.images):
        path = tmp_path / f"{index}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    # A dimmed copy of the first image must score lower on lighting than the original.
    dim = (batch.images[0].astype(np.float32) * 0.2).astype(np.uint8)
    Image.fromarray(dim).save(tmp_path / "dim.png")
    scores = image_scorer(params)(
        [*paths, tmp_path / "dim.png"], [*batch.captions, batch.captions[0]]
    )
    assert set(scores) == set(DIMENSIONS)
    for values in scores.values():
        assert values.shape == (5,) and np.isfinite(values).all()
    assert scores["lighting"][4] < scores["lighting"][0]
    assert scores["color"][4] < scores["color"][0]


def test_unreadable_image_is_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_images([broken])
