"""One entry per stage where the stage's own module has none in the shape a step needs.

* `run_feedback_stage` maps a step's named inputs onto the feedback stages
  (`unifl.feedback.stages.run_pefl / run_decoupled / run_adversarial`).
* `train_feedback_stage` runs one of them where the configuration says: in this process
  (one GPU or the CPU), under `accelerate launch` on `pipeline.gpu_count` GPUs of this pod,
  or as a Kubeflow TrainJob on `cluster.num_nodes` nodes.
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


IMAGE_ENV = "UNIFL_IMAGE"
"""The training steps' own image, set on their pods at compile time: a multi-node job runs it."""
INPUTS_DIR = "inputs"
STAGE_PARAMS_FILE = "stage_params.yaml"


def _log_history(out_dir: Path, metrics_callback: MetricsCallback | None) -> None:
    """Replay a stage's per-step history (history.json) into the metrics callback: a stage in
    other processes cannot call it while it trains."""
    import json

    history = out_dir / "history.json"
    if metrics_callback is None or not history.is_file():
        return
    rows = json.loads(history.read_text(encoding="utf-8"))
    for row in rows:
        step = int(row.get("step", 0))
        values = {
            key: float(value)
            for key, value in row.items()
            if key != "step" and isinstance(value, int | float) and value == value
        }
        metrics_callback(step, values)


def _stage_inputs(inputs: Mapping[str, str | Path | None], target: Path) -> dict[str, str]:
    """Copy local inputs next to the work directory (on the shared volume), so that the pods
    of a multi-node job see them; hub ids and the like pass through."""
    from unifl.orchestration.artifacts import copy_directory

    staged: dict[str, str] = {}
    for name, value in inputs.items():
        if value is None:
            continue
        path = Path(value)
        if path.is_dir():
            staged[name] = str(copy_directory(path, target / name))
        else:
            staged[name] = str(value)
    return staged


def train_feedback_stage(
    stage: str,
    params: Params,
    inputs: Mapping[str, str | Path | None],
    out_dir: str | Path,
    pipeline_run_id: str,
    metrics_callback: MetricsCallback | None = None,
) -> str:
    """Run a feedback stage in-process, on this pod's GPUs, or on several nodes; say which.

    * `cluster.num_nodes > 1`: the inputs are copied under `out_dir` (on the checkpoint
      volume), and a TrainJob (or PyTorchJob) runs `unifl stage <stage>` on every node with
      the same image, volume and placement (`unifl.cluster.launcher`);
    * `pipeline.gpu_count > 1`: `accelerate launch` with one process per GPU
      (`unifl.cluster.distributed`);
    * otherwise this process.

    In the first two the per-step metrics reach `metrics_callback` after the run, from the
    stage's history. Returns "nodes", "gpus" or "process".
    """
    import os

    from unifl.config import params_to_yaml
    from unifl.io import write_text

    work = Path(out_dir)
    num_nodes = params.cluster.num_nodes
    gpus = max(1, int(params.pipeline.gpu_count))
    if num_nodes <= 1 and gpus <= 1:
        run_feedback_stage(stage, params, inputs, work, metrics_callback)
        return "process"

    from unifl.cluster.distributed import LaunchOptions, feedback_stage_args, run_stage

    work.mkdir(parents=True, exist_ok=True)
    params_file = work / STAGE_PARAMS_FILE
    write_text(params_file, params_to_yaml(params))
    if num_nodes > 1:
        from unifl.cluster.launcher import launch_training_stage
        from unifl.cluster.settings import load_cluster_settings

        image = os.environ.get(IMAGE_ENV)
        if not image:
            raise RuntimeError(
                f"{IMAGE_ENV} is not set: a multi-node stage needs the image to run on the "
                "nodes (the compiled pipeline sets it on the training steps)"
            )
        settings = load_cluster_settings(needs=["training"]).training
        staged = _stage_inputs(inputs, work / INPUTS_DIR)
        args = feedback_stage_args(stage, staged, work, params_file)
        launch_training_stage(
            stage,
            args[1:],
            run_id=pipeline_run_id,
            image=image,
            settings=settings,
            num_nodes=num_nodes,
            gpus_per_node=gpus,
            start_timeout_s=params.cluster.start_timeout_s,
            poll_s=params.cluster.poll_s,
        )
        mode = "nodes"
    else:
        args = feedback_stage_args(stage, dict(inputs), work, params_file)
        options = LaunchOptions.from_params(params, base=inputs.get("base"))
        run_stage(args, **options.as_kwargs())
        mode = "gpus"
    _log_history(work, metrics_callback)
    return mode


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
