"""Component: two images per curated prompt, for the annotators."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def generate_pairs(
    params_yaml: str,
    base_model: Input[Model],
    prompts: Input[Dataset],
    dvc_remote: str,
    gpu_type: str,
    gpu_count: int,
    pairs: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Sample an image pair per prompt with the base model; the pairs directory (images and
    manifest) is DVC-hashed (and pushed when a DVC remote is set)."""
    from pathlib import Path

    from unifl.orchestration.steps import pairs_step

    version = str(base_model.metadata.get("model_version", ""))
    result = pairs_step(params_yaml, base_model.path, prompts.path, pairs.path, version, dvc_remote)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    pairs.metadata.update({**result.metadata, "gpu_type": gpu_type, "gpu_count": gpu_count})
    Path(report.path).write_text(result.markdown)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(generate_pairs, base_image=image, install_kfp_package=False)
