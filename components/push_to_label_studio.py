"""Component: create the Label Studio project and import the pairs as tasks."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Output


def push_to_label_studio(
    params_yaml: str,
    parent_run_id: str,
    pairs: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> str:
    """Push the pairs to Label Studio (idempotent) and return the project id; annotators
    label them over the following days and the train pipeline pulls their work."""
    from pathlib import Path

    from unifl.orchestration.steps import push_step

    result = push_step(params_yaml, pairs.path, parent_run_id)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    Path(report.path).write_text(result.markdown)
    return result.outputs["project_id"]


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(push_to_label_studio, base_image=image, install_kfp_package=False)
