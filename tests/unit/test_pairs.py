"""Pair generation with a tiny toy model: files, manifest schema, seeds, determinism, atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unifl.data.pairs import PairGenerationError, generate_pairs, pair_id
from unifl.data.prompts import prompt_id
from unifl.labeling.tasks import PAIR_MANIFEST_NAME, read_pair_manifest
from unifl.models.toy_presets import build_toy_model

PROMPTS = [
    "a red circle on a dark background",
    "a large blue square above a small green triangle on a gray background",
    "a yellow triangle on a bright background",
]
SETTINGS = {
    "steps": 1,
    "guidance_scale": 1.0,
    "timestep_spacing": "trailing",
    "seed": 11,
    "model_version": "toy-test-1",
    "batch_size": 6,
    "show_progress": False,
}


@pytest.fixture(scope="module")
def toy_model():
    torch.manual_seed(0)
    return build_toy_model("toy-sd15", resolution=32, seed=0)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_pairs_writes_images_and_manifest(tmp_path: Path, toy_model) -> None:
    table = pd.DataFrame({"prompt_id": [prompt_id(p) for p in PROMPTS], "prompt": PROMPTS})
    out = tmp_path / "pairs"
    report = generate_pairs(toy_model, table, out, **SETTINGS)
    rows = read_pair_manifest(out)  # the labeling module's schema and checks
    assert report.pairs == len(rows) == 3 and report.images == 6
    assert [row["prompt"] for row in rows] == PROMPTS
    for row, pid in zip(rows, table["prompt_id"], strict=True):
        assert row["pair_id"] == pair_id(pid, "toy-test-1", 11, 1, 1.0, "trailing")
        assert (row["steps"], row["guidance_scale"], row["timestep_spacing"]) == (
            1,
            1.0,
            "trailing",
        )
        assert row["model_version"] == "toy-test-1"
        first, second = pixels(out / row["image_a"]), pixels(out / row["image_b"])
        assert first.shape == second.shape == (32, 32, 3)
        assert np.abs(first - second).mean() > 1.0  # different noise, different images
    seeds = [row[key] for row in rows for key in ("seed_a", "seed_b")]
    assert len(set(seeds)) == 6
    assert sorted(p.name for p in out.iterdir()) == [
        "images",
        PAIR_MANIFEST_NAME,
        "pairs_report.json",
    ]

    # same prompts, settings and seed: the same pictures, whatever the batching
    again = generate_pairs(
        toy_model, PROMPTS[:1], tmp_path / "again", **{**SETTINGS, "batch_size": 2}
    )
    assert again.pairs == 1
    row_again = read_pair_manifest(tmp_path / "again")[0]
    assert row_again["seed_a"] == rows[0]["seed_a"]
    assert (
        np.abs(
            pixels(tmp_path / "again" / row_again["image_a"]) - pixels(out / rows[0]["image_a"])
        ).max()
        <= 1
    )


def test_generate_pairs_rejects_bad_prompt_tables(tmp_path: Path, toy_model) -> None:
    with pytest.raises(PairGenerationError, match="no 'prompt' column"):
        generate_pairs(toy_model, pd.DataFrame({"text": ["a"]}), tmp_path / "x", **SETTINGS)
    duplicated = pd.DataFrame({"prompt_id": ["p", "p"], "prompt": PROMPTS[:2]})
    with pytest.raises(PairGenerationError, match="row 1: duplicate prompt_id 'p'"):
        generate_pairs(toy_model, duplicated, tmp_path / "x", **SETTINGS)
    with pytest.raises(PairGenerationError, match="row 1: empty or missing prompt"):
        generate_pairs(toy_model, ["a red circle", "  "], tmp_path / "x", **SETTINGS)
    with pytest.raises(PairGenerationError, match="model_version"):
        generate_pairs(toy_model, PROMPTS, tmp_path / "x", **{**SETTINGS, "model_version": " "})
    assert not (tmp_path / "x").exists()


def test_failed_generation_keeps_the_previous_directory(tmp_path: Path, toy_model) -> None:
    out = tmp_path / "pairs"
    generate_pairs(toy_model, PROMPTS[:1], out, **SETTINGS)
    manifest = (out / PAIR_MANIFEST_NAME).read_bytes()
    with pytest.raises(ValueError, match="timestep_spacing"):
        generate_pairs(toy_model, PROMPTS, out, **{**SETTINGS, "timestep_spacing": "sideways"})
    assert (out / PAIR_MANIFEST_NAME).read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
