"""Toy data sets: in memory (`generate_toy_batch`) or as a versionable directory.

Directory layout written by `write_toy_dataset` (PNG + JSONL, friendly to DVC
and to a human opening it)::

    images/000000.png             RGB uint8
    masks/instance/000000.png     uint8, 0 background, 1..k objects in caption order
    masks/semantic/000000.png     uint8, class ids of `unifl.toy.world.CLASS_NAMES`
    annotations.jsonl             one row per image (see `annotation_row`)
    manifest.json                 config, seed, count, classes and a content hash

The content hash covers every file but the manifest (sorted relative paths and
their bytes), so two directories with the same hash hold the same data, and
the same config and seed always give the same hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from unifl.io import atomic_directory, read_jsonl, write_json, write_jsonl
from unifl.toy.world import (
    CLASS_NAMES,
    NUM_SEMANTIC_CLASSES,
    WORLD_VERSION,
    Rendering,
    object_annotations,
    render_scene,
    sample_scene,
    scene_rng,
)

DATASET_FORMAT = "unifl-toy-dataset/1"
EVAL_SEED_OFFSET = 1
"""Evaluation images use seed `toy.seed + EVAL_SEED_OFFSET`, so they never repeat training images."""
MANIFEST_NAME = "manifest.json"
ANNOTATIONS_NAME = "annotations.jsonl"


@dataclass
class ToyArrays:
    """A toy data set in memory.

    images: uint8 [N, H, W, 3]; instance_masks, semantic_masks: uint8 [N, H, W];
    captions: N strings; annotations: N rows as in annotations.jsonl.
    """

    images: np.ndarray
    instance_masks: np.ndarray
    semantic_masks: np.ndarray
    captions: list[str]
    annotations: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.captions)

    def image_tensor(self) -> torch.Tensor:
        """Images as float [N, 3, H, W] in [0, 1], the layout every model here takes."""
        return images_to_tensor(self.images)

    def semantic_tensor(self) -> torch.Tensor:
        """Semantic masks as long [N, H, W]."""
        return torch.from_numpy(self.semantic_masks.astype(np.int64))

    def instance_tensor(self) -> torch.Tensor:
        """Instance masks as long [N, H, W]."""
        return torch.from_numpy(self.instance_masks.astype(np.int64))

    def subset(self, indices: list[int] | np.ndarray) -> ToyArrays:
        index = np.asarray(indices, dtype=np.int64)
        return ToyArrays(
            self.images[index],
            self.instance_masks[index],
            self.semantic_masks[index],
            [self.captions[i] for i in index],
            [self.annotations[i] for i in index],
        )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or [H, W, 3]) -> float [N, 3, H, W] (or [3, H, W]) in [0, 1]."""
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [..., H, W, 3], got {images.dtype} {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return tensor.movedim(-1, -3).contiguous()


def annotation_row(index: int, rendering: Rendering) -> dict[str, Any]:
    """The annotations.jsonl row of image `index`.

    Fields: id, image / instance_mask / semantic_mask (relative paths), caption,
    background {kind, level, amplitude, period, orientation}, objects (see
    `unifl.toy.world.object_annotations`), relations [[i, word, j], ...].
    """
    name = f"{index:06d}.png"
    background = rendering.scene.background
    return {
        "id": f"{index:06d}",
        "image": f"images/{name}",
        "instance_mask": f"masks/instance/{name}",
        "semantic_mask": f"masks/semantic/{name}",
        "caption": rendering.scene.caption(),
        "background": {
            "kind": background.kind,
            "level": round(background.level, 6),
            "amplitude": round(background.amplitude, 6),
            "period": round(background.period, 6),
            "orientation": background.orientation,
        },
        "objects": object_annotations(rendering),
        "relations": [list(relation) for relation in rendering.scene.relations],
    }


def _check_config(num_images: int, resolution: int, min_objects: int, max_objects: int) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if resolution < 8 or resolution % 4:
        raise ValueError(f"resolution must be a multiple of 4 and >= 8, got {resolution}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}"
        )


def _renderings(
    num_images: int,
    seed: int,
    resolution: int,
    min_objects: int,
    max_objects: int,
    start_index: int,
    progress: bool,
    description: str,
):
    for offset in tqdm(range(num_images), desc=description, disable=not progress, leave=False):
        index = start_index + offset
        scene = sample_scene(scene_rng(seed, index), min_objects, max_objects)
        yield index, render_scene(scene, resolution)


def generate_toy_batch(
    num_images: int,
    seed: int,
    resolution: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    start_index: int = 0,
    progress: bool = False,
) -> ToyArrays:
    """Images `start_index ..` of `seed` in memory, without writing files.

    Image `i` is identical to image `i` of `write_toy_dataset` with the same
    arguments, so a batch generated here and a directory written there agree.
    """
    _check_config(num_images, resolution, min_objects, max_objects)
    images = np.empty((num_images, resolution, resolution, 3), dtype=np.uint8)
    instance = np.empty((num_images, resolution, resolution), dtype=np.uint8)
    semantic = np.empty((num_images, resolution, resolution), dtype=np.uint8)
    captions: list[str] = []
    annotations: list[dict[str, Any]] = []
    renderings = _renderings(
        num_images, seed, resolution, min_objects, max_objects, start_index, progress, "toy images"
    )
    for position, (index, rendering) in enumerate(renderings):
        images[position] = rendering.image
        instance[position] = rendering.instance_mask
        semantic[position] = rendering.semantic_mask
        row = annotation_row(index, rendering)
        captions.append(row["caption"])
        annotations.append(row)
    return ToyArrays(images, instance, semantic, captions, annotations)


def split_size_and_seed(toy: Any, split: str) -> tuple[int, int]:
    """(number of images, seed) of a split of the `toy` params section: 'train' or 'eval'."""
    if split == "train":
        return int(toy.num_train), int(toy.seed)
    if split == "eval":
        return int(toy.num_eval), int(toy.seed) + EVAL_SEED_OFFSET
    raise ValueError(f"unknown toy data split {split!r}; expected 'train' or 'eval'")


def content_hash(directory: str | Path) -> str:
    """sha256 over every file of a data set directory except the manifest."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST_NAME:
            continue
        digest.update(relative.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def write_toy_dataset(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    resolution: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a toy data set directory (layout in the module docstring) and return its manifest.

    The directory appears whole or not at all; an existing one is replaced.
    """
    _check_config(num_images, resolution, min_objects, max_objects)
    config = {
        "num_images": num_images,
        "seed": seed,
        "resolution": resolution,
        "min_objects": min_objects,
        "max_objects": max_objects,
    }
    with atomic_directory(out_dir) as tmp:
        for sub in ("images", "masks/instance", "masks/semantic"):
            (tmp / sub).mkdir(parents=True)
        rows = []
        renderings = _renderings(
            num_images, seed, resolution, min_objects, max_objects, 0, progress, "writing toy data"
        )
        for index, rendering in renderings:
            row = annotation_row(index, rendering)
            Image.fromarray(rendering.image).save(tmp / row["image"])
            Image.fromarray(rendering.instance_mask).save(tmp / row["instance_mask"])
            Image.fromarray(rendering.semantic_mask).save(tmp / row["semantic_mask"])
            rows.append(row)
        write_jsonl(tmp / ANNOTATIONS_NAME, rows)
        manifest = {
            "format": DATASET_FORMAT,
            "world_version": WORLD_VERSION,
            "config": config,
            "seed": seed,
            "count": num_images,
            "classes": list(CLASS_NAMES),
            "content_hash": content_hash(tmp),
        }
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a data set directory; a clear error if it is missing or not ours."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no toy data set manifest here") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc.msg}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise ValueError(f"{path}: 'format' must be {DATASET_FORMAT!r}")
    return manifest


