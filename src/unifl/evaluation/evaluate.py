"""Evaluate a diffusion model: per-prompt metrics, set metrics, sample grids and a report.

For every step count of `evaluate.steps` (default 20 and 4) and every seed of
`evaluate.seeds`, the model generates one image per prompt; then:

* per image (and so per prompt): `caption_match` (the image's share of the
  caption's objects that the toy segmenter finds), `extra_objects` (object
  regions beyond the caption's objects, which caption-match does not count
  against an image) and `oracle_<dim>` (toy world, when a segmenter is given;
  the layout oracle reads the segmenter's predicted masks), `reward_<dim>`
  (when a `DecoupledRewardModel` is given), `clip_score` (when a CLIP scorer
  is given);
* per step count: the means of those (`caption_match`: the pooled rate,
  matched over named objects of all images), `reward_<dim>_std`, `frechet`
  (Fréchet distance to real-image features, when given), `images_per_second`
  (generation only, after an untimed warm-up batch).

The initial noise of a prompt depends on the seed and the prompt's position,
so candidate and champion evaluated with the same prompts and config draw the
same noise for each prompt (see `chunk_seed`).

Names: a value at S steps is `<metric>_<S>steps` (e.g. `caption_match_20steps`)
both in the summary and as a column of the per-prompt table, so a promotion
gate names one metric the same way in both.

Outputs (`out_dir`, replaced as a whole, never half-written):

    metrics.json        the flat summary {name: number} (DVC metrics, MLflow metrics)
    evaluation.json     summary by step count, settings, prompt count, file names
    per_prompt.csv      one row per (prompt_id, seed): prompt_id, prompt, seed,
    per_prompt.parquet  <metric>_<S>steps columns; the promotion gate pairs
                        candidate and champion rows by prompt_id
    per_sample.parquet  long form: prompt_id, prompt, steps, seed, <metric> columns
    per_sample.csv
    grid_<S>steps.png   the first `grid_prompts` prompts, seed `seeds[0]`: baseline
                        (before) and model (after) rows from the same prompts and seed
    grid_steps.png      the model at every step count, same prompts and seed
    report.md / .html   the summary table and the grids
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from unifl.config import DIMENSIONS, EvaluateConfig, Params
from unifl.evaluation.clip_score import ClipScorer
from unifl.evaluation.frechet import (
    BackboneFeatureExtractor,
    FeatureExtractor,
    extract_features,
    frechet_distance,
)
from unifl.evaluation.grids import save_comparison_grid
from unifl.evaluation.report import write_report
from unifl.evaluation.throughput import timed_generate, warm_up
from unifl.io import atomic_directory, check_output_apart, split_lines, write_json

logger = logging.getLogger(__name__)

KEY_COLUMNS: tuple[str, ...] = ("prompt_id", "prompt")
CAPTION_OBJECTS = "caption_objects"
"""Objects named by each caption: weights per-image caption-match into the pooled rate."""


class EvaluationError(ValueError):
    """Inputs of an evaluation are unusable; the message names the file, row or argument."""


def metric_name(metric: str, steps: int) -> str:
    """The name of `metric` at `steps` sampling steps in summaries and per-prompt tables."""
    return f"{metric}_{steps}steps"


def is_few_step(config: EvaluateConfig, steps: int) -> bool:
    """Whether `steps` counts as few-step sampling (`few_step_max`)."""
    return steps <= config.few_step_max


def resolve_timestep_spacing(config: EvaluateConfig, steps: int) -> str:
    """'auto': trailing DDIM at few steps (the inferred few-step sampler), leading otherwise."""
    if config.timestep_spacing != "auto":
        return config.timestep_spacing
    return "trailing" if is_few_step(config, steps) else "leading"


def resolve_guidance_scale(config: EvaluateConfig, steps: int) -> float:
    """`few_step_guidance_scale` at few steps when set, else `guidance_scale`."""
    if config.few_step_guidance_scale is not None and is_few_step(config, steps):
        return config.few_step_guidance_scale
    return config.guidance_scale


# --------------------------------------------------------------------------- inputs


def _prompt_frame(prompts: Sequence[str], source: str) -> pd.DataFrame:
    from unifl.data.prompts import normalize_prompt, prompt_id

    texts = []
    for row, text in enumerate(prompts, start=1):
        if not isinstance(text, str) or not normalize_prompt(text):
            raise EvaluationError(f"{source}: row {row}: empty or missing prompt ({text!r})")
        texts.append(normalize_prompt(text))
    return pd.DataFrame({"prompt_id": [prompt_id(t) for t in texts], "prompt": texts})


def prompt_table(
    prompts: Sequence[str] | pd.DataFrame, source: str = "<prompts>", limit: int | None = None
) -> pd.DataFrame:
    """Prompts as a table `prompt_id, prompt`: ids kept when given, else the curated-prompt
    hash (`unifl.data.prompts.prompt_id`) of the normalised text; duplicates keep the first."""
    if isinstance(prompts, pd.DataFrame):
        if "prompt" not in prompts.columns:
            raise EvaluationError(f"{source}: no 'prompt' column ({list(prompts.columns)})")
        frame = _prompt_frame(prompts["prompt"].tolist(), source)
        if "prompt_id" in prompts.columns:
            frame["prompt_id"] = prompts["prompt_id"].astype(str).to_numpy()
    else:
        frame = _prompt_frame(list(prompts), source)
    frame = frame.drop_duplicates("prompt_id", keep="first").reset_index(drop=True)
    if limit is not None:
        frame = frame.iloc[:limit].reset_index(drop=True)
    if frame.empty:
        raise EvaluationError(f"{source}: no prompts")
    return frame


def load_eval_prompts(path: str | Path, limit: int | None = None) -> pd.DataFrame:
    """Evaluation prompts from a curated prompt table (directory or Parquet with `prompt_id`),
    a toy data set directory (its captions), a CSV/JSONL/Parquet file with a `prompt`
    column, or a text file with one prompt per line."""
    from unifl.data.prompts import PROMPTS_FILE, read_prompt_source, read_prompts

    source = Path(path)
    if source.is_dir():
        if (source / PROMPTS_FILE).is_file():
            return prompt_table(read_prompts(source), str(source), limit)
        from unifl.io import read_jsonl
        from unifl.toy.dataset import ANNOTATIONS_NAME

        if (source / ANNOTATIONS_NAME).is_file():
            rows = read_jsonl(source / ANNOTATIONS_NAME)
            missing = [n for n, row in enumerate(rows, start=1) if "caption" not in row]
            if missing:
                raise EvaluationError(f"{source / ANNOTATIONS_NAME}:{missing[0]}: no 'caption'")
            return prompt_table([row["caption"] for row in rows], str(source), limit)
        raise EvaluationError(
            f"{source}: neither a curated prompt directory ({PROMPTS_FILE}) nor a toy data set "
            f"({ANNOTATIONS_NAME})"
        )
    if not source.is_file():
        raise EvaluationError(f"{source}: prompt file not found")
    if source.suffix.lower() == ".txt":
        lines = [line for line in split_lines(source.read_text(encoding="utf-8")) if line.strip()]
        return prompt_table(lines, str(source), limit)
    if source.suffix.lower() == ".parquet":
        columns = pd.read_parquet(source).columns
        if "prompt_id" in columns:
            return prompt_table(read_prompts(source), str(source), limit)
    frame = read_prompt_source(source)
    bad = frame["prompt"].isna()
    if bad.any():
        row = int(frame.loc[bad, "source_row"].iloc[0])
        raise EvaluationError(f"{source}: row {row}: missing prompt")
    return prompt_table(frame["prompt"].tolist(), str(source), limit)


def load_reference_images(
    path: str | Path, limit: int | None = None, size: int | None = None
) -> Tensor:
    """Real images [N, 3, size, size] in [0, 1]: a toy data set directory or a folder of images."""
    from unifl.feedback.images import load_image_uint8, to_unit_float

    root = Path(path)
    if not root.is_dir():
        raise EvaluationError(f"{root}: reference image directory not found")
    from unifl.toy.dataset import ANNOTATIONS_NAME

    if (root / ANNOTATIONS_NAME).is_file():
        from unifl.toy.dataset import images_to_tensor, load_toy_arrays

        images = images_to_tensor(load_toy_arrays(root).images)
        images = images[:limit] if limit is not None else images
        tensors = list(images)
    else:
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
        )
        if limit is not None:
            files = files[:limit]
        tensors = [to_unit_float(load_image_uint8(p)) for p in files]
    if len(tensors) < 2:
        raise EvaluationError(f"{root}: need at least 2 reference images, found {len(tensors)}")
    resized = []
    for image in tensors:
        if size is not None and tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[
                0
            ]
        resized.append(image)
    shapes = {tuple(image.shape) for image in resized}
    if len(shapes) != 1:
        raise EvaluationError(f"{root}: images of different sizes {sorted(shapes)}; give a size")
    return torch.stack(resized)


# --------------------------------------------------------------------------- metrics


@dataclass
class EvaluationResult:
    """What an evaluation measured; `files` are set when it was written to a directory."""

    summary: dict[str, float]
    by_steps: dict[int, dict[str, float]]
    per_prompt: pd.DataFrame
    per_sample: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _batched(values: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


def image_metrics(
    images: Tensor,
    prompts: Sequence[str],
    segmenter: Any | None = None,
    reward_model: Any | None = None,
    clip: ClipScorer | None = None,
) -> dict[str, Tensor]:
    """Per-image metrics `{name: Tensor[N]}` of generated images for their prompts."""
    metrics: dict[str, Tensor] = {}
    with torch.no_grad():
        if segmenter is not None:
            from unifl.toy.caption_match import match_masks, predicted_masks
            from unifl.toy.oracle import oracle_scores
            from unifl.toy.world import CaptionError

            try:
                masks = predicted_masks(segmenter, images).to(images.device)
                match = match_masks(masks, list(prompts))
                oracle = oracle_scores(images, list(prompts), masks)
            except CaptionError as exc:
                raise EvaluationError(
                    f"toy metrics need toy captions as prompts (a segmenter was given): {exc}"
                ) from exc
            metrics["caption_match"] = torch.as_tensor(match.per_image).float().cpu()
            metrics["extra_objects"] = match.extra_objects.float().cpu()
            metrics[CAPTION_OBJECTS] = match.objects.float().cpu()
            for dimension, values in oracle.items():
                metrics[f"oracle_{dimension}"] = values.float().cpu()
        if reward_model is not None:
            rewards = reward_model(images.to(_module_device(reward_model)), list(prompts))
            for dimension in DIMENSIONS:
                if dimension in rewards:
                    metrics[f"reward_{dimension}"] = rewards[dimension].float().cpu()
        if clip is not None:
            metrics["clip_score"] = clip(images, list(prompts)).float().cpu()
    return metrics


def _module_device(module: Any) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def _default_extractor(segmenter: Any | None) -> FeatureExtractor | None:
    features = getattr(segmenter, "features", None)
    return features if callable(features) else None


IMAGES_PER_CHUNK = 256
"""Prompts generated per sampler call: bounds the images held in memory at once."""


def chunk_seed(seed: int, chunk: int) -> int:
    """Run seed of prompt chunk `chunk`: `seed` itself for the first chunk (so grids drawn
    from the first prompts with `seed` show the evaluated samples), a well-mixed derived
    seed for the others (so no two prompts share their initial noise)."""
    from unifl.models.sampler import prompt_seed

    return seed if chunk == 0 else prompt_seed(seed, 2**32 + chunk)


def _generate_and_measure(
    model: Any,
    table: pd.DataFrame,
    config: EvaluateConfig,
    steps: int,
    seed: int,
    measure: Callable[[Tensor, Sequence[str]], dict[str, Tensor]],
    extractor: FeatureExtractor | None,
    bar: tqdm,
) -> tuple[dict[str, list[Tensor]], list[Tensor], float, int]:
    spacing = resolve_timestep_spacing(config, steps)
    metrics: dict[str, list[Tensor]] = {}
    features: list[Tensor] = []
    seconds, count = 0.0, 0
    prompts = table["prompt"].tolist()
    for chunk, chunk_prompts in enumerate(_batched(prompts, IMAGES_PER_CHUNK)):
        images, elapsed = timed_generate(
            model,
            chunk_prompts,
            steps,
            resolve_guidance_scale(config, steps),
            chunk_seed(seed, chunk),
            spacing,
            config.batch_size,
        )
        seconds += elapsed
        count += int(images.shape[0])
        images = images.detach().float()
        for start in range(0, len(chunk_prompts), config.batch_size):
            batch_images = images[start : start + config.batch_size]
            batch_prompts = chunk_prompts[start : start + config.batch_size]
            for name, values in measure(batch_images, batch_prompts).items():
                metrics.setdefault(name, []).append(values)
            if extractor is not None:
                features.append(extract_features(extractor, batch_images))
            bar.update(len(batch_prompts))
    return metrics, features, seconds, count


def evaluate_model(
    model: Any,
    prompts: Sequence[str] | pd.DataFrame,
    config: EvaluateConfig,
    segmenter: Any | None = None,
    reward_model: Any | None = None,
    real_features: Tensor | None = None,
    clip: ClipScorer | None = None,
    out_dir: str | Path | None = None,
    feature_extractor: FeatureExtractor | None = None,
    baseline: Any | None = None,
    labels: tuple[str, str] = ("baseline", "model"),
    progress: bool = True,
) -> EvaluationResult:
    """Generate, measure and (with `out_dir`) write metrics, tables, grids and a report.

    `prompts`: texts, or a table with `prompt` (and optionally `prompt_id`);
    the first `config.num_prompts` are used. `real_features`: features of real
    images by the same extractor (`feature_extractor`, default the segmenter's
    `.features`); without them there is no Fréchet distance. `baseline`: a
    second model drawn with the same prompts and seed in the grids (before /
    after, labelled by `labels`).
    """
    if config.batch_size < 1:
        raise EvaluationError("evaluate.batch_size must be at least 1")
    table = prompt_table(prompts, limit=config.num_prompts)
    extractor = feature_extractor or _default_extractor(segmenter)
    if real_features is not None and extractor is None:
        raise EvaluationError(
            "real_features were given but no feature extractor: pass feature_extractor= "
            "or a segmenter with .features"
        )
    extractor_for_frechet = extractor if real_features is not None else None

    def measure(images: Tensor, batch_prompts: Sequence[str]) -> dict[str, Tensor]:
        return image_metrics(images, batch_prompts, segmenter, reward_model, clip)

    by_steps: dict[int, dict[str, float]] = {}
    long_rows: list[pd.DataFrame] = []
    total = len(config.steps) * len(config.seeds) * len(table)
    bar = tqdm(total=total, desc="evaluating", unit="img", disable=not progress)
    for steps in config.steps:
        spacing = resolve_timestep_spacing(config, steps)
        if config.warmup:
            warm_up(
                model,
                table["prompt"].tolist(),
                steps,
                resolve_guidance_scale(config, steps),
                spacing,
                config.batch_size,
            )
        seconds, count = 0.0, 0
        step_metrics: dict[str, list[Tensor]] = {}
        step_features: list[Tensor] = []
        for seed in config.seeds:
            metrics, features, elapsed, generated = _generate_and_measure(
                model, table, config, steps, seed, measure, extractor_for_frechet, bar
            )
            seconds += elapsed
            count += generated
            step_features.extend(features)
            frame = table.copy()
            frame.insert(2, "steps", steps)
            frame.insert(3, "seed", seed)
            for name, parts in metrics.items():
                if name != CAPTION_OBJECTS:
                    frame[name] = torch.cat(parts).numpy().astype(np.float64)
                step_metrics.setdefault(name, []).append(torch.cat(parts))
            long_rows.append(frame)
        summary: dict[str, float] = {}
        objects = step_metrics.pop(CAPTION_OBJECTS, None)
        for name, parts in step_metrics.items():
            values = torch.cat(parts).double()
            summary[name] = float(values.mean())
            if name == "caption_match" and objects is not None:
                # The toy world's rate pools objects over images (matched / named).
                weights = torch.cat(objects).double()
                summary[name] = float((values * weights).sum() / weights.sum())
            if name.startswith("reward_"):
                summary[f"{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
        if extractor_for_frechet is not None and real_features is not None:
            generated = torch.cat(step_features)
            summary["frechet"] = frechet_distance(generated, real_features, eps=config.frechet_eps)
            samples, dims = min(len(generated), len(real_features)), real_features.shape[1]
            if samples <= dims:
                logger.warning(
                    "Fréchet distance at %d steps from %d samples of %d-dimensional features: "
                    "the covariances are singular and the distance grows as the samples "
                    "shrink; compare it only between evaluations with as many samples "
                    "(evaluate.num_prompts, evaluate.seeds)",
                    steps,
                    samples,
                    dims,
                )
        summary["images_per_second"] = count / seconds if seconds > 0 else float("inf")
        summary["num_images"] = float(count)
        by_steps[steps] = summary
    bar.close()

    per_sample = pd.concat(long_rows, ignore_index=True)
    per_prompt = wide_per_prompt(per_sample)
    flat = {
        metric_name(name, steps): value
        for steps, summary in by_steps.items()
        for name, value in summary.items()
    }
    settings = {
        "steps": list(config.steps),
        "seeds": list(config.seeds),
        "num_prompts": len(table),
        "guidance_scale": {str(s): resolve_guidance_scale(config, s) for s in config.steps},
        "timestep_spacing": {str(s): resolve_timestep_spacing(config, s) for s in config.steps},
        "batch_size": config.batch_size,
        "model": str(getattr(model, "source", "")),
        "baseline": str(getattr(baseline, "source", "")) if baseline is not None else None,
        "frechet_features": _extractor_name(extractor_for_frechet, segmenter),
        # The distance depends on these: compare it only between equal ones.
        "frechet_feature_dims": None if real_features is None else int(real_features.shape[1]),
        "frechet_real_samples": None if real_features is None else len(real_features),
    }
    result = EvaluationResult(flat, by_steps, per_prompt, per_sample, settings)
    if out_dir is not None:
        grid_prompts = table["prompt"].tolist()[: config.grid_prompts]
        grids = sample_grids({labels[0]: baseline, labels[1]: model}, grid_prompts, config)
        write_evaluation(result, out_dir, grids, grid_prompts, labels)
    return result


def _extractor_name(extractor: Any | None, segmenter: Any | None) -> str | None:
    if extractor is None:
        return None
    if segmenter is not None and extractor == getattr(segmenter, "features", None):
        return f"{type(segmenter).__name__}.features"
    return getattr(extractor, "__qualname__", type(extractor).__name__)


def wide_per_prompt(per_sample: pd.DataFrame) -> pd.DataFrame:
    """One row per (prompt_id, seed) with `<metric>_<S>steps` columns from the long table."""
    metrics = [c for c in per_sample.columns if c not in (*KEY_COLUMNS, "steps", "seed")]
    parts = []
    for steps, group in per_sample.groupby("steps", sort=False):
        renamed = group.rename(columns={m: metric_name(m, int(steps)) for m in metrics})
        parts.append(renamed.drop(columns=["steps"]).set_index([*KEY_COLUMNS, "seed"]))
    wide = pd.concat(parts, axis=1).reset_index()
    return wide


# --------------------------------------------------------------------------- outputs


def sample_grids(
    models: Mapping[str, Any],
    prompts: Sequence[str],
    config: EvaluateConfig,
) -> dict[int, dict[str, Tensor]]:
    """Grid images per step count: `{steps: {label: images}}`, one row per model of
    `models` (label -> model, in their order; None is skipped), all from the same prompts
    and the same seed (`config.seeds[0]`)."""
    grids: dict[int, dict[str, Tensor]] = {}
    for steps in config.steps:
        spacing = resolve_timestep_spacing(config, steps)
        rows: dict[str, Tensor] = {}
        for label, candidate in models.items():
            if candidate is None:
                continue
            images, _ = timed_generate(
                candidate,
                list(prompts),
                steps,
                resolve_guidance_scale(config, steps),
                config.seeds[0],
                spacing,
                config.batch_size,
            )
            rows[label] = images.detach().float().cpu()
        grids[steps] = rows
    return grids


def write_evaluation(
    result: EvaluationResult,
    out_dir: str | Path,
    grids: Mapping[int, Mapping[str, Tensor]],
    grid_prompts: Sequence[str],
    labels: tuple[str, str] = ("baseline", "model"),
) -> dict[str, Path]:
    """Write metrics, tables, grids and the report into `out_dir` (replaced atomically)."""
    target = Path(out_dir)
    seed = result.settings.get("seeds", [0])[0]
    names: dict[str, str] = {}
    with atomic_directory(target) as tmp:
        write_json(tmp / "metrics.json", _finite(result.summary))
        result.per_prompt.to_csv(tmp / "per_prompt.csv", index=False)
        result.per_prompt.to_parquet(tmp / "per_prompt.parquet", index=False)
        result.per_sample.to_parquet(tmp / "per_sample.parquet", index=False)
        result.per_sample.to_csv(tmp / "per_sample.csv", index=False)
        names.update(
            metrics="metrics.json",
            per_prompt="per_prompt.csv",
            per_prompt_parquet="per_prompt.parquet",
            per_sample="per_sample.parquet",
            per_sample_csv="per_sample.csv",
        )
        captions: dict[str, str] = {}
        for steps, rows in grids.items():
            name = f"grid_{steps}steps.png"
            save_comparison_grid(
                rows, grid_prompts, tmp / name, title=f"{steps} steps, seed {seed}"
            )
            names[f"grid_{steps}steps"] = name
            captions[name] = f"{steps} steps, rows: {' / '.join(rows)}"
        model_rows = {
            f"{steps} steps": rows[labels[1]] for steps, rows in grids.items() if labels[1] in rows
        }
        if len(model_rows) > 1:
            save_comparison_grid(
                model_rows, grid_prompts, tmp / "grid_steps.png", title=f"{labels[1]}, seed {seed}"
            )
            names["grid_steps"] = "grid_steps.png"
            captions["grid_steps.png"] = f"{labels[1]} at each step count"
        names.update(write_report(result, tmp, names, captions))
        names["evaluation"] = "evaluation.json"
        write_json(
            tmp / "evaluation.json",
            {
                "summary_by_steps": {
                    str(s): _finite(values) for s, values in result.by_steps.items()
                },
                "settings": result.settings,
                "files": names,
            },
        )
    result.files = {key: target / name for key, name in names.items()}
    return result.files


def _finite(values: Mapping[str, float]) -> dict[str, float | None]:
    """JSON has no NaN/inf: such values are written as null."""
    return {k: (float(v) if np.isfinite(v) else None) for k, v in values.items()}


def summary_json(result: EvaluationResult) -> str:
    """The flat summary as indented JSON text (what the CLI prints)."""
    return json.dumps(_finite(result.summary), indent=2, sort_keys=True)


def run_evaluation(
    params: Params,
    model_source: str | Path,
    prompts_path: str | Path,
    out_dir: str | Path,
    segmenter_dir: str | Path | None = None,
    reward_dir: str | Path | None = None,
    real_data_dir: str | Path | None = None,
    baseline_source: str | Path | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """The `evaluate` stage: load everything named by paths and `params`, then `evaluate_model`.

    Device and precision follow `params.project`; CLIP score and production
    Fréchet features follow `params.evaluate.clip_model` / `feature_model`.
    """
    from unifl.models.base import load_base_model
    from unifl.models.precision import precision_from_config

    check_output_apart(
        out_dir,
        [model_source, prompts_path, segmenter_dir, reward_dir, real_data_dir, baseline_source],
    )
    config = params.evaluate
    device, dtype, vae_dtype = precision_from_config(params.project)
    table = load_eval_prompts(prompts_path, limit=config.num_prompts)
    model = load_base_model(
        model_source, params.model.family, device=device, dtype=dtype, vae_dtype=vae_dtype
    )
    baseline = None
    if baseline_source is not None:
        baseline = load_base_model(
            baseline_source, params.model.family, device=device, dtype=dtype, vae_dtype=vae_dtype
        )
    segmenter = None
    if segmenter_dir is not None:
        from unifl.models.segmenter import ToySegmenter

        segmenter = ToySegmenter.load(segmenter_dir, device=device)
    reward_model = None
    if reward_dir is not None:
        from unifl.models.reward import DecoupledRewardModel

        reward_model = DecoupledRewardModel.load(reward_dir, device=device)
    clip = ClipScorer.from_pretrained(config.clip_model) if config.clip_model else None
    if clip is not None:
        clip.model.to(device)
    extractor: FeatureExtractor | None = None
    if config.feature_model:
        extractor = BackboneFeatureExtractor.from_pretrained(config.feature_model).to(device)
    elif segmenter is not None:
        extractor = segmenter.features
    real_features = None
    if real_data_dir is not None:
        if extractor is None:
            raise EvaluationError(
                "--real-data needs a feature extractor: give --segmenter (toy world) or set "
                "evaluate.feature_model"
            )
        reference = load_reference_images(
            real_data_dir, limit=config.max_reference_images, size=model.image_size
        )
        real_features = extract_features(extractor, reference.to(device), config.batch_size)
    labels = ("baseline", Path(str(model_source)).name or "model")
    return evaluate_model(
        model,
        table,
        config,
        segmenter=segmenter,
        reward_model=reward_model,
        real_features=real_features,
        clip=clip,
        out_dir=out_dir,
        feature_extractor=extractor,
        baseline=baseline,
        labels=labels,
        progress=progress,
    )


def summary_table(result: EvaluationResult) -> str:
    """The summary as a plain-text table (metrics x step counts) for the terminal."""
    from unifl.evaluation.report import summary_rows

    header, rows = summary_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in [header, *rows]
    ]
    return "\n".join(lines)
