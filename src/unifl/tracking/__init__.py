"""MLflow tracking, model logging and the registry with promotion gates.

* `unifl.tracking.runs`: one parent run per pipeline run, a nested run per stage
  (`start_pipeline_run`, `stage_run`, `StageRun.metrics_callback` for the trainers).
* `unifl.tracking.models`: log and register the diffusion model, reward model and LoRA.
* `unifl.tracking.promotion`: gates and `promote` (candidate -> staging -> production).
* `unifl.tracking.registry`: aliases, version tags and legacy stages.
* `unifl.tracking.lineage`, `unifl.tracking.redaction`: lineage tags, secret filtering.

Nothing is imported here: MLflow takes seconds to import and most commands do not need it.
"""
