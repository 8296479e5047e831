"""Component: the promotion gates on the newly registered version."""

from kfp import dsl
from kfp.dsl import Artifact, Markdown, Metrics, Output


def promote(
    params_yaml: str,
    parent_run_id: str,
    model_version: str,
    target: str,
    decision: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> str:
    """Promote the version to `target` when every gate passes (thresholds, not worse than
    the champion); a rejection is recorded, not an error. Returns promoted or rejected."""
    from pathlib import Path

    from unifl.orchestration.steps import promote_step

    result = promote_step(params_yaml, model_version, decision.path, parent_run_id, target)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    decision.metadata.update(result.metadata)
    Path(report.path).write_text(result.markdown)
    return result.outputs["decision"]


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(promote, base_image=image, install_kfp_package=False)
