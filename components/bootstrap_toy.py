"""Component: the toy world (the embedded default) or a reference to a production base model."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Model, Output


def bootstrap_toy(
    params_yaml: str,
    real_data: str,
    base_model: Output[Model],
    segmenter: Output[Model],
    train_data: Output[Dataset],
    eval_data: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> str:
    """Bootstrap the toy base model, segmenter and data sets (cached per configuration);
    for another base model, pass it on by reference. Returns the model version."""
    from pathlib import Path

    from unifl.orchestration.steps import bootstrap_step

    result = bootstrap_step(
        params_yaml, base_model.path, segmenter.path, train_data.path, eval_data.path, real_data
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    base_model.metadata.update(result.metadata)
    Path(report.path).write_text(result.markdown or "No toy world: production base model.\n")
    return result.outputs["model_version"]


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(bootstrap_toy, base_image=image, install_kfp_package=False)
