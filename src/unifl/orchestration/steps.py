"""The pipeline's steps: one function per KFP component, each around one stage library call.

A step takes the resolved configuration (a `Params` or its YAML text) and local paths (the
component's artifact paths), calls the stage's library function, and adds what a pipeline
needs around it:

* MLflow: with a `parent_run_id`, the step runs inside its nested stage run (params,
  per-step metrics, artifacts, lineage tags); without one (a test, a notebook) it does not
  track. Cached data steps never track (see `unifl.orchestration.data_reports`); the
  `lineage_step` records them in the run.
* Checkpoints: training steps work in `checkpoint_dir(root, pipeline run id, stage)`, a
  directory on the checkpoint volume that outlives the pod, so a retried pod resumes from
  the last checkpoint; the finished model is then copied to the output artifact.
* Versions: data outputs get their DVC hash (`artifacts.dvc_track`) in the returned
  metadata, which the component writes onto its output artifact.

Every step returns a `StepResult`: numbers for the KFP UI's metrics and MLflow, metadata
for the output artifact, and named string outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unifl.config import ConfigError, Params
from unifl.orchestration.artifacts import (
    ArtifactError,
    copy_directory,
    dvc_track,
    model_source,
    write_model_reference,
)
from unifl.orchestration.data_reports import (
    curation_metrics,
    labels_lineage,
    labels_metrics,
    markdown_table,
    pairs_metrics,
    validation_metrics,
)
from unifl.orchestration.parameters import (
    check_gpu_placement,
    data_params_yaml,
    params_from_yaml,
    resolve_run_parameters,
)
from unifl.tracking.redaction import safe_params_yaml

logger = logging.getLogger(__name__)

TOY_SOURCE = "toy"
PIPELINE_NAME_TAG = "unifl.pipeline"
KFP_JOB_TAG = "unifl.kfp_job_id"
DECISION_TAG_PREFIX = "unifl.promotion."
LINEAGE_PREFIX = "unifl.lineage."
SUMMARY_TABLE_FILE = "summary_table.txt"
DECISION_FILE = "decision.json"
CHECKPOINTS_DIR = "checkpoints"
TUNED_MODEL_DIR = "model"
"""Inside a training step's output: the tuned model as a diffusers directory (LoRA merged);
beside it `lora/` (the adapter alone), `history.csv`, `metrics.json`, `stage.json`."""


class StepError(RuntimeError):
    """A step cannot run with its inputs; the message names the input and what to do."""


@dataclass
class StepResult:
    """What a step reports back to its component."""

    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    markdown: str = ""


@dataclass(frozen=True)
class ResolvedRun:
    """The first step's outputs: configuration for all steps, and the MLflow parent run."""

    params_yaml: str
    data_params_yaml: str
    parent_run_id: str
    pipeline_run_id: str


# ---------------------------------------------------------------------------- helpers


def as_params(params: Params | str) -> Params:
    """Steps take the resolved configuration as a `Params` or as its YAML text (KFP).

    A step is its own process (a pod, a kfp.local subprocess): this is also where it takes
    the configured number of torch threads.
    """
    from unifl.models.precision import apply_num_threads

    params = params if isinstance(params, Params) else params_from_yaml(params)
    apply_num_threads(params.project)
    return params


@contextlib.contextmanager
def tracked(
    params: Params, name: str, parent_run_id: str | None, tags: Mapping[str, Any] | None = None
) -> Iterator[Any]:
    """The stage's nested MLflow run, or None when the step runs without a parent run."""
    if not parent_run_id:
        yield None
        return
    from unifl.tracking.runs import stage_run

    with stage_run(name, parent_run_id, params, tags) as run:
        yield run


def _segment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def checkpoint_dir(root: str | Path, pipeline_run_id: str, stage: str) -> Path:
    """Where a training step keeps its work and checkpoints: one directory per run and stage,
    so a retry of the same run finds them and another run never does."""
    if not pipeline_run_id:
        raise StepError("a training step needs the pipeline run id to find its checkpoints")
    return Path(root) / _segment(pipeline_run_id) / _segment(stage)