def verify_toy_dataset(directory: str | Path) -> dict[str, Any]:
    """Recompute the content hash and compare it with the manifest; return the manifest."""
    manifest = read_manifest(directory)
    actual = content_hash(directory)
    if actual != manifest.get("content_hash"):
        raise ValueError(
            f"{Path(directory) / MANIFEST_NAME}: content_hash {manifest.get('content_hash')!r} "
            f"does not match the files ({actual!r}); the data set was modified"
        )
    return manifest


def _read_rows(directory: Path) -> list[dict[str, Any]]:
    path = directory / ANNOTATIONS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing annotations of the toy data set")
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        for key in ("id", "image", "instance_mask", "semantic_mask", "caption", "objects"):
            if key not in row:
                raise ValueError(f"{path}:{number}: missing field {key!r}")
    return rows


def _read_png(path: Path, mode: str, shape: tuple[int, ...], row_label: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode != mode:
                raise ValueError(f"{path} ({row_label}): PNG mode {image.mode}, expected {mode}")
            array = np.array(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} ({row_label}): file missing") from None
    if shape and array.shape != shape:
        raise ValueError(f"{path} ({row_label}): shape {array.shape}, expected {shape}")
    return array


def _read_example(directory: Path, row: dict[str, Any], number: int, resolution: int | None):
    label = f"{ANNOTATIONS_NAME} row {number}, id {row['id']}"
    image_shape: tuple[int, ...] = (resolution, resolution, 3) if resolution else ()
    mask_shape: tuple[int, ...] = (resolution, resolution) if resolution else ()
    image = _read_png(directory / row["image"], "RGB", image_shape, label)
    instance = _read_png(
        directory / row["instance_mask"], "L", mask_shape or image.shape[:2], label
    )
    semantic = _read_png(
        directory / row["semantic_mask"], "L", mask_shape or image.shape[:2], label
    )
    if semantic.max(initial=0) >= NUM_SEMANTIC_CLASSES:
        raise ValueError(f"{directory / row['semantic_mask']} ({label}): class id out of range")
    return image, instance, semantic


def load_toy_arrays(
    directory: str | Path, verify: bool = False, progress: bool = False
) -> ToyArrays:
    """Load a whole data set directory into memory (fast enough for thousands of images).

    `verify=True` first checks the content hash against the manifest.
    """
    root = Path(directory)
    manifest = verify_toy_dataset(root) if verify else read_manifest(root)
    resolution = int(manifest["config"]["resolution"])
    rows = _read_rows(root)
    if len(rows) != manifest["count"]:
        raise ValueError(
            f"{root / ANNOTATIONS_NAME}: {len(rows)} rows, manifest count is {manifest['count']}"
        )
    images = np.empty((len(rows), resolution, resolution, 3), dtype=np.uint8)
    instance = np.empty((len(rows), resolution, resolution), dtype=np.uint8)
    semantic = np.empty((len(rows), resolution, resolution), dtype=np.uint8)
    for number, row in enumerate(tqdm(rows, desc="loading toy data", disable=not progress), 1):
        images[number - 1], instance[number - 1], semantic[number - 1] = _read_example(
            root, row, number, resolution
        )
    return ToyArrays(images, instance, semantic, [r["caption"] for r in rows], rows)


class ToyDataset(Dataset):
    """A toy data set directory as a torch Dataset, read lazily one example at a time.

    Each item is a dict: image float [3, H, W] in [0, 1], caption str,
    semantic_mask long [H, W], instance_mask long [H, W], id str.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.rows = _read_rows(self.directory)
        self.resolution = int(self.manifest["config"]["resolution"])

    def __len__(self) -> int:
        return len(self.rows)

    def caption(self, index: int) -> str:
        """Example `index`'s caption, without reading its image."""
        return str(self.rows[index]["caption"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image, instance, semantic = _read_example(self.directory, row, index + 1, self.resolution)
        return {
            "id": row["id"],
            "image": images_to_tensor(image),
            "caption": row["caption"],
            "semantic_mask": torch.from_numpy(semantic.astype(np.int64)),
            "instance_mask": torch.from_numpy(instance.astype(np.int64)),
        }
