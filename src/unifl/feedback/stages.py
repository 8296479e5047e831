"""Entry points of the three UniFL stages, as the CLI, DVC and the pipeline call them.

Each `run_*` function reads its inputs from paths, builds the stage's trainer
from the configuration, trains (resuming from `out_dir/checkpoints` when a
checkpoint is there), and writes into `out_dir`:

    model/            the tuned model, a diffusers pipeline directory (LoRA merged)
    lora/             the LoRA adapter alone (pytorch_lora_weights.safetensors), with LoRA
    discriminator/    the trained discriminator (adversarial stage)
    real_samples/     its real images with adversarial.real_images: samples (PNG + manifest)
    checkpoints/      resumable checkpoints (the newest `trainer.keep_checkpoints`)
    history.json/csv  one row per optimisation step: losses, rewards, grad norms, lr
    metrics.json      the summary: means over the last steps, timings (DVC metrics)
    stage.json        what ran: stage, inputs, the configuration sections used

Every file is written whole or not at all; `out_dir` itself is not replaced,
because the checkpoints in it must survive an interrupted run.

The base model (`base`) is a diffusers directory, a hub id, or the name of a
toy preset ('toy-sd15', 'toy-sdxl': random weights, for smoke runs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unifl.feedback.trainer import (
    LORA_DIR,
    MODEL_DIR,
    ExportedModel,
    FeedbackTrainer,
    MetricsCallback,
    TrainingSummary,
)
from unifl.io import check_output_apart, write_json

if TYPE_CHECKING:
    from unifl.config import Params
    from unifl.models.base import BaseModel
    from unifl.models.reward import DecoupledRewardModel

SUMMARY_WINDOW = 10
"""Final metrics are means over this many last steps (one step's loss is noisy)."""
SUMMARY_SKIPPED = ("step", "seconds", "t", "timestep")
"""History columns without a meaningful mean (counters, timings, random draws)."""


@dataclass
class StageResult:
    """What a stage wrote and measured."""

    stage: str
    out_dir: Path
    model_dir: Path
    lora_dir: Path | None
    metrics: dict[str, float]
    history: list[dict[str, float]]
    resumed_from: int | None = None
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def discriminator_dir(self) -> Path | None:
        return self.extra.get("discriminator")


# --------------------------------------------------------------------------- inputs


def check_outputs_apart(out_dir: str | Path, *inputs: str | Path | Sequence[str] | None) -> None:
    """Refuse an `out_dir` whose replaced parts (model/, lora/, ...) are or hold an input.

    `out_dir` itself may hold inputs (a multi-node run stages them under it), but e.g.
    `--base runs/pefl/model --out runs/pefl` would replace the base model with the result.
    """
    from unifl.feedback.adversarial import DISCRIMINATOR_DIR, REAL_SAMPLES_DIR

    paths = [value for value in inputs if isinstance(value, str | Path)]
    for name in (MODEL_DIR, LORA_DIR, DISCRIMINATOR_DIR, REAL_SAMPLES_DIR):
        check_output_apart(Path(out_dir) / name, paths)


def load_stage_model(params: Params, base: str | Path) -> BaseModel:
    """The base model to tune: a toy preset name, a diffusers directory or a hub id (in fp32).

    A toy preset name gives the preset randomly initialised at `project.seed`, as a
    bootstrap of `params` would start it."""
    from unifl.models.base import load_base_model
    from unifl.models.toy_presets import is_toy_preset
    from unifl.toy.bootstrap import untrained_model

    source = str(base)
    if is_toy_preset(source):
        return untrained_model(params, params.project.seed, preset=source)
    return load_base_model(source, family=params.model.family, revision=params.model.revision)


def load_image_data(directory: str | Path) -> Any:
    """Real images with captions and label maps: a toy-format data set directory."""
    from unifl.toy.dataset import ToyDataset

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such data set directory")
    return ToyDataset(path)


def load_reward(directory: str | Path) -> DecoupledRewardModel:
    """A decoupled reward model directory written by reward training."""
    from unifl.models.reward import DecoupledRewardModel

    return DecoupledRewardModel.load(directory)


def load_prompt_list(path: str | Path) -> list[str]:
    """Prompts from a curated prompt table (directory or Parquet), a toy data set directory,
    a CSV/JSONL/Parquet file with a `prompt` column, or a text file with one prompt per line."""
    from unifl.evaluation.evaluate import load_eval_prompts

    return load_eval_prompts(path)["prompt"].tolist()


# --------------------------------------------------------------------------- outputs


def summarise(
    history: Sequence[Mapping[str, float]], window: int = SUMMARY_WINDOW
) -> dict[str, float]:
    """Means of every logged number over the last `window` steps, as `final_<name>`."""
    tail = list(history)[-window:]
    metrics: dict[str, float] = {}
    keys = [key for key in (tail[0] if tail else {}) if key not in SUMMARY_SKIPPED]
    for key in keys:
        values = [float(row[key]) for row in tail if key in row and math.isfinite(float(row[key]))]
        if values:
            metrics[f"final_{key}"] = sum(values) / len(values)
    return metrics


def finish(
    trainer: FeedbackTrainer,
    summary: TrainingSummary,
    exported: ExportedModel,
    inputs: Mapping[str, str | None],
    sections: Sequence[str],
    extra_metrics: Mapping[str, float] | None = None,
) -> StageResult:
    """Write history, metrics.json and stage.json; the `StageResult` of the run."""
    metrics: dict[str, float] = {
        "steps": float(summary.steps),
        "steps_this_run": float(summary.steps - (summary.resumed_from or 0)),
        "train_seconds": summary.seconds,
        "steps_per_second": summary.steps_per_second,
        **summarise(summary.history),
        **(extra_metrics or {}),
    }
    if trainer.accelerator.is_main_process:
        trainer.write_history()
        write_json(trainer.out_dir / "metrics.json", metrics)
        write_json(
            trainer.out_dir / "stage.json",
            {
                "stage": trainer.stage_name,
                "inputs": dict(inputs),
                "resumed_from": summary.resumed_from,
                "num_processes": trainer.accelerator.num_processes,
                "config": {
                    name: getattr(trainer.params, name).model_dump(mode="json") for name in sections
                },
            },
        )
    return StageResult(
        stage=trainer.stage_name,
        out_dir=trainer.out_dir,
        model_dir=exported.model_dir,
        lora_dir=exported.lora_dir,
        metrics=metrics,
        history=summary.history,
        resumed_from=summary.resumed_from,
        extra=dict(exported.extra),
    )


# --------------------------------------------------------------------------- stages


def run_pefl(
    params: Params,
    base: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    reward: str | Path | None = None,
    segmenter: str | Path | None = None,
    metrics_callback: MetricsCallback | None = None,
    progress: bool = True,
) -> StageResult:
    """Perceptual feedback learning (stage 1): `L_pefl` (+ `L_aes` when `reward` is given).

    `segmenter` is the toy segmenter directory that `pefl.perceptual` entries with
    `model: toy` refer to; other perceptual models are named in the config.
    """
    from unifl.feedback.pefl import PeflTrainer
    from unifl.feedback.perceptual import build_perceptual_loss

    check_outputs_apart(out_dir, base, data, reward, segmenter)
    toy_segmenter = None
    if segmenter is not None:
        from unifl.models.segmenter import ToySegmenter

        toy_segmenter = ToySegmenter.load(segmenter)
    perceptual = build_perceptual_loss(params.pefl.perceptual, toy_segmenter=toy_segmenter)
    trainer = PeflTrainer(
        load_stage_model(params, base),
        load_image_data(data),
        perceptual,
        params,
        out_dir,
        reward_model=load_reward(reward) if reward is not None else None,
        metrics_callback=metrics_callback,
        progress=progress,
    )
    summary = trainer.train()
    exported = trainer.export()
    inputs = {
        "base": str(base),
        "data": str(data),
        "reward": _text(reward),
        "segmenter": _text(segmenter),
    }
    return finish(trainer, summary, exported, inputs, ("project", "trainer", "pefl", "decoupled"))


def run_decoupled(
    params: Params,
    base: str | Path,
    prompts: str | Path | Sequence[str],
    reward: str | Path,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    metrics_callback: MetricsCallback | None = None,
    progress: bool = True,
) -> StageResult:
    """Decoupled aesthetic feedback learning on a prompt set (`prompts`: a file or a list).

    `data` (real images) is needed only for the MSE regulariser (`decoupled.mse_weight`, else
    `trainer.mse_weight`, above 0).
    """
    from unifl.feedback.decoupled import DecoupledTrainer

    check_outputs_apart(out_dir, base, prompts, reward, data)
    prompt_list = (
        load_prompt_list(prompts) if isinstance(prompts, str | Path) else [str(p) for p in prompts]
    )
    trainer = DecoupledTrainer(
        load_stage_model(params, base),
        load_reward(reward),
        prompt_list,
        params,
        out_dir,
        regulariser_data=load_image_data(data) if data is not None else None,
        metrics_callback=metrics_callback,
        progress=progress,
    )
    summary = trainer.train()
    exported = trainer.export()
    prompt_source = (
        str(prompts) if isinstance(prompts, str | Path) else f"<{len(prompt_list)} prompts>"
    )
    inputs = {
        "base": str(base),
        "prompts": prompt_source,
        "reward": str(reward),
        "data": _text(data),
    }
    return finish(trainer, summary, exported, inputs, ("project", "trainer", "decoupled"))


def run_adversarial(
    params: Params,
    base: str | Path,
    data: str | Path,
    reward: str | Path,
    out_dir: str | Path,
    *,
    metrics_callback: MetricsCallback | None = None,
    progress: bool = True,
) -> StageResult:
    """Adversarial feedback learning (stage 2), checked at the end with few-step sampling."""
    from unifl.feedback.adversarial import AdversarialTrainer

    check_outputs_apart(out_dir, base, data, reward)
    images = load_image_data(data)
    trainer = AdversarialTrainer(
        load_stage_model(params, base),
        images,
        load_reward(reward),
        params,
        out_dir,
        metrics_callback=metrics_callback,
        progress=progress,
    )
    summary = trainer.train()
    count = min(params.adversarial.eval_prompts, len(images))
    exported = trainer.export(keep_model=count > 0)
    check: dict[str, float] = {}
    if exported.model is not None:
        prompts = [images.caption(i) for i in range(count)]
        check = trainer.few_step_check(exported.model, prompts)
    inputs = {"base": str(base), "data": str(data), "reward": str(reward)}
    return finish(
        trainer,
        summary,
        exported,
        inputs,
        ("project", "trainer", "adversarial", "decoupled", "sampling"),
        check,
    )


def _text(value: str | Path | None) -> str | None:
    return None if value is None else str(value)