def _progress_callback(run: Any) -> Callable[[int, dict[str, float]], None] | None:
    return None if run is None else run.metrics_callback


def _required_model(path: str | Path, what: str) -> str:
    source = model_source(path)
    if source is None:
        raise ArtifactError(f"{what} artifact {path} is empty: this run has no {what}")
    return source


def _optional_model(path: str | Path | None) -> str | None:
    return None if path in (None, "") else model_source(path)


def tuned_model(path: str | Path) -> str:
    """The diffusers model inside a training step's output (`model/`), or the model itself."""
    inner = Path(path) / TUNED_MODEL_DIR
    if (inner / "model_index.json").is_file():
        return str(inner)
    return _required_model(path, "model")


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    }


def _mlflow_name(name: str) -> str:
    """Metric names MLflow and the KFP UI both accept."""
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", name)


# ---------------------------------------------------------------------------- resolve / finish


def resolve_step(
    params_yaml: str,
    overrides: Sequence[str],
    values: Mapping[str, Any],
    gpu_node_selector: Any,
    gpu_tolerations: Any,
    pipeline: str,
    pipeline_run_id: str,
    kfp_job_id: str = "",
    label_studio_from_env: bool = False,
    config_out: str | Path | None = None,
    start_tracking: bool = True,
) -> ResolvedRun:
    """Validate the run's parameters (naming the bad one) and open the MLflow parent run.

    This is the first step of every pipeline: nothing expensive has started when it fails.
    The parent run is keyed by the pipeline run id (a retried run re-opens it).
    """
    from unifl.tracking.runs import attach_run, start_pipeline_run

    params = resolve_run_parameters(
        params_yaml, overrides, values, label_studio_from_env=label_studio_from_env
    )
    check_gpu_placement(gpu_node_selector, gpu_tolerations)
    run_id = (pipeline_run_id or kfp_job_id).strip()
    if not run_id:
        raise ConfigError("pipeline parameter 'pipeline_run_id': empty and no KFP job id given")
    # What leaves this step (the config artifact, the outputs, the MLflow artifact) carries
    # no URL credentials; the steps after it take them from the environment.
    resolved_yaml = safe_params_yaml(params)
    if config_out is not None:
        from unifl.io import write_text

        write_text(config_out, resolved_yaml)
    parent_run_id = ""
    if start_tracking:
        tags = {PIPELINE_NAME_TAG: pipeline}
        if kfp_job_id:
            tags[KFP_JOB_TAG] = kfp_job_id
        parent_run_id = start_pipeline_run(params, run_id, tags=tags)
        attach_run(params, parent_run_id).log_text(resolved_yaml, "config/params.yaml")
    return ResolvedRun(resolved_yaml, data_params_yaml(params), parent_run_id, run_id)


