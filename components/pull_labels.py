"""Component: export the annotations from Label Studio into the preference tables."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output


def pull_labels(
    params_yaml: str,
    parent_run_id: str,
    dvc_remote: str,
    labels: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Export the project's annotations and write votes, majority pairs and agreement."""
    from pathlib import Path

    from unifl.orchestration.steps import pull_step

    result = pull_step(params_yaml, labels.path, parent_run_id, dvc_remote)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    labels.metadata.update(result.metadata)
    Path(report.path).write_text(result.markdown)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(pull_labels, base_image=image, install_kfp_package=False)
