"""The pipelines' run parameters: what the Kubeflow UI shows, and how they become a `Params`.

A pipeline run carries the whole configuration as YAML text (`params_yaml`, the resolved
`params.yaml`) plus a few named parameters that people change from run to run in the UI
(base model, steps and learning rates, GPUs, MLflow names). Each named parameter sets one
configuration key (`PipelineParameter.key`); the first step of every pipeline resolves them
into one validated `Params` and hands that on, so a bad value stops the run before any
compute, with an error naming the pipeline parameter rather than a config path the person
in the UI never typed.

Nothing secret travels as a parameter: tokens and keys come from Kubernetes Secrets as
environment variables (`unifl.cluster.settings`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from unifl.config import ConfigError, Params, TrackingConfig, load_params, params_to_yaml

PIPELINE_NAMES: tuple[str, ...] = ("full", "collect", "train")
"""`unifl run --pipeline NAME`: unifl-full, unifl-collect, unifl-train."""

DATA_SECTIONS: tuple[str, ...] = (
    "project",
    "toy",
    "bootstrap",
    "model",
    "sampling",
    "curate",
    "pairs",
    "labeling",
)
"""The sections the cached data steps read. They get only these (see `data_params_yaml`),
so that changing a training setting does not invalidate their cache."""

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
LOCAL_TRACKING_URI = TrackingConfig.model_fields["tracking_uri"].default
"""The default tracking URI, a SQLite file in the working directory: replaced on a cluster."""
LABEL_STUDIO_URL_ENV = "LABEL_STUDIO_URL"


TRAINING: tuple[str, ...] = ("full", "train")
"""Pipelines that train (the training parameters are not shown for collect)."""


@dataclass(frozen=True)
class PipelineParameter:
    """One named run parameter of the pipelines, and the configuration key it sets."""

    name: str
    key: str | None
    description: str
    pipelines: tuple[str, ...] = PIPELINE_NAMES

    def default(self, params: Params) -> Any:
        """The parameter's default in the compiled pipeline: the configured value."""
        if self.key is None:
            raise ValueError(f"pipeline parameter {self.name!r} has no configuration key")
        section, field = self.key.split(".")
        value = getattr(getattr(params, section), field)
        return "" if value is None else value


PIPELINE_PARAMETERS: tuple[PipelineParameter, ...] = (
    PipelineParameter(
        "base_model",
        "model.source",
        "Base model: 'toy' (the toy world, bootstrapped and cached), a diffusers directory "
        "in the image or on a mounted volume, or a hub id.",
    ),
    PipelineParameter(
        "label_studio_url",
        "labeling.url",
        "Label Studio URL; when unset, collect and train use the LABEL_STUDIO_URL of the "
        "unifl-endpoints ConfigMap, and full labels with simulated annotators and no server.",
    ),
    PipelineParameter(
        "label_studio_project", "labeling.project_title", "Label Studio project title."
    ),
    PipelineParameter("reward_epochs", "reward.epochs", "Reward-model training epochs.", TRAINING),
    PipelineParameter(
        "reward_learning_rate", "reward.learning_rate", "Reward-model head learning rate.", TRAINING
    ),
    PipelineParameter("pefl_steps", "pefl.steps", "Perceptual feedback learning steps.", TRAINING),
    PipelineParameter(
        "pefl_learning_rate", "pefl.learning_rate", "Perceptual feedback learning rate.", TRAINING
    ),
    PipelineParameter(
        "decoupled_steps",
        "decoupled.steps",
        "Decoupled aesthetic feedback learning steps.",
        TRAINING,
    ),
    PipelineParameter(
        "decoupled_learning_rate",
        "decoupled.learning_rate",
        "Decoupled aesthetic feedback learning rate.",
        TRAINING,
    ),
    PipelineParameter(
        "adversarial_steps",
        "adversarial.steps",
        "Adversarial feedback learning generator steps.",
        TRAINING,
    ),
    PipelineParameter(
        "adversarial_learning_rate",
        "adversarial.learning_rate",
        "Adversarial feedback learning generator learning rate.",
        TRAINING,
    ),
    PipelineParameter(
        "gpu_type",
        "pipeline.gpu_type",
        "Accelerator resource the GPU steps request (e.g. nvidia.com/gpu).",
    ),
    PipelineParameter("gpu_count", "pipeline.gpu_count", "GPUs per GPU step (one pod)."),
    PipelineParameter(
        "mlflow_tracking_uri",
        "tracking.tracking_uri",
        "MLflow tracking URI; on a cluster the MLFLOW_TRACKING_URI of the unifl-endpoints "
        "ConfigMap replaces the local default.",
    ),
    PipelineParameter("mlflow_experiment", "tracking.experiment", "MLflow experiment name."),
    PipelineParameter(
        "registered_model",
        "tracking.registered_model",
        "MLflow registered model of the tuned diffusion model.",
    ),
    PipelineParameter(
        "reward_registered_model",
        "tracking.reward_registered_model",
        "MLflow registered model of the decoupled reward models.",
        ("full", "train"),
    ),
    PipelineParameter(
        "dvc_remote",
        "pipeline.dvc_remote",
        "DVC remote URL the data steps push prompts, pairs and labels to; empty: they are "
        "DVC-hashed but not pushed.",
        ("full", "collect"),
    ),
)
"""The named run parameters, in the order the UI lists them."""

