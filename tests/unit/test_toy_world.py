"""The toy world: determinism, masks and captions that agree, the grammar, data set files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from unifl.toy import world
from unifl.toy.dataset import (
    ToyDataset,
    content_hash,
    generate_toy_batch,
    load_toy_arrays,
    verify_toy_dataset,
    write_toy_dataset,
)
from unifl.toy.vocabulary import BACKGROUNDS, COLORS, RELATIONS, SHAPES, vocabulary
from unifl.toy.world import (
    CaptionError,
    ParsedCaption,
    format_caption,
    generate_scenes,
    parse_caption,
    relation_holds,
    render_scene,
    semantic_class,
)


@pytest.fixture(scope="module")
def batch32():
    return generate_toy_batch(300, seed=11, resolution=32)


def test_same_seed_same_data_and_index_independent_of_batch() -> None:
    first = generate_toy_batch(8, seed=3)
    again = generate_toy_batch(8, seed=3)
    tail = generate_toy_batch(3, seed=3, start_index=5)
    other = generate_toy_batch(8, seed=4)
    assert np.array_equal(first.images, again.images)
    assert first.captions == again.captions and first.annotations == again.annotations
    assert np.array_equal(first.images[5:], tail.images)
    assert first.captions[5:] == tail.captions
    assert tail.annotations[0]["id"] == "000005"
    assert not np.array_equal(first.images, other.images)
    assert first.captions != other.captions


def test_scene_statistics_cover_the_world(batch32) -> None:
    rows = batch32.annotations
    counts = Counter(len(row["objects"]) for row in rows)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60
    shapes = Counter(obj["shape"] for row in rows for obj in row["objects"])
    colors = Counter(obj["color"] for row in rows for obj in row["objects"])
    sizes = Counter(obj["size"] for row in rows for obj in row["objects"])
    relations = Counter(rel for row in rows for _, rel, _ in row["relations"])
    backgrounds = Counter(row["background"]["kind"] for row in rows)
    assert set(shapes) == set(SHAPES) and set(colors) == set(COLORS)
    assert set(sizes) == {"small", "large", None}
    assert set(relations) == set(RELATIONS) and min(relations.values()) >= 20
    assert set(backgrounds) == set(BACKGROUNDS)
    # Every word of every caption is a word the toy tokenizer knows.
    words = set(vocabulary())
    assert all(set(caption.split()) <= words for caption in batch32.captions)


def test_backgrounds_differ_in_brightness_and_texture(batch32) -> None:
    levels: dict[str, list[float]] = {kind: [] for kind in BACKGROUNDS}
    roughness: dict[str, list[float]] = {kind: [] for kind in BACKGROUNDS}
    for image, instance, row in zip(
        batch32.images, batch32.instance_masks, batch32.annotations, strict=True
    ):
        gray = image.astype(np.float64).mean(axis=2)
        background = instance == 0
        levels[row["background"]["kind"]].append(gray[background].mean())
        # Mean absolute difference of horizontally neighbouring background pixels.
        both = background[:, 1:] & background[:, :-1]
        roughness[row["background"]["kind"]].append(np.abs(np.diff(gray, axis=1))[both].mean())
    mean_level = {kind: np.mean(values) for kind, values in levels.items()}
    assert mean_level["dark"] < 60 < mean_level["gray"] < 170 < mean_level["bright"]
    flat = max(np.mean(roughness[kind]) for kind in ("dark", "bright", "gray"))
    assert flat < 1.0
    assert np.mean(roughness["noisy"]) > 10 * max(flat, 0.5)
    assert np.mean(roughness["striped"]) > 3.0
    # Backgrounds are gray: the channels agree on every pixel that does not touch
    # an object (anti-aliasing colours only the pixels next to an outline).
    away = ndimage.binary_erosion(batch32.instance_masks == 0, structure=np.ones((1, 3, 3)))
    assert np.ptp(batch32.images[away].astype(int), axis=1).max() == 0


@pytest.mark.parametrize("resolution", [32, 64])
def test_masks_and_captions_agree(resolution: int) -> None:
    arrays = generate_toy_batch(120, seed=5, resolution=resolution)
    for image_index, row in enumerate(arrays.annotations):
        instance = arrays.instance_masks[image_index]
        semantic = arrays.semantic_masks[image_index]
        parsed = parse_caption(row["caption"])
        assert row["caption"] == arrays.captions[image_index]
        assert len(parsed.objects) == len(row["objects"]) == instance.max()
        # Semantic mask = class of the instance under every pixel.
        classes = np.zeros(instance.max() + 1, dtype=np.uint8)
        for obj in row["objects"]:
            classes[obj["instance_id"]] = obj["class_id"]
        assert np.array_equal(semantic, classes[instance])
        centroids = {}
        for (size, color, shape), obj in zip(parsed.objects, row["objects"], strict=True):
            assert (size, color, shape) == (obj["size"], obj["color"], obj["shape"])
            assert obj["class_id"] == semantic_class(shape, color)
            ys, xs = np.nonzero(instance == obj["instance_id"])
            assert xs.size == obj["area"] > 0
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # Inside the frame: no object pixel on the border.
            assert xs.min() > 0 and ys.min() > 0
            assert xs.max() < resolution - 1 and ys.max() < resolution - 1
            centroid = ((xs.mean() + 0.5) / resolution, (ys.mean() + 0.5) / resolution)
            assert obj["centroid"] == pytest.approx([c * resolution for c in centroid])
            centroids[obj["instance_id"] - 1] = centroid
        # The relation words are true of the rendered objects' centroids.
        assert [list(r) for r in parsed.relations] == row["relations"]
        for i, relation, j in parsed.relations:
            assert relation_holds(relation, centroids[i], centroids[j]), (row["caption"], i, j)
        # Objects never touch: each is one 8-connected region of its own.
        _, regions = ndimage.label(instance > 0, structure=np.ones((3, 3)))
        assert regions == len(row["objects"])


def test_size_words_are_true_of_the_radius() -> None:
    for scene in generate_scenes(300, seed=8):
        for obj in scene.objects:
            low, high = world.SIZE_RANGES[obj.size]
            assert low <= obj.radius <= high
        classes = [obj.class_id for obj in scene.objects]
        assert len(set(classes)) == len(classes)
    small = next(o for s in generate_scenes(50, seed=8) for o in s.objects if o.size == "small")
    large = next(o for s in generate_scenes(50, seed=8) for o in s.objects if o.size == "large")
    assert small.radius < large.radius


def test_captions_round_trip_through_the_parser(batch32) -> None:
    for caption in batch32.captions:
        assert format_caption(parse_caption(caption)) == caption
    longest = max(len(caption.split()) for caption in batch32.captions)
    assert longest <= world.max_caption_words(3) == 21


def test_grammar_examples() -> None:
    shared = parse_caption(
        "a yellow square left of a red circle and a blue triangle on a bright background"
    )
    assert shared == ParsedCaption(
        objects=((None, "yellow", "square"), (None, "red", "circle"), (None, "blue", "triangle")),
        relations=((0, "left of", 1), (0, "left of", 2)),
        background="bright",
    )
    mixed = parse_caption(
        "a small red circle above a large blue square and next to a green triangle on a gray background"
    )
    assert mixed.objects[0] == ("small", "red", "circle")
    assert mixed.relations == ((0, "above", 1), (0, "next to", 2))
    single = parse_caption("a small green triangle on a striped background")
    assert single.objects == (("small", "green", "triangle"),) and single.relations == ()
    # A repeated relation word is accepted and written back in the canonical short form.
    repeated = "a red circle above a blue square and above a green circle on a dark background"
    assert format_caption(parse_caption(repeated)) == (
        "a red circle above a blue square and a green circle on a dark background"
    )


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("a purple circle on a dark background", "expected a colour"),
        ("a red circle on a dark", "expected 'background' at word 7, found the end"),
        ("a red circle under a blue square on a dark background", "'on' or a relation at word 4"),
        (
            "a red circle on a dark background please",
            "the end of the caption at word 8, found 'please'",
        ),
        ("a red blob on a dark background", "expected a shape"),
        ("", "expected 'a' at word 1"),
    ],
)
def test_parse_errors_name_caption_and_word(caption: str, message: str) -> None:
    with pytest.raises(CaptionError, match=message) as info:
        parse_caption(caption)
    assert repr(caption) in str(info.value)


def test_format_rejects_relations_that_are_not_a_star() -> None:
    objects = ((None, "red", "circle"), (None, "blue", "square"), (None, "green", "circle"))
    bad = ParsedCaption(objects, ((0, "above", 1), (1, "left of", 2)), "dark")
    with pytest.raises(CaptionError, match="must relate object 0"):
        format_caption(bad)
    with pytest.raises(CaptionError, match="unknown relation"):
        format_caption(ParsedCaption(objects[:2], ((0, "inside", 1),), "dark"))


@pytest.mark.parametrize(
    ("relation", "other", "holds"),
    [
        ("above", (0.5, 0.8), True),
        ("above", (0.5, 0.55), False),  # closer than the margin
        ("above", (0.9, 0.7), False),  # more to the side than below
        ("below", (0.5, 0.2), True),
        ("left of", (0.8, 0.55), True),
        ("right of", (0.2, 0.5), True),
        ("right of", (0.8, 0.5), False),
        ("next to", (0.2, 0.55), True),
        ("next to", (0.7, 0.7), False),  # not on the same row
    ],
)
def test_relation_geometry(relation: str, other: tuple[float, float], holds: bool) -> None:
    assert relation_holds(relation, (0.5, 0.5), other) is holds


def test_render_is_a_pure_function_of_the_scene() -> None:
    scene = generate_scenes(1, seed=2, min_objects=3, max_objects=3)[0]
    first, second = render_scene(scene, 32), render_scene(scene, 32)
    assert np.array_equal(first.image, second.image)
    big = render_scene(scene, 64)
    assert big.image.shape == (64, 64, 3)
    # The same scene at twice the resolution has about four times the object pixels.
    ratio = (big.instance_mask > 0).sum() / (first.instance_mask > 0).sum()
    assert 3.3 < ratio < 4.8
    with pytest.raises(ValueError, match="need 1 <= min_objects"):
        world.sample_scene(np.random.default_rng(0), min_objects=2, max_objects=1)


def test_dataset_directory_round_trip_and_hash(tmp_path) -> None:
    manifest = write_toy_dataset(tmp_path / "toy", 12, seed=7, resolution=32, progress=False)
    again = write_toy_dataset(tmp_path / "toy_again", 12, seed=7, resolution=32, progress=False)
    other = write_toy_dataset(tmp_path / "toy_other", 12, seed=8, resolution=32, progress=False)
    assert manifest["content_hash"] == again["content_hash"] != other["content_hash"]
    assert manifest["count"] == 12 and manifest["config"]["resolution"] == 32
    assert manifest["classes"][1] == "red circle" and len(manifest["classes"]) == 13
    on_disk = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert on_disk == manifest
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [
        "annotations.jsonl",
        "images",
        "manifest.json",
        "masks",
    ]

    loaded = load_toy_arrays(tmp_path / "toy", verify=True)
    memory = generate_toy_batch(12, seed=7, resolution=32)
    assert np.array_equal(loaded.images, memory.images)
    assert np.array_equal(loaded.instance_masks, memory.instance_masks)
    assert np.array_equal(loaded.semantic_masks, memory.semantic_masks)
    assert loaded.captions == memory.captions and loaded.annotations == memory.annotations

    dataset = ToyDataset(tmp_path / "toy")
    item = dataset[4]
    assert len(dataset) == 12 and item["id"] == "000004"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert torch.equal(item["image"], memory.image_tensor()[4])
    assert item["semantic_mask"].dtype == torch.long
    assert torch.equal(item["semantic_mask"], memory.semantic_tensor()[4])
    assert torch.equal(item["instance_mask"], memory.instance_tensor()[4])
    assert item["caption"] == memory.captions[4]

    # A modified file is caught by the content hash.
    png = tmp_path / "toy" / "images" / "000003.png"
    pixels = np.asarray(Image.open(png)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(png)
    assert content_hash(tmp_path / "toy") != manifest["content_hash"]
    with pytest.raises(ValueError, match="content_hash .* does not match"):
        verify_toy_dataset(tmp_path / "toy")


def test_dataset_errors_name_the_file_and_row(tmp_path) -> None:
    write_toy_dataset(tmp_path / "toy", 3, seed=1, progress=False)
    (tmp_path / "toy" / "masks" / "semantic" / "000001.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"000001\.png \(annotations.jsonl row 2, id 000001\)"
    ):
        load_toy_arrays(tmp_path / "toy")
    with pytest.raises(FileNotFoundError, match="no toy data set manifest"):
        load_toy_arrays(tmp_path / "missing")
    with pytest.raises(ValueError, match="num_images must be at least 1"):
        write_toy_dataset(tmp_path / "empty", 0, seed=1, progress=False)


def test_dataset_write_is_all_or_nothing(tmp_path, monkeypatch) -> None:
    import unifl.toy.dataset as dataset_module

    calls = {"count": 0}
    real_render = dataset_module.render_scene

    def failing_render(scene, resolution):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("renderer failed")
        return real_render(scene, resolution)

    monkeypatch.setattr(dataset_module, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="renderer failed"):
        write_toy_dataset(tmp_path / "toy", 5, seed=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_data_set_split(tmp_path) -> None:
    from typer.testing import CliRunner

    from unifl.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("toy:\n  num_train: 4\n  num_eval: 3\n  seed: 40\n")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "toy",
            "data",
            "--out",
            str(tmp_path / "eval"),
            "--split",
            "eval",
            "--params",
            str(params),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = verify_toy_dataset(tmp_path / "eval")
    assert manifest["count"] == 3 and manifest["seed"] == 41
    assert manifest["content_hash"] in result.output
    assert load_toy_arrays(tmp_path / "eval").captions == generate_toy_batch(3, seed=41).captions
    bad = runner.invoke(
        app,
        ["toy", "data", "--out", str(tmp_path / "x"), "--split", "test", "--params", str(params)],
    )
    assert bad.exit_code == 2 and "unknown toy data split 'test'" in bad.output
    assert not (tmp_path / "x").exists()
