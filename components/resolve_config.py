"""Component: resolve and validate the run's parameters; open the MLflow parent run."""

# KFP reads optional inputs only from typing.Optional, not from `X | None`.
# ruff: noqa: UP045

from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Artifact, Output


def resolve_config(
    params_yaml: str,
    overrides: list,
    pipeline: str,
    pipeline_run_id: str,
    kfp_job_id: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    label_studio_from_env: bool,
    config: Output[Artifact],
    base_model: Optional[str] = None,
    label_studio_url: Optional[str] = None,
    label_studio_project: Optional[str] = None,
    reward_epochs: Optional[int] = None,
    reward_learning_rate: Optional[float] = None,
    pefl_steps: Optional[int] = None,
    pefl_learning_rate: Optional[float] = None,
    decoupled_steps: Optional[int] = None,
    decoupled_learning_rate: Optional[float] = None,
    adversarial_steps: Optional[int] = None,
    adversarial_learning_rate: Optional[float] = None,
    gpu_type: Optional[str] = None,
    gpu_count: Optional[int] = None,
    mlflow_tracking_uri: Optional[str] = None,
    mlflow_experiment: Optional[str] = None,
    registered_model: Optional[str] = None,
    reward_registered_model: Optional[str] = None,
    dvc_remote: Optional[str] = None,
) -> NamedTuple(
    "ResolvedRun",
    [("params_yaml", str), ("data_params_yaml", str), ("parent_run_id", str), ("run_id", str)],
):
    """Validate every run parameter (a bad one stops the run here, by name) and open the
    MLflow parent run of this pipeline run."""
    from collections import namedtuple

    from unifl.orchestration.steps import resolve_step

    named = {
        "base_model": base_model,
        "label_studio_url": label_studio_url,
        "label_studio_project": label_studio_project,
        "reward_epochs": reward_epochs,
        "reward_learning_rate": reward_learning_rate,
        "pefl_steps": pefl_steps,
        "pefl_learning_rate": pefl_learning_rate,
        "decoupled_steps": decoupled_steps,
        "decoupled_learning_rate": decoupled_learning_rate,
        "adversarial_steps": adversarial_steps,
        "adversarial_learning_rate": adversarial_learning_rate,
        "gpu_type": gpu_type,
        "gpu_count": gpu_count,
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "mlflow_experiment": mlflow_experiment,
        "registered_model": registered_model,
        "reward_registered_model": reward_registered_model,
        "dvc_remote": dvc_remote,
    }
    resolved = resolve_step(
        params_yaml,
        overrides,
        {name: value for name, value in named.items() if value is not None},
        gpu_node_selector,
        gpu_tolerations,
        pipeline,
        pipeline_run_id,
        kfp_job_id,
        label_studio_from_env=label_studio_from_env,
        config_out=config.path,
    )
    outputs = namedtuple(
        "ResolvedRun", ["params_yaml", "data_params_yaml", "parent_run_id", "run_id"]
    )
    return outputs(
        resolved.params_yaml,
        resolved.data_params_yaml,
        resolved.parent_run_id,
        resolved.pipeline_run_id,
    )


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(resolve_config, base_image=image, install_kfp_package=False)
