"""Component: evaluate the tuned model against the base model; register it as a candidate."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(
    params_yaml: str,
    parent_run_id: str,
    model: Input[Model],
    eval_data: Input[Dataset],
    segmenter: Input[Model],
    reward_model: Input[Model],
    base_model: Input[Model],
    gpu_type: str,
    gpu_count: int,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
) -> str:
    """Per-prompt metrics at each step count, Frechet distance, sample grids and a report;
    the model is logged and registered with this evaluation as its evaluation run.
    Returns the registered version."""
    from pathlib import Path

    from unifl.orchestration.steps import copy_report, evaluate_step

    result = evaluate_step(
        params_yaml,
        model.path,
        eval_data.path,
        evaluation.path,
        segmenter_dir=segmenter.path,
        reward_dir=reward_model.path,
        baseline_dir=base_model.path,
        parent_run_id=parent_run_id,
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    evaluation.metadata.update({**result.metadata, "gpu_type": gpu_type, "gpu_count": gpu_count})
    copy_report(Path(evaluation.path) / "report.html", report.path)
    Path(summary.path).write_text(result.markdown)
    return result.outputs.get("model_version", "")


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(evaluate, base_image=image, install_kfp_package=False)
