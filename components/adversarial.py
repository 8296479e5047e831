"""Component: adversarial feedback learning (UniFL stage 2, few-step inference)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def adversarial(
    params_yaml: str,
    parent_run_id: str,
    run_id: str,
    checkpoint_root: str,
    base_model: Input[Model],
    train_data: Input[Dataset],
    reward_model: Input[Model],
    gpu_type: str,
    gpu_count: int,
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Train generator and reward discriminator alternately for few-step sampling; works
    and checkpoints under `checkpoint_root` so that a retried pod resumes."""
    from pathlib import Path

    from unifl.orchestration.steps import adversarial_step

    result = adversarial_step(
        params_yaml,
        base_model.path,
        train_data.path,
        reward_model.path,
        model.path,
        checkpoint_root,
        run_id,
        parent_run_id,
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    model.metadata.update({**result.metadata, "gpu_type": gpu_type, "gpu_count": gpu_count})
    Path(report.path).write_text(result.markdown)


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(adversarial, base_image=image, install_kfp_package=False)
