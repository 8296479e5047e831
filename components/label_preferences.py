"""Component: preference labels from simulated annotators or an existing export."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Output


def label_preferences(
    params_yaml: str,
    pairs: Input[Dataset],
    labels_export: str,
    dvc_remote: str,
    labels: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Label the pairs with the simulated annotator panel, or convert `labels_export` (a
    Label Studio JSON export of these pairs); never waits for people."""
    from pathlib import Path

    from unifl.orchestration.steps import label_step

    result = label_step(params_yaml, pairs.path, labels.path, labels_export, dvc_remote)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    labels.metadata.update(result.metadata)
    Path(report.path).write_text(result.markdown)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(label_preferences, base_image=image, install_kfp_package=False)
