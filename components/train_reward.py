"""Component: decoupled reward models (one head per aesthetic dimension) from the labels."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def train_reward(
    params_yaml: str,
    parent_run_id: str,
    labels: Input[Dataset],
    pairs: Input[Dataset],
    gpu_type: str,
    gpu_count: int,
    reward_model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> str:
    """Train the reward models with the Bradley-Terry loss, calibrate alpha per dimension,
    log and register them in MLflow; returns the registered version."""
    from pathlib import Path

    from unifl.orchestration.steps import reward_step

    result = reward_step(params_yaml, labels.path, pairs.path, reward_model.path, parent_run_id)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    reward_model.metadata.update({**result.metadata, "gpu_type": gpu_type, "gpu_count": gpu_count})
    Path(report.path).write_text(result.markdown)
    return result.outputs.get("reward_model_version", "")


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(train_reward, base_image=image, install_kfp_package=False)
