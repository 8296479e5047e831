"""Pair generation: two images per selected prompt from the current model, for annotators.

Each prompt gets two images with the same sampler settings and different
initial noise, the setting of UniFL's preference data (two images per prompt,
4-5 annotators voting per dimension). The output directory holds
`images/<pair_id>_a.png`, `images/<pair_id>_b.png` and the pair manifest
(`unifl.labeling.tasks.PAIR_MANIFEST_NAME`, the schema shared with labeling;
image paths relative to the directory). It is written whole or not at all.

Seeds: prompts are sampled in chunks; chunk `c` runs
`unifl.models.sampler.generate` with run seed `prompt_seed(seed, c)` on the
list [p0, p0, p1, p1, ...], so image A of a prompt is at an even position and
B at the next odd one. The manifest's `seed_a` / `seed_b` are the seeds of
each image's initial noise (`prompt_seed(run seed, position)`, the generator
seed `unifl.models.sampler.initial_noise` uses), unique per image, and the
whole directory is reproducible from (prompts, model, settings, `seed`).

`pair_id` is a hash of the prompt id, the model version, the seed and the
sampler settings: the same prompt gets a new pair id when the model or the
settings change, so labels of different generations never mix.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from unifl.data.prompts import prompt_id as make_prompt_id
from unifl.io import atomic_directory, check_output_apart, write_json
from unifl.labeling.tasks import PAIR_MANIFEST_NAME, write_pair_manifest

IMAGES_DIR = "images"
REPORT_FILE = "pairs_report.json"

if TYPE_CHECKING:
    from unifl.models.base import BaseModel


class PairGenerationError(ValueError):
    """Pair generation inputs are unusable (no prompts, duplicate ids, bad settings)."""


@dataclass
class PairGenerationReport:
    """What was generated, with which settings, and how long it took."""

    pairs: int
    images: int
    model_version: str
    steps: int
    guidance_scale: float
    timestep_spacing: str
    seed: int
    image_size: int
    seconds: float
    manifest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_id(
    prompt_id: str,
    model_version: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    timestep_spacing: str,
) -> str:
    """Stable id of one pair: 16 hex digits of a hash of everything that made it."""
    key = f"{prompt_id}|{model_version}|{seed}|{steps}|{guidance_scale!r}|{timestep_spacing}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _prompt_table(prompts: pd.DataFrame | Sequence[str], max_prompts: int | None) -> pd.DataFrame:
    if isinstance(prompts, pd.DataFrame):
        if "prompt" not in prompts.columns:
            raise PairGenerationError(
                f"prompt table has no 'prompt' column (columns: {list(prompts.columns)})"
            )
        table = prompts.reset_index(drop=True)
        if "prompt_id" not in table.columns:
            table = table.assign(prompt_id=[make_prompt_id(p) for p in table["prompt"]])
    else:
        texts = list(prompts)
        table = pd.DataFrame({"prompt": texts, "prompt_id": [make_prompt_id(p) for p in texts]})
    if max_prompts is not None:
        table = table.iloc[:max_prompts]
    if table.empty:
        raise PairGenerationError("no prompts to generate pairs for")
    bad = [
        row
        for row, text in enumerate(table["prompt"].tolist())
        if not isinstance(text, str) or not text.strip()
    ]
    if bad:
        raise PairGenerationError(f"prompt table row {bad[0]}: empty or missing prompt")
    duplicated = table["prompt_id"].duplicated()
    if duplicated.any():
        row = int(duplicated.to_numpy().nonzero()[0][0])
        raise PairGenerationError(
            f"prompt table row {row}: duplicate prompt_id {table['prompt_id'].iloc[row]!r}"
        )
    return table[["prompt_id", "prompt"]]


def generate_pairs(
    model: BaseModel,
    prompts: pd.DataFrame | Sequence[str],
    out_dir: str | Path,
    *,
    steps: int,
    guidance_scale: float,
    timestep_spacing: str,
    seed: int,
    model_version: str,
    batch_size: int = 16,
    max_prompts: int | None = None,
    show_progress: bool = True,
) -> PairGenerationReport:
    """Generate two images per prompt with `model` (a `unifl.models.base.BaseModel`).

    `prompts` is a curated prompt table (`prompt_id`, `prompt`) or a list of
    prompts. `batch_size` counts images per sampler batch; each chunk holds
    `max(1, batch_size // 2)` prompts so both images of a prompt share a batch.
    """
    from unifl.models.sampler import generate, prompt_seed, save_images

    if not model_version.strip():
        raise PairGenerationError("model_version must name the model that makes the images")
    if batch_size < 1:
        raise PairGenerationError(f"batch_size must be >= 1, got {batch_size}")
    table = _prompt_table(prompts, max_prompts)
    start = time.perf_counter()
    prompts_per_chunk = max(1, batch_size // 2)
    rows: list[dict[str, Any]] = []
    with atomic_directory(out_dir) as tmp:
        images_dir = tmp / IMAGES_DIR
        chunks = range(0, len(table), prompts_per_chunk)
        bar = tqdm(total=len(table), desc="generate pairs", unit="pair", disable=not show_progress)
        for chunk_index, first in enumerate(chunks):
            chunk = table.iloc[first : first + prompts_per_chunk]
            texts = chunk["prompt"].tolist()
            doubled = [text for text in texts for _ in range(2)]
            run_seed = prompt_seed(seed, chunk_index)
            images = generate(
                model,
                doubled,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=run_seed,
                timestep_spacing=timestep_spacing,
                batch_size=batch_size,
            )
            names = []
            for position, (pid, text) in enumerate(zip(chunk["prompt_id"], texts, strict=True)):
                identifier = pair_id(
                    pid, model_version, seed, steps, guidance_scale, timestep_spacing
                )
                names += [f"{identifier}_a.png", f"{identifier}_b.png"]
                rows.append(
                    {
                        "pair_id": identifier,
                        "prompt": text,
                        "image_a": f"{IMAGES_DIR}/{identifier}_a.png",
                        "image_b": f"{IMAGES_DIR}/{identifier}_b.png",
                        "seed_a": prompt_seed(run_seed, 2 * position),
                        "seed_b": prompt_seed(run_seed, 2 * position + 1),
                        "model_version": model_version,
                        "steps": steps,
                        "guidance_scale": float(guidance_scale),
                        "timestep_spacing": timestep_spacing,
                    }
                )
            save_images(images, images_dir, names)
            bar.update(len(texts))
        bar.close()
        write_pair_manifest(tmp / PAIR_MANIFEST_NAME, rows)
        report = PairGenerationReport(
            pairs=len(rows),
            images=2 * len(rows),
            model_version=model_version,
            steps=steps,
            guidance_scale=float(guidance_scale),
            timestep_spacing=timestep_spacing,
            seed=seed,
            image_size=int(images.shape[-1]),
            seconds=round(time.perf_counter() - start, 3),
            manifest=str(Path(out_dir) / PAIR_MANIFEST_NAME),
        )
        write_json(tmp / REPORT_FILE, report.to_dict())
    return report


def run_pairs_stage(
    params: Any,
    prompts_path: str | Path,
    model_source: str | Path,
    out_dir: str | Path,
    model_version: str | None = None,
    show_progress: bool = True,
) -> PairGenerationReport:
    """The `generate-pairs` stage: read the curated prompts, load the model, `generate_pairs`.

    Settings: `pairs.steps`, `pairs.guidance_scale`, `pairs.max_prompts`,
    `sampling.timestep_spacing`, `sampling.batch_size`, `project.seed`.
    `model_version` defaults to the model source as given.
    """
    from unifl.data.prompts import read_prompts
    from unifl.models.base import load_base_model
    from unifl.models.precision import precision_from_config

    check_output_apart(out_dir, [prompts_path, model_source])
    table = read_prompts(prompts_path)
    device, dtype, vae_dtype = precision_from_config(params.project)
    model = load_base_model(
        model_source, params.model.family, device=device, dtype=dtype, vae_dtype=vae_dtype
    )
    return generate_pairs(
        model,
        table,
        out_dir,
        steps=params.pairs.steps,
        guidance_scale=params.pairs.guidance_scale,
        timestep_spacing=params.sampling.timestep_spacing,
        seed=int(params.project.seed),
        model_version=model_version or str(model_source),
        batch_size=params.sampling.batch_size,
        max_prompts=params.pairs.max_prompts,
        show_progress=show_progress,
    )
