"""Component: decoupled aesthetic feedback learning (UniFL stage 1, aesthetics)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def decoupled(
    params_yaml: str,
    parent_run_id: str,
    run_id: str,
    checkpoint_root: str,
    base_model: Input[Model],
    prompts: Input[Dataset],
    train_data: Input[Dataset],
    reward_model: Input[Model],
    gpu_type: str,
    gpu_count: int,
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Fine-tune with the per-dimension reward hinge losses on the selected prompts (real
    images only for the optional MSE regulariser); works and checkpoints under
    `checkpoint_root` so that a retried pod resumes."""
    from pathlib import Path

    from unifl.orchestration.steps import decoupled_step

    result = decoupled_step(
        params_yaml,
        base_model.path,
        prompts.path,
        reward_model.path,
        model.path,
        checkpoint_root,
        run_id,
        parent_run_id,
        train_data_dir=train_data.path,
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    model.metadata.update({**result.metadata, "gpu_type": gpu_type, "gpu_count": gpu_count})
    Path(report.path).write_text(result.markdown)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(decoupled, base_image=image, install_kfp_package=False)
