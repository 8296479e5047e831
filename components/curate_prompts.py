"""Component: prompt curation with active prompt selection."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def curate_prompts(
    params_yaml: str,
    base_model: Input[Model],
    prompt_source: str,
    dvc_remote: str,
    prompts: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Clean, dedupe and actively select prompts (the toy captions when no source is given);
    the curated table is DVC-hashed (and pushed when a DVC remote is set)."""
    from pathlib import Path

    from unifl.orchestration.steps import curate_step

    result = curate_step(params_yaml, base_model.path, prompt_source, prompts.path, dvc_remote)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    prompts.metadata.update(result.metadata)
    Path(report.path).write_text(result.markdown)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(curate_prompts, base_image=image, install_kfp_package=False)