def finish_step(
    params_yaml: str,
    overrides: Sequence[str],
    values: Mapping[str, Any],
    pipeline_run_id: str,
    kfp_job_id: str,
    state: str,
    error_message: str = "",
) -> str:
    """Close the parent run with the pipeline's final state (the exit handler's step).

    It cannot take the first step's outputs (KFP exit tasks depend on no task), so it
    resolves the tracking settings again and finds the parent by the pipeline run id.
    Returns the MLflow status set, or "" when there was nothing to close.
    """
    from unifl.tracking.runs import (
        PIPELINE_RUN_ID_TAG,
        STAGE_TAG,
        attach_run,
        connect,
        finish_pipeline_run,
        tracking_errors,
    )

    try:
        params = resolve_run_parameters(params_yaml, overrides, values)
    except ConfigError as exc:
        logger.warning("parent run not closed: the parameters do not resolve (%s)", exc)
        return ""
    run_id = (pipeline_run_id or kfp_job_id).strip()
    tracking = params.tracking
    client = connect(tracking)
    with tracking_errors(tracking.tracking_uri):
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            return ""
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{PIPELINE_RUN_ID_TAG}` = '{run_id}' "
            f"and tags.`{STAGE_TAG}` = 'pipeline'",
            max_results=1,
        )
        if not runs:
            return ""
        parent = runs[0].info.run_id
    status = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}.get(state.upper(), "FAILED")
    tags = {"unifl.pipeline_state": state}
    if error_message:
        tags["unifl.pipeline_error"] = error_message[:5000]
    attach_run(params, parent).set_tags(tags)  # secret-looking values are filtered
    finish_pipeline_run(params, parent, status)
    return status


# ---------------------------------------------------------------------------- data steps


def bootstrap_step(
    params: Params | str,
    base_model_dir: str | Path,
    segmenter_dir: str | Path,
    train_data_dir: str | Path,
    eval_data_dir: str | Path,
    real_data: str = "",
) -> StepResult:
    """The toy world (bootstrapped once per configuration, then cached) or a base-model reference.

    `model.source: toy` trains the toy VAE, base model and segmenter and copies them with the
    toy data sets into the four outputs. Any other source becomes a reference (the pods load
    it themselves), the segmenter an empty reference, and the data sets copies of
    `real_data`, a toy-format data set (images, masks, captions) on a mounted volume.
    """
    params = as_params(params)
    source = params.model.source
    if source == TOY_SOURCE:
        from unifl.toy.bootstrap import bootstrap_toy_world

        result = bootstrap_toy_world(params)
        copy_directory(result.base_model_dir, base_model_dir)
        copy_directory(result.segmenter_dir, segmenter_dir)
        copy_directory(result.train_data_dir, train_data_dir)
        copy_directory(result.eval_data_dir, eval_data_dir)
        version = f"toy-{result.manifest['config_hash']}"
        return StepResult(
            metrics=_finite(result.metrics),
            metadata={"model_version": version, "cached": result.cached},
            outputs={"model_version": version},
            markdown=markdown_table(_finite(result.metrics), "Toy world bootstrap"),
        )
    if not real_data:
        raise StepError(
            f"base model {source!r} is not the toy world: set the pipeline parameter "
            "'real_data' to a toy-format data set (images, masks, captions) for PeFL, "
            "adversarial training and the Frechet distance"
        )
    write_model_reference(base_model_dir, source, kind="diffusers")
    write_model_reference(segmenter_dir, "", kind="segmenter")
    copy_directory(real_data, train_data_dir)
    copy_directory(real_data, eval_data_dir)
    version = source if not params.model.revision else f"{source}@{params.model.revision}"
    return StepResult(metadata={"model_version": version}, outputs={"model_version": version})


def curate_step(
    params: Params | str,
    base_model_dir: str | Path,
    prompt_source: str,
    out_dir: str | Path,
    dvc_remote: str = "",
) -> StepResult:
    """Curate the prompts (`run_curate_stage`); the toy captions when `prompt_source` is empty."""
    from unifl.data.prompts import run_curate_stage

    params = as_params(params)
    sources = [part.strip() for part in prompt_source.split(",") if part.strip()]
    run_curate_stage(params, sources, _required_model(base_model_dir, "base model"), out_dir)
    record = dvc_track(out_dir, dvc_remote or params.pipeline.dvc_remote)
    metrics = curation_metrics(out_dir)
    return StepResult(
        metrics=metrics,
        metadata=record.metadata(),
        markdown=markdown_table(metrics, "Prompt curation"),
    )


def validate_step(
    params: Params | str,
    kind: str,
    table: str | Path,
    out_dir: str | Path,
    image_root: str | Path | None = None,
) -> StepResult:
    """Run the Great Expectations suite of `kind`; a failure stops the pipeline here.

    The report is written either way, and the error names each failing expectation.
    """
    from unifl.data.validation import options_from_params, validate

    params = as_params(params)
    options = options_from_params(params, image_root or None)
    result = validate(kind, table, out_dir, options)  # type: ignore[arg-type]
    metrics = validation_metrics(out_dir)
    return StepResult(
        metrics=metrics,
        metadata={"kind": kind, "success": result.success},
        outputs={"report_html": result.report_html},
    )


def pairs_step(
    params: Params | str,
    base_model_dir: str | Path,
    prompts_dir: str | Path,
    out_dir: str | Path,
    model_version: str = "",
    dvc_remote: str = "",
) -> StepResult:
    """Two images per curated prompt from the base model (`run_pairs_stage`).

    `model_version` (the bootstrap's output) names the model in the pair manifest and in
    the pair ids, so the same model and settings give the same pair ids in every run.
    """
    from unifl.data.pairs import run_pairs_stage

    params = as_params(params)
    source = _required_model(base_model_dir, "base model")
    run_pairs_stage(params, prompts_dir, source, out_dir, model_version=model_version or None)
    record = dvc_track(out_dir, dvc_remote or params.pipeline.dvc_remote)
    metrics = pairs_metrics(out_dir)
    return StepResult(
        metrics=metrics,
        metadata=record.metadata(),
        markdown=markdown_table(metrics, "Preference pairs"),
    )


def label_step(
    params: Params | str,
    pairs_dir: str | Path,
    out_dir: str | Path,
    labels_export: str = "",
    dvc_remote: str = "",
) -> StepResult:
    """Preference labels for the pairs: simulated annotators, or an existing export.

    Without `labels_export`, the simulated panel labels the pairs (`label_pairs`; through
    Label Studio when `labeling.url` is set). With it, the given Label Studio JSON export
    of these pairs is converted (the tasks carry the images' paths relative to the pairs
    directory). No step ever waits for people.
    """
    from unifl.labeling.export import ExportError, read_export
    from unifl.labeling.pipeline import label_pairs, write_labels

    params = as_params(params)
    if labels_export:
        path = Path(labels_export)
        try:
            export = read_export(path)
        except ExportError as exc:
            raise StepError(f"pipeline parameter 'labels_export': {exc}") from None
        write_labels(
            export, out_dir, params.labeling.min_annotators, source=f"label studio export {path}"
        )
    else:
        label_pairs(params, pairs_dir, out_dir)
    record = dvc_track(out_dir, dvc_remote or params.pipeline.dvc_remote)
    metrics = labels_metrics(out_dir)
    return StepResult(
        metrics=metrics,
        metadata={**record.metadata(), **labels_lineage(out_dir)},
        markdown=markdown_table(metrics, "Preference labels"),
    )


def push_step(params: Params | str, pairs_dir: str | Path, parent_run_id: str = "") -> StepResult:
    """Create or update the Label Studio project and import the pairs as tasks (idempotent).

    With `labeling.storage: s3` the pair images are uploaded to the bucket first (what is
    already there is skipped). The token and the S3 keys come from the environment (the
    Kubernetes Secrets), never from parameters.
    Annotators then work for days; the train pipeline pulls their labels later.
    """
    from unifl.labeling.client import LabelStudioClient
    from unifl.labeling.pipeline import push_pairs

    params = as_params(params)
    with tracked(params, "labeling", parent_run_id) as run:
        client = LabelStudioClient.from_config(params.labeling)
        report = push_pairs(client, params.labeling, pairs_dir)
        metrics = {
            "tasks_imported": float(report.tasks_imported),
            "tasks_already_present": float(report.tasks_already_present),
        }
        if params.labeling.storage == "s3":
            metrics["images_uploaded"] = float(report.images_uploaded)
            metrics["images_already_present"] = float(report.images_already_present)
        if run is not None:
            run.log_metrics(metrics)
            run.log_lineage(label_studio_project_id=report.project_id)
    if parent_run_id:
        # The lineage step has run before the push: the project id goes onto the parent here.
        from unifl.tracking.lineage import lineage_tags
        from unifl.tracking.runs import attach_run

        attach_run(params, parent_run_id).set_tags(lineage_tags(None, report.project_id))
    return StepResult(
        metrics=metrics,
        metadata={"project_id": report.project_id, "url": client.url},
        outputs={"project_id": str(report.project_id)},
        markdown=(
            f"### Label Studio\n\nProject {report.project_id} at {client.url}: "
            f"{report.tasks_imported} tasks imported, {report.tasks_already_present} already "
            "there.\n"
        ),
    )


def pull_step(
    params: Params | str, out_dir: str | Path, parent_run_id: str = "", dvc_remote: str = ""
) -> StepResult:
    """Export the annotations from Label Studio and write the labels directory."""
    from unifl.labeling.client import LabelStudioClient
    from unifl.labeling.pipeline import pull_labels

    params = as_params(params)
    with tracked(params, "labeling", parent_run_id) as run:
        client = LabelStudioClient.from_config(params.labeling)
        pull_labels(client, params.labeling, out_dir)
        record = dvc_track(out_dir, dvc_remote or params.pipeline.dvc_remote)
        metrics = labels_metrics(out_dir)
        lineage = labels_lineage(out_dir)
        if run is not None:
            run.log_metrics(metrics)
            run.log_lineage(
                {"labels": record.md5},
                label_studio_project_id=lineage.get("project_id"),
                label_studio_export_id=lineage["export_id"],
            )
            run.log_artifact(out_dir, "labels")
    return StepResult(
        metrics=metrics,
        metadata={**record.metadata(), **lineage},
        markdown=markdown_table(metrics, "Preference labels from Label Studio"),
    )


@dataclass(frozen=True)
class DataOutput:
    """A data step's output directory and its artifact metadata, for `lineage_step`."""

    stage: str
    path: str | Path
    metadata: Mapping[str, Any]
    metrics: Callable[[str | Path], dict[str, float]]
    dvc_name: str | None = None


def lineage_step(
    params: Params | str, parent_run_id: str, outputs: Sequence[DataOutput]
) -> StepResult:
    """Record the cached data steps in the run: a nested run each, lineage on the parent.

    Each data output gets a nested run with its numbers and its reports as artifacts; the
    parent run gets the DVC hashes of prompts, pairs and labels (computed here for an
    artifact that arrives without one) and the Label Studio ids, which the later steps copy
    onto the models they register.
    """
    from unifl.tracking.lineage import lineage_tags
    from unifl.tracking.runs import attach_run

    params = as_params(params)
    dvc_hashes: dict[str, str] = {}
    project_id = export_id = None
    summary: dict[str, float] = {}
    for output in outputs:
        metrics = output.metrics(output.path)
        summary.update({f"{output.stage}/{name}": value for name, value in metrics.items()})
        md5 = output.metadata.get("dvc_md5")
        if output.dvc_name and not md5:
            # An imported artifact (the train pipeline's pairs and prompts) arrives without the
            # metadata of the run that wrote it. DVC's directory hash depends only on the
            # content, so hashing it again gives the version the collect run recorded.
            md5 = dvc_track(output.path).md5
        if output.dvc_name and md5:
            dvc_hashes[output.dvc_name] = str(md5)
        project_id = output.metadata.get("project_id", project_id)
        export_id = output.metadata.get("export_id", export_id)
        if not parent_run_id:
            continue
        with tracked(params, output.stage, parent_run_id) as run:
            run.log_metrics({_mlflow_name(k): v for k, v in metrics.items()})
            tags = {f"unifl.artifact.{key}": value for key, value in output.metadata.items()}
            run.set_tags(tags)
            if output.dvc_name and md5:
                run.log_lineage({output.dvc_name: str(md5)})
            for report in _report_files(Path(output.path)):
                run.log_artifact(report, output.stage)
    tags = lineage_tags(dvc_hashes, project_id, export_id)
    if parent_run_id:
        attach_run(params, parent_run_id).set_tags(tags)
    return StepResult(metrics=summary, metadata=tags)


def _report_files(directory: Path) -> list[Path]:
    """The small report files of a data output (not the data itself)."""
    names = (
        "curation_report.json",
        "pairs_report.json",
        "summary.json",
        "agreement.json",
        "validation_report.html",
        "validation_result.json",
    )
    return [directory / name for name in names if (directory / name).is_file()]


def parent_lineage(params: Params, parent_run_id: str) -> dict[str, str]:
    """The lineage tags the lineage step set on the parent run (copied onto registered models)."""
    if not parent_run_id:
        return {}
    from unifl.tracking.runs import attach_run, tracking_errors

    run = attach_run(params, parent_run_id)
    with tracking_errors(run.tracking_uri):
        tags = run.client.get_run(parent_run_id).data.tags
    keep = {key: value for key, value in tags.items() if key.startswith(LINEAGE_PREFIX)}
    for key in ("unifl.pipeline_run_id", "unifl.git_commit"):
        if key in tags:
            keep[key] = tags[key]
    return keep


# ---------------------------------------------------------------------------- training steps


def _read_json_metrics(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    return _finite(json.loads(path.read_text(encoding="utf-8")))


def reward_step(
    params: Params | str,
    labels_dir: str | Path,
    pairs_dir: str | Path,
    out_dir: str | Path,
    parent_run_id: str = "",
) -> StepResult:
    """Train the decoupled reward models on the labels; log and register them.

    Image paths in the pair table are relative to the pairs directory. The reward models
    are registered as `tracking.reward_registered_model` with the run's lineage tags.
    """
    from unifl.feedback.reward_training import train_reward_stage

    params = as_params(params)
    labels = Path(labels_dir) / "pairs.parquet"
    with tracked(params, "reward", parent_run_id) as run:
        train_reward_stage(params, labels, pairs_dir, out_dir, _progress_callback(run))
        metrics = _read_json_metrics(Path(out_dir) / "metrics.json")
        outputs: dict[str, str] = {}
        if run is not None:
            from unifl.tracking.models import log_reward_model

            lineage = parent_lineage(params, parent_run_id)
            run.set_tags(lineage)
            for name in ("history.jsonl", "metrics.json", "split.json"):
                if (Path(out_dir) / name).is_file():
                    run.log_artifact(Path(out_dir) / name, "reward")
            ref = log_reward_model(
                run,
                Path(out_dir) / "model",
                registered_model_name=params.tracking.reward_registered_model,
                tags=lineage,
            )
            outputs = {"reward_model_version": ref.version or "", "reward_model_uri": ref.model_uri}
    return StepResult(
        metrics=metrics,
        metadata={k: v for k, v in outputs.items() if v},
        outputs=outputs,
        markdown=markdown_table(metrics, "Reward models"),
    )


def _training_step(
    stage: str,
    params: Params | str,
    inputs: Mapping[str, str | Path | None],
    out_dir: str | Path,
    checkpoint_root: str | Path,
    pipeline_run_id: str,
    parent_run_id: str,
) -> StepResult:
    """Run one feedback-learning stage in its checkpoint directory; copy the result out.

    Where it trains (this process, this pod's GPUs, several nodes) follows
    `pipeline.gpu_count` and `cluster.num_nodes` (`stage_entry.train_feedback_stage`).
    """
    from unifl.feedback.adversarial import REAL_SAMPLES_DIR
    from unifl.orchestration.stage_entry import INPUTS_DIR, train_feedback_stage

    params = as_params(params)
    work = checkpoint_dir(checkpoint_root, pipeline_run_id, stage)
    with tracked(params, stage, parent_run_id) as run:
        if run is not None:
            run.set_tags(
                {"unifl.checkpoint_dir": str(work), **parent_lineage(params, parent_run_id)}
            )
        mode = train_feedback_stage(
            stage, params, inputs, work, pipeline_run_id, _progress_callback(run)
        )
        # The adversarial stage's sampled real images stay with the checkpoints, for a resume.
        copy_directory(work, out_dir, ignore=(CHECKPOINTS_DIR, INPUTS_DIR, REAL_SAMPLES_DIR))
        metrics = _read_json_metrics(Path(out_dir) / "metrics.json")
        if run is not None:
            run.set_tags({"unifl.training_mode": mode})
            for name in ("metrics.json", "history.csv", "history.json", "stage.json"):
                if (Path(out_dir) / name).is_file():
                    run.log_artifact(Path(out_dir) / name, stage)
            for grid in sorted(Path(out_dir).glob("*.png")):
                run.log_artifact(grid, f"{stage}/samples")
    return StepResult(
        metrics=metrics,
        metadata={"checkpoint_dir": str(work), "training_mode": mode},
        markdown=markdown_table(metrics, stage),
    )


def pefl_step(
    params: Params | str,
    base_model_dir: str | Path,
    train_data_dir: str | Path,
    reward_dir: str | Path,
    segmenter_dir: str | Path | None,
    out_dir: str | Path,
    checkpoint_root: str | Path,
    pipeline_run_id: str,
    parent_run_id: str = "",
) -> StepResult:
    """Stage 1a: perceptual feedback learning on real (image, caption, mask) data."""
    inputs = {
        "base": _required_model(base_model_dir, "base model"),
        "data": str(train_data_dir),
        "reward": str(Path(reward_dir) / "model"),
        "segmenter": _optional_model(segmenter_dir),
    }
    return _training_step(
        "pefl", params, inputs, out_dir, checkpoint_root, pipeline_run_id, parent_run_id
    )


def decoupled_step(
    params: Params | str,
    model_dir: str | Path,
    prompts_dir: str | Path,
    reward_dir: str | Path,
    out_dir: str | Path,
    checkpoint_root: str | Path,
    pipeline_run_id: str,
    parent_run_id: str = "",
    train_data_dir: str | Path | None = None,
) -> StepResult:
    """Stage 1b: decoupled aesthetic feedback learning on the actively selected prompts.

    The real images (`train_data_dir`) are used only by the optional noise-prediction
    regulariser (`decoupled.mse_weight`, else `trainer.mse_weight`, above 0).
    """
    params = as_params(params)
    use_data = train_data_dir not in (None, "") and params.mse_weight("decoupled") > 0
    inputs = {
        "base": tuned_model(model_dir),
        "prompts": str(prompts_dir),
        "reward": str(Path(reward_dir) / "model"),
        "data": str(train_data_dir) if use_data else None,
    }
    return _training_step(
        "decoupled", params, inputs, out_dir, checkpoint_root, pipeline_run_id, parent_run_id
    )


def adversarial_step(
    params: Params | str,
    model_dir: str | Path,
    train_data_dir: str | Path,
    reward_dir: str | Path,
    out_dir: str | Path,
    checkpoint_root: str | Path,
    pipeline_run_id: str,
    parent_run_id: str = "",
) -> StepResult:
    """Stage 2: adversarial feedback learning for few-step inference."""
    inputs = {
        "base": tuned_model(model_dir),
        "data": str(train_data_dir),
        "reward": str(Path(reward_dir) / "model"),
    }
    return _training_step(
        "adversarial", params, inputs, out_dir, checkpoint_root, pipeline_run_id, parent_run_id
    )


# ---------------------------------------------------------------------------- evaluate / promote


def evaluate_step(
    params: Params | str,
    model_dir: str | Path,
    eval_data_dir: str | Path,
    out_dir: str | Path,
    segmenter_dir: str | Path | None = None,
    reward_dir: str | Path | None = None,
    baseline_dir: str | Path | None = None,
    parent_run_id: str = "",
) -> StepResult:
    """Evaluate the tuned model against the base model; log it and register it as a candidate.

    The evaluation (per-prompt metrics at each step count, Frechet, grids, report) is logged
    into this stage's run, which the registered version names as its evaluation run, so the
    promotion gates read exactly these numbers and per-prompt table.
    """
    from unifl.evaluation.evaluate import run_evaluation, summary_table

    params = as_params(params)
    model = tuned_model(model_dir)
    reward = None if reward_dir in (None, "") else str(Path(reward_dir) / "model")
    segmenter = _optional_model(segmenter_dir)
    baseline = _optional_model(baseline_dir)
    with tracked(params, "evaluate", parent_run_id) as run:
        result = run_evaluation(
            params,
            model,
            eval_data_dir,
            out_dir,
            segmenter_dir=segmenter,
            reward_dir=reward,
            real_data_dir=eval_data_dir,
            baseline_source=baseline,
        )
        table = summary_table(result)
        (Path(out_dir) / SUMMARY_TABLE_FILE).write_text(table + "\n", encoding="utf-8")
        outputs: dict[str, str] = {"model_version": ""}
        if run is not None:
            from unifl.tracking.models import log_diffusion_model, log_lora_adapter

            lineage = parent_lineage(params, parent_run_id)
            run.set_tags(lineage)
            run.log_evaluation(out_dir)
            ref = log_diffusion_model(
                run,
                model,
                sampling=params.sampling,
                registered_model_name=params.tracking.registered_model,
                evaluation_run_id=run.run_id,
                tags=lineage,
            )
            outputs = {"model_version": ref.version or "", "model_uri": ref.model_uri}
            adapter = Path(model_dir) / "lora"
            if adapter.is_dir() and baseline:
                log_lora_adapter(run, adapter, base_model=baseline)
    metrics = _finite(result.summary)
    return StepResult(
        metrics=metrics,
        metadata={k: v for k, v in outputs.items() if v},
        outputs=outputs,
        markdown=f"### Evaluation\n\n```\n{table}\n```\n",
    )


def promote_step(
    params: Params | str,
    model_version: str,
    out_dir: str | Path,
    parent_run_id: str = "",
    target: str = "staging",
) -> StepResult:
    """Run the promotion gates on the new version; promote it when they pass.

    `target` production goes through staging first (the registry's order), each move with
    its own gates. A rejected version is a normal outcome, not a failed step: the decision,
    its gates and their inputs are recorded as version tags (by the gates), on the parent
    run, and in `out_dir/decision.json`.
    """
    from unifl.io import write_json, write_text
    from unifl.tracking.promotion import promote_from_params

    params = as_params(params)
    if not model_version:
        raise StepError("no model version to promote: the evaluate step registered none")
    if target not in ("staging", "production"):
        raise StepError(f"promotion target {target!r}: expected staging or production")
    targets = ["staging"] if target == "staging" else ["staging", "production"]
    if target == "production" and _registry_stage(params, model_version) == "staging":
        targets = ["production"]
    decisions = []
    for step_target in targets:
        decision = promote_from_params(params, None, model_version, target=step_target)  # type: ignore[arg-type]
        decisions.append(decision)
        if not decision.promoted:
            break
    final = decisions[-1]
    promoted = final.promoted and final.target == target
    summary = "\n".join(decision.summary() for decision in decisions)
    record = {
        "model": final.model_name,
        "version": final.version,
        "target": target,
        "reached": final.target if final.promoted else None,
        "promoted": promoted,
        "gates_passed": all(decision.gates_passed for decision in decisions),
        "champion_version": final.champion_version,
        "replaced_version": final.replaced_version,
        "evaluation_run_id": final.evaluation_run_id,
        "summary": summary,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / DECISION_FILE, record)
    markdown = f"### Promotion\n\n```\n{summary}\n```\n"
    write_text(Path(out_dir) / "decision.md", markdown)
    verdict = "promoted" if promoted else "rejected"
    if parent_run_id:
        from unifl.tracking.runs import attach_run

        attach_run(params, parent_run_id).set_tags(
            {
                f"{DECISION_TAG_PREFIX}version": final.version,
                f"{DECISION_TAG_PREFIX}target": target,
                f"{DECISION_TAG_PREFIX}decision": verdict,
            }
        )
    return StepResult(
        metrics={"promoted": float(promoted), "gates_passed": float(record["gates_passed"])},
        metadata={"promoted": promoted, "version": final.version},
        outputs={"decision": verdict},
        markdown=markdown,
    )


def _registry_stage(params: Params, version: str) -> str:
    """The lifecycle stage a registered version is at (candidate, staging, ...)."""
    from unifl.tracking.registry import get_version, stage_of
    from unifl.tracking.runs import connect, tracking_errors

    client = connect(params.tracking)
    with tracking_errors(params.tracking.tracking_uri):
        return stage_of(get_version(client, params.tracking.registered_model, version))


def copy_report(source: str | Path, target: str | Path) -> None:
    """Copy one report file to an `Output[HTML]`/`Output[Markdown]` path."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
