"""Component: record the cached data steps in the MLflow run, with their DVC hashes."""

# KFP reads optional inputs only from typing.Optional, not from `X | None`.
# ruff: noqa: UP045

from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output


def log_data_lineage(
    params_yaml: str,
    parent_run_id: str,
    prompts: Input[Dataset],
    pairs: Input[Dataset],
    metrics: Output[Metrics],
    prompts_validation: Optional[Input[Artifact]] = None,
    labels: Optional[Input[Dataset]] = None,
    labels_validation: Optional[Input[Artifact]] = None,
):
    """A nested MLflow run per data step (curation, validation, pairs, labels) with its
    numbers and reports; DVC hashes and Label Studio ids as lineage tags on the parent."""
    from unifl.orchestration import data_reports as reports
    from unifl.orchestration.steps import DataOutput, lineage_step

    outputs = [
        DataOutput("curate", prompts.path, prompts.metadata, reports.curation_metrics, "prompts")
    ]
    if prompts_validation is not None:
        outputs.append(
            DataOutput(
                "validate-prompts",
                prompts_validation.path,
                prompts_validation.metadata,
                reports.validation_metrics,
            )
        )
    outputs.append(DataOutput("pairs", pairs.path, pairs.metadata, reports.pairs_metrics, "pairs"))
    if labels is not None:
        outputs.append(
            DataOutput("labeling", labels.path, labels.metadata, reports.labels_metrics, "labels")
        )
    if labels_validation is not None:
        outputs.append(
            DataOutput(
                "validate-labels",
                labels_validation.path,
                labels_validation.metadata,
                reports.validation_metrics,
            )
        )
    result = lineage_step(params_yaml, parent_run_id, outputs)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(log_data_lineage, base_image=image, install_kfp_package=False)
