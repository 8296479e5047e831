"""Component: a Great Expectations suite on a table; failing it stops the pipeline."""

# KFP reads optional inputs only from typing.Optional, not from `X | None`.
# ruff: noqa: UP045

from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def validate_data(
    params_yaml: str,
    kind: str,
    table: Input[Dataset],
    table_file: str,
    validation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    images: Optional[Input[Dataset]] = None,
):
    """Validate `table` (a file inside it when `table_file` is set) with the suite of `kind`
    (prompts, pairs, votes, evaluation); image paths resolve against `images`."""
    from pathlib import Path

    from unifl.orchestration.steps import copy_report, validate_step

    source = Path(table.path) / table_file if table_file else Path(table.path)
    image_root = images.path if images is not None else None
    result = validate_step(params_yaml, kind, source, validation.path, image_root)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    validation.metadata.update(result.metadata)
    copy_report(result.outputs["report_html"], report.path)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(validate_data, base_image=image, install_kfp_package=False)