PARAMETERS_BY_NAME: dict[str, PipelineParameter] = {p.name: p for p in PIPELINE_PARAMETERS}

EMPTY_MEANS_CONFIGURED = frozenset({"label_studio_url", "mlflow_tracking_uri", "dvc_remote"})
"""Parameters whose empty value keeps the configured (or ConfigMap) value."""


def params_from_yaml(text: str, source: str = "params_yaml") -> Params:
    """Parse and validate a whole configuration given as YAML text."""
    if not text.strip():
        return Params()
    with tempfile.TemporaryDirectory(prefix="unifl-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_params(path)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(path), source)) from None


def data_params_yaml(params: Params) -> str:
    """Only the `DATA_SECTIONS` of `params`, as YAML: the data steps' cache key.

    URL credentials are redacted, as in every configuration text a step hands on.
    """
    from unifl.tracking.redaction import safe_params_yaml

    return safe_params_yaml(params, DATA_SECTIONS)


def _set(params: Params, key: str, value: Any, parameter: str) -> None:
    section_name, field = key.split(".")
    section = getattr(params, section_name)
    try:
        setattr(section, field, value)
    except ValidationError as exc:
        problems = "; ".join(err["msg"] for err in exc.errors())
        raise ConfigError(
            f"pipeline parameter {parameter!r} ({key}): {problems} (got {value!r})"
        ) from None


def apply_pipeline_parameters(
    params: Params,
    values: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    label_studio_from_env: bool = False,
) -> Params:
    """Set each named parameter's configuration key; errors name the parameter.

    Empty `label_studio_url`, `mlflow_tracking_uri` and `dvc_remote` keep the configured
    value; on a cluster the ConfigMap's `MLFLOW_TRACKING_URI` replaces the local default
    tracking URI (a SQLite file means nothing in a pod), and, with `label_studio_from_env`,
    its `LABEL_STUDIO_URL` fills an unset `labeling.url`.
    """
    environ = os.environ if environ is None else environ
    resolved = params.model_copy(deep=True)
    unknown = sorted(set(values) - set(PARAMETERS_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown pipeline parameters {unknown}")
    for name, value in values.items():
        parameter = PARAMETERS_BY_NAME[name]
        if name in EMPTY_MEANS_CONFIGURED and (value is None or value == ""):
            local_uri = resolved.tracking.tracking_uri == LOCAL_TRACKING_URI
            if name == "mlflow_tracking_uri" and local_uri and environ.get(TRACKING_URI_ENV):
                _set(resolved, parameter.key, environ[TRACKING_URI_ENV], name)
            from_env = label_studio_from_env and environ.get(LABEL_STUDIO_URL_ENV)
            if name == "label_studio_url" and from_env and not resolved.labeling.url:
                _set(resolved, parameter.key, environ[LABEL_STUDIO_URL_ENV], name)
            continue
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"pipeline parameter {name!r} ({parameter.key}): must not be empty")
        _set(resolved, parameter.key, value, name)
    return resolved


def check_gpu_placement(node_selector: Any, tolerations: Any) -> None:
    """The node selector and tolerations must be what Kubernetes accepts; name the bad entry."""
    from unifl.cluster.settings import is_label_key, is_label_value

    if not isinstance(node_selector, Mapping):
        raise ConfigError(
            f"pipeline parameter 'gpu_node_selector': expected a mapping of node label to "
            f"value, got {type(node_selector).__name__}"
        )
    for key, value in node_selector.items():
        if not is_label_key(str(key)):
            raise ConfigError(f"pipeline parameter 'gpu_node_selector': {key!r} is no label key")
        if not isinstance(value, str) or not is_label_value(value):
            raise ConfigError(
                f"pipeline parameter 'gpu_node_selector': value {value!r} of {key!r} is no "
                "label value"
            )
    if not isinstance(tolerations, Sequence) or isinstance(tolerations, str):
        raise ConfigError("pipeline parameter 'gpu_tolerations': expected a list of tolerations")
    allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
    for number, toleration in enumerate(tolerations):
        if not isinstance(toleration, Mapping):
            raise ConfigError(f"pipeline parameter 'gpu_tolerations': entry {number} is no mapping")
        extra = sorted(set(toleration) - allowed)
        if extra:
            raise ConfigError(
                f"pipeline parameter 'gpu_tolerations': entry {number} has unknown fields {extra}"
            )
        if toleration.get("operator", "Equal") not in ("Equal", "Exists"):
            raise ConfigError(
                f"pipeline parameter 'gpu_tolerations': entry {number}: operator must be "
                "Equal or Exists"
            )
        effect = toleration.get("effect")
        if effect not in (None, "", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ConfigError(
                f"pipeline parameter 'gpu_tolerations': entry {number}: unknown effect {effect!r}"
            )


def gpu_node_selector(params: Params) -> dict[str, str]:
    """The default `gpu_node_selector` parameter: the GPU pool's node label."""
    return {params.pipeline.node_selector_key: params.pipeline.node_selector_value}


def gpu_tolerations(params: Params) -> list[dict[str, str]]:
    """The default `gpu_tolerations` parameter: tolerate the GPU pool's NoSchedule taint."""
    return [{"key": params.pipeline.toleration_key, "operator": "Exists", "effect": "NoSchedule"}]


CONCRETE_DEFAULTS = frozenset({"gpu_type", "gpu_count", "dvc_remote"})
"""Named parameters with a value in the compiled pipeline: the GPU steps' resource requests
and the data steps' DVC remote are read from them directly. The others default to empty, meaning "as in params_yaml", so an
edit of `params_yaml` in the UI is never silently undone by a parameter's default."""


def parameter_defaults(params: Params, pipeline: str) -> dict[str, Any]:
    """Every run parameter of `pipeline` with its compiled default (None: from params_yaml)."""
    from unifl.tracking.redaction import redact_url_credentials, safe_params_yaml

    if pipeline not in PIPELINE_NAMES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; expected one of {PIPELINE_NAMES}")
    # Compiled defaults are readable by everyone who sees the pipeline: no URL credentials.
    defaults: dict[str, Any] = {"params_yaml": safe_params_yaml(params), "overrides": []}
    for parameter in PIPELINE_PARAMETERS:
        if pipeline in parameter.pipelines:
            value = parameter.default(params) if parameter.name in CONCRETE_DEFAULTS else None
            if isinstance(value, str):
                value = redact_url_credentials(value)
            defaults[parameter.name] = value
    defaults["gpu_node_selector"] = gpu_node_selector(params)
    defaults["gpu_tolerations"] = gpu_tolerations(params)
    return defaults


def parameter_description(parameter: PipelineParameter, params: Params) -> str:
    """The UI's description: what it sets, and the value it keeps when left empty."""
    from unifl.tracking.redaction import redact_url_credentials

    if parameter.name in CONCRETE_DEFAULTS:
        return f"{parameter.description} Default: {parameter.key} of params_yaml."
    value = parameter.default(params)
    shown = redact_url_credentials(repr(value)) if value != "" else "unset"
    return f"{parameter.description} Empty: {parameter.key} of params_yaml ({shown})."


def resolve_run_parameters(
    params_yaml: str,
    overrides: Sequence[str],
    values: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    label_studio_from_env: bool = False,
) -> Params:
    """The run's configuration: `params_yaml`, then `overrides`, then the named parameters."""
    base = params_from_yaml(params_yaml)
    if overrides:
        with tempfile.TemporaryDirectory(prefix="unifl-params-") as tmp:
            path = Path(tmp) / "params.yaml"
            path.write_text(params_to_yaml(base), encoding="utf-8")
            try:
                base = load_params(path, overrides=list(overrides))
            except ConfigError as exc:
                raise ConfigError(
                    "pipeline parameter 'overrides': " + str(exc).replace(str(path), "params_yaml")
                ) from None
    return apply_pipeline_parameters(base, values, environ, label_studio_from_env)
