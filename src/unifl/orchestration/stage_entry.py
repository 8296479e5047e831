"""One entry per stage where the stage's own module has none in the shape a step needs.

* `run_feedback_stage` maps a step's named inputs onto the feedback stages
  (`unifl.feedback.stages.run_pefl / run_decoupled / run_adversarial`).
* `toy_world_stage` writes the toy world (base model, segmenter, data sets) into one
  directory, the DVC stage's output, from the bootstrap cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from unifl.config import Params
from unifl.io import atomic_directory

MetricsCallback = Callable[[int, dict[str, float]], None]

FEEDBACK_STAGES: tuple[str, ...] = ("pefl", "decoupled", "adversarial")


def run_feedback_stage(
    stage: str,
    params: Params,
    inputs: Mapping[str, str | Path | None],
    out_dir: str | Path,
    metrics_callback: MetricsCallback | None = None,
) -> Any:
    """Run PeFL, decoupled or adversarial feedback learning with `inputs` into `out_dir`.

    `out_dir` keeps the stage's checkpoints, so calling this again after an interruption
    resumes where the last checkpoint left off.
    """
    from unifl.feedback import stages

    if stage == "pefl":
        return stages.run_pefl(
            params,
            inputs["base"],
            inputs["data"],
            out_dir,
            reward=inputs.get("reward"),
            segmenter=inputs.get("segmenter"),
            metrics_callback=metrics_callback,
        )
    if stage == "decoupled":
        return stages.run_decoupled(
            params,
            inputs["base"],
            inputs["prompts"],
            inputs["reward"],
            out_dir,
            data=inputs.get("data"),
            metrics_callback=metrics_callback,
        )
    if stage == "adversarial":
        return stages.run_adversarial(
            params,
            inputs["base"],
            inputs["data"],
            inputs["reward"],
            out_dir,
            metrics_callback=metrics_callback,
        )
    raise ValueError(f"unknown feedback stage {stage!r}; expected one of {FEEDBACK_STAGES}")


TOY_WORLD_LAYOUT: dict[str, str] = {
    "base": "base",
    "segmenter": "segmenter",
    "train_data": "data/train",
    "eval_data": "data/eval",
}
"""Where `toy_world_stage` puts each part inside its output directory."""


def toy_world_stage(params: Params, out_dir: str | Path) -> dict[str, float]:
    """The toy world for DVC: bootstrapped (or taken from the cache) and copied to `out_dir`."""
    from unifl.orchestration.steps import bootstrap_step

    with atomic_directory(out_dir) as tmp:
        result = bootstrap_step(
            params,
            tmp / TOY_WORLD_LAYOUT["base"],
            tmp / TOY_WORLD_LAYOUT["segmenter"],
            tmp / TOY_WORLD_LAYOUT["train_data"],
            tmp / TOY_WORLD_LAYOUT["eval_data"],
        )
        from unifl.io import write_json

        write_json(tmp / "metrics.json", result.metrics)
    return result.metrics
