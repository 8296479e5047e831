"""Component (exit handler): close the MLflow parent run with the pipeline's final state."""

from kfp import dsl
from kfp.dsl import PipelineTaskFinalStatus


def finish_tracking(
    params_yaml: str,
    overrides: list,
    pipeline_run_id: str,
    kfp_job_id: str,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    status: PipelineTaskFinalStatus,
) -> str:
    """Mark the MLflow parent run FINISHED, FAILED or KILLED, whatever happened before."""
    from unifl.orchestration.steps import finish_step

    values = {"mlflow_experiment": mlflow_experiment, "mlflow_tracking_uri": mlflow_tracking_uri}
    return finish_step(
        params_yaml,
        overrides,
        values,
        pipeline_run_id,
        kfp_job_id,
        status.state,
        status.error_message or "",
    )


def make_component(image: str):
    """The component with its base image."""
    return dsl.component(finish_tracking, base_image=image, install_kfp_package=False)
