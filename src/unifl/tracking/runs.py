"""MLflow runs of the pipeline: one parent run per pipeline run, one nested run per stage.

Stages run in separate processes (KFP components, DVC stages), so nothing relies on MLflow's
in-process "active run" stack to find the parent: the parent run id travels explicitly
(a pipeline parameter, a CLI option) and `stage_run` attaches to it by id. Re-running a stage
of the same pipeline run (a KFP retry, a resumed `dvc repro`) re-opens the stage's existing
nested run instead of creating a sibling, and `start_pipeline_run` does the same for the
parent, keyed by the pipeline run id.

Everything logged goes through `unifl.tracking.redaction` first, and an unreachable tracking
server is reported in one line naming the URI, after seconds rather than MLflow's default of
several minutes of retries.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from unifl.config import Params, TrackingConfig
from unifl.tracking.lineage import git_commit, git_is_dirty, lineage_tags
from unifl.tracking.redaction import (
    filter_secrets,
    has_redacted_password,
    redact_url_credentials,
    safe_params,
    without_url_credentials,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from PIL import Image

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
"""What the trainers call after each step: ``callback(step, {"loss": 0.3, ...})``."""

PIPELINE_RUN_ID_TAG = "unifl.pipeline_run_id"
STAGE_TAG = "unifl.stage_name"
GIT_COMMIT_TAG = "unifl.git_commit"
PARENT_RUN_TAG = "mlflow.parentRunId"
_MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"
_MLFLOW_RUN_NAME_TAG = "mlflow.runName"
_MLFLOW_USER_TAG = "mlflow.user"
_MLFLOW_SOURCE_TAG = "mlflow.source.name"


_SAFE_ID = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,200}$")
_BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch call


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI and what to do."""


# ---------------------------------------------------------------------------- connection


def configure_http(tracking: TrackingConfig) -> None:
    """Short MLflow HTTP timeouts and retries, unless the environment already sets them.

    MLflow's defaults (7 retries with exponential backoff, 120 s per request) turn a wrong
    URI into minutes of silence; a pipeline should rather fail at once and say why. For a
    URI with credentials MLflow also stops printing run URLs, which would show them.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(tracking.http_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(tracking.http_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if urlparse(tracking.tracking_uri).password is not None:
        # MLflow prints "View run at <tracking URI>/..." when a run ends, credentials included.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def client_tracking_uri(uri: str, environ: Mapping[str, str] | None = None) -> str:
    """The URI the MLflow client connects to for the configured `uri`.

    The configuration a pipeline step receives has URL credentials redacted
    (``https://user:***@host``): such a URI cannot log in, so the step takes the login from
    `MLFLOW_CREDENTIAL_KEYS` and connects to the URI without user info. Anything else is
    returned as it is.
    """
    if not has_redacted_password(uri):
        return uri
    from unifl.cluster.settings import (
        MLFLOW_CREDENTIAL_KEYS,
        MLFLOW_CREDENTIALS_SECRET,
        unset_secret_keys,
    )

    environ = os.environ if environ is None else environ
    unset = unset_secret_keys(MLFLOW_CREDENTIAL_KEYS, MLFLOW_CREDENTIALS_SECRET, environ)
    if unset:
        raise TrackingError(
            f"tracking URI {uri}: credentials in the URL are not handed from step to step; {unset}"
        )
    return without_url_credentials(uri)


def _is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming `uri`, when the tracking store cannot be used.

    HTTP(S): the server's ``/health`` must answer 200 (a wrong ``--allowed-hosts`` shows up
    here as a 4xx). SQLite: the database's directory is created. A plain file store is
    refused unless ``MLFLOW_ALLOW_FILE_STORE=true`` (MLflow >= 3.13 refuses it later anyway).
    """
    shown = redact_url_credentials(uri)
    parsed = urlparse(uri)
    if _is_http(uri):
        import requests

        health = uri.rstrip("/") + "/health"
        try:
            response = requests.get(health, timeout=timeout_s)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise TrackingError(
                f"MLflow tracking server {shown} is unreachable ({reason}); start it "
                "(mlflow/server.sh) or set tracking.tracking_uri"
            ) from None
        if response.status_code != 200:
            raise TrackingError(
                f"MLflow tracking server {shown} answered {response.status_code} on /health: "
                f"{response.text[:200].strip()!r} (a wrong --allowed-hosts gives 403)"
            )
        return
    if parsed.scheme == "sqlite":
        database = uri[len("sqlite:///") :]
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return
    if parsed.scheme in ("", "file"):
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
        if not allowed:
            raise TrackingError(
                f"tracking URI {shown} is a file store, which MLflow refuses unless "
                "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///<path>.db instead"
            )


@contextlib.contextmanager
def tracking_errors(uri: str) -> Iterator[None]:
    """Turn MLflow's connection failures into one `TrackingError` line naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        # MLflow's messages carry the request URL, credentials included.
        text = redact_url_credentials(str(exc))
        if "failed with exception" in text or "Max retries exceeded" in text:
            raise TrackingError(
                f"MLflow tracking server {redact_url_credentials(uri)} stopped answering: "
                f"{text.splitlines()[0][:300]}"
            ) from None
        if text != str(exc):
            exc.message = text
            exc.args = (text,)
        raise


def connect(tracking: TrackingConfig) -> MlflowClient:
    """A client for the configured tracking server and registry, checked to be reachable."""
    from mlflow import MlflowClient

    configure_http(tracking)
    uri = client_tracking_uri(tracking.tracking_uri)
    check_tracking_server(uri, timeout_s=tracking.http_timeout_s)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    with tracking_errors(uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} on {redact_url_credentials(uri)} is deleted; "
                    "restore it or set tracking.experiment"
                )
            return experiment.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name)
        except MlflowException:
            # Created concurrently by another stage.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


def _check_id(kind: str, value: str) -> str:
    if not _SAFE_ID.match(value):
        raise TrackingError(
            f"{kind} {value!r}: use letters, digits and _ . : / @ + - (at most 200 characters)"
        )
    return value


def _context_tags() -> dict[str, str]:
    tags = {_MLFLOW_SOURCE_TAG: "unifl"}
    with contextlib.suppress(Exception):
        tags[_MLFLOW_USER_TAG] = getpass.getuser()
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags[_MLFLOW_GIT_COMMIT_TAG] = commit
        dirty = git_is_dirty()
        if dirty is not None:
            tags["unifl.git_dirty"] = str(dirty).lower()
    return tags


def _chunks(items: list[Any], size: int = _BATCH) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_params(client: MlflowClient, run_id: str, values: Mapping[str, Any]) -> None:
    """Log params once; a key already logged with another value is an error naming it."""
    from mlflow.entities import Param

    safe = filter_secrets(values)
    existing = client.get_run(run_id).data.params
    changed = sorted(k for k, v in safe.items() if k in existing and existing[k] != v[:6000])
    if changed:
        raise TrackingError(
            f"run {run_id} already has different values for {', '.join(changed)}; "
            "a resumed run must keep its parameters (start a new pipeline run id instead)"
        )
    new = [Param(k, v) for k, v in safe.items() if k not in existing]
    for chunk in _chunks(new):
        client.log_batch(run_id, params=chunk)


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    safe = filter_secrets(tags)
    for chunk in _chunks([RunTag(k, v) for k, v in safe.items()]):
        client.log_batch(run_id, tags=chunk)


def _find_run(client: MlflowClient, experiment_id: str, filters: Mapping[str, str]) -> str | None:
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in filters.items())
    runs = client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time ASC"]
    )
    return runs[0].info.run_id if runs else None


# ---------------------------------------------------------------------------- pipeline runs


def start_pipeline_run(
    params: Params, pipeline_run_id: str, tags: Mapping[str, Any] | None = None
) -> str:
    """Create (or re-open) the parent run of one pipeline run; return its MLflow run id.

    The run carries the flattened parameters (without secrets), the git commit, the pipeline
    run id and `tags` (e.g. `lineage_tags(...)`). Calling it again with the same pipeline run
    id returns the same run, so a retried pipeline does not fork its history.
    """
    from mlflow.entities import RunStatus

    tracking = params.tracking
    uri = tracking.tracking_uri
    _check_id("pipeline run id", pipeline_run_id)
    client = connect(tracking)
    experiment_id = _experiment_id(client, tracking.experiment, uri)
    with tracking_errors(uri):
        run_id = _find_run(
            client, experiment_id, {PIPELINE_RUN_ID_TAG: pipeline_run_id, STAGE_TAG: "pipeline"}
        )
        if run_id is None:
            run = client.create_run(
                experiment_id,
                run_name=f"pipeline-{pipeline_run_id}",
                tags={PIPELINE_RUN_ID_TAG: pipeline_run_id, STAGE_TAG: "pipeline"},
            )
            run_id = run.info.run_id
        else:
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        _set_tags(client, run_id, {**_context_tags(), **dict(tags or {})})
        _log_params(client, run_id, safe_params(params))
    logger.info(
        "MLflow pipeline run %s (pipeline run id %s) on %s",
        run_id,
        pipeline_run_id,
        redact_url_credentials(uri),
    )
    return run_id


def finish_pipeline_run(params: Params, run_id: str, status: str = "FINISHED") -> None:
    """Close the parent run: FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status {status!r}: expected FINISHED, FAILED or KILLED")
    client = connect(params.tracking)
    with tracking_errors(params.tracking.tracking_uri):
        client.set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------- stage runs


class StageRun:
    """One stage's MLflow run: params, per-step metrics, artifacts, lineage tags.

    All calls name the run id explicitly (no reliance on a process-global active run), so a
    `StageRun` can be handed to trainers, evaluators and report writers alike.
    """

    def __init__(self, client: MlflowClient, run_id: str, name: str, tracking_uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.name = name
        self.tracking_uri = tracking_uri

    @property
    def artifact_uri(self) -> str:
        with tracking_errors(self.tracking_uri):
            return self.client.get_run(self.run_id).info.artifact_uri

    def log_params(self, values: Mapping[str, Any]) -> None:
        """Log parameters (secrets filtered; re-logging the same value is a no-op)."""
        with tracking_errors(self.tracking_uri):
            _log_params(self.client, self.run_id, values)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (secrets filtered)."""
        with tracking_errors(self.tracking_uri):
            _set_tags(self.client, self.run_id, tags)

    def log_lineage(
        self,
        dvc_hashes: Mapping[str, str] | None = None,
        label_studio_project_id: str | int | None = None,
        label_studio_export_id: str | int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Tag the data versions this stage consumed (see `lineage.lineage_tags`)."""
        self.set_tags(
            lineage_tags(dvc_hashes, label_studio_project_id, label_studio_export_id, extra)
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics, at `step` when given (per-step training curves)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, int(step or 0)) for k, v in metrics.items()]
        with tracking_errors(self.tracking_uri):
            for start in range(0, len(entries), 1000):
                self.client.log_batch(self.run_id, metrics=entries[start : start + 1000])

    def metrics_callback(self, step: int, metrics: dict[str, float]) -> None:
        """The `MetricsCallback` the trainers accept: ``callback(step, metrics)``."""
        self.log_metrics(metrics, step=step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole directory under `artifact_path`."""
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        with tracking_errors(self.tracking_uri):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _log_file(self, artifact_file: str, write: Callable[[Path], None]) -> None:
        relative = Path(artifact_file)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"artifact file {artifact_file!r} must be a relative path")
        with tempfile.TemporaryDirectory(prefix="unifl-artifact-") as tmp:
            local = Path(tmp) / relative.name
            write(local)
            parent = relative.parent.as_posix()
            self.log_artifact(local, None if parent == "." else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact: an HTML or Markdown report, a YAML config."""
        self._log_file(artifact_file, lambda p: p.write_text(text, encoding="utf-8"))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """A JSON artifact."""
        self.log_text(json.dumps(data, indent=2, sort_keys=True) + "\n", artifact_file)

    def log_table(self, frame: pd.DataFrame, artifact_file: str) -> None:
        """A table artifact, CSV or JSON (records) by the file's suffix."""
        suffix = Path(artifact_file).suffix.lower()
        if suffix == ".csv":
            self._log_file(artifact_file, lambda p: frame.to_csv(p, index=False))
        elif suffix == ".json":
            self._log_file(artifact_file, lambda p: frame.to_json(p, orient="records", indent=2))
        else:
            raise ValueError(f"table artifact {artifact_file!r}: use a .csv or .json name")

    def log_evaluation(self, out_dir: str | Path, artifact_path: str = "evaluation") -> None:
        """Log an evaluation output directory: ``metrics.json`` as metrics, files as artifacts.

        With the default `artifact_path` the per-prompt table lands where the promotion
        gates read it (``evaluation/per_prompt.csv``, `promotion.per_prompt_artifact`).
        """
        directory = Path(out_dir)
        metrics_file = directory / "metrics.json"
        if not directory.is_dir():
            raise FileNotFoundError(f"evaluation directory {directory} does not exist")
        if metrics_file.is_file():
            try:
                metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{metrics_file}: not valid JSON: {exc.msg}") from None
            if not isinstance(metrics, dict):
                raise ValueError(f"{metrics_file}: expected a mapping of metric -> number")
            numbers = {
                name: float(value)
                for name, value in metrics.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
            self.log_metrics(numbers)
        self.log_artifact(directory, artifact_path)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        """An image artifact (e.g. a sample grid), saved as PNG."""
        if Path(artifact_file).suffix.lower() != ".png":
            raise ValueError(f"image artifact {artifact_file!r}: use a .png name")
        self._log_file(artifact_file, lambda p: image.save(p, format="PNG"))


def attach_run(params: Params, run_id: str) -> StageRun:
    """A handle on an existing run (e.g. the pipeline's parent) that leaves its status alone.

    For what belongs to the pipeline as a whole: lineage known only after labeling, the
    final evaluation summary, the promotion decision.
    """
    _check_id("run id", run_id)
    client = connect(params.tracking)
    uri = client_tracking_uri(params.tracking.tracking_uri)
    with tracking_errors(uri):
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            if isinstance(exc, TrackingError):
                raise
            raise TrackingError(
                f"run {run_id!r} not found on {redact_url_credentials(uri)}"
            ) from None
    return StageRun(client, run_id, run.data.tags.get(STAGE_TAG, "run"), uri)


def _open_stage_run(
    client: MlflowClient, name: str, parent_run_id: str | None, experiment_name: str, uri: str
) -> str:
    from mlflow.entities import RunStatus

    with tracking_errors(uri):
        if parent_run_id is None:
            experiment_id = _experiment_id(client, experiment_name, uri)
            run = client.create_run(experiment_id, run_name=name, tags={STAGE_TAG: name})
            return run.info.run_id
        try:
            parent = client.get_run(parent_run_id)
        except Exception as exc:
            if isinstance(exc, TrackingError):
                raise
            raise TrackingError(
                f"parent run {parent_run_id!r} not found on {redact_url_credentials(uri)}"
            ) from None
        experiment_id = parent.info.experiment_id
        run_id = _find_run(client, experiment_id, {PARENT_RUN_TAG: parent_run_id, STAGE_TAG: name})
        if run_id is not None:
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return run_id
        tags = {PARENT_RUN_TAG: parent_run_id, STAGE_TAG: name}
        pipeline_id = parent.data.tags.get(PIPELINE_RUN_ID_TAG)
        if pipeline_id:
            tags[PIPELINE_RUN_ID_TAG] = pipeline_id
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


@contextlib.contextmanager
def stage_run(
    name: str,
    parent_run_id: str | None,
    params: Params,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[StageRun]:
    """The nested run of stage `name` under the pipeline's parent run (attached by id).

    With `parent_run_id=None` the stage gets a top-level run (a stage run on its own, e.g. by
    DVC). The run's params are the stage's own config section when there is one (the parent
    holds all of them). Inside the block the run is also MLflow's active run, so
    ``mlflow.*.log_model`` calls attach to it. It ends FINISHED, or FAILED on an exception.
    """
    import mlflow

    tracking = params.tracking
    uri = client_tracking_uri(tracking.tracking_uri)
    _check_id("stage name", name)
    if parent_run_id is not None:
        _check_id("parent run id", parent_run_id)
    client = connect(tracking)
    run_id = _open_stage_run(client, name, parent_run_id, tracking.experiment, uri)
    stage = StageRun(client, run_id, name, uri)
    status = "FINISHED"
    try:
        stage.set_tags({**_context_tags(), **dict(tags or {})})
        section = getattr(params, name) if name in Params.model_fields else None
        if section is not None:
            stage.log_params(safe_params({name: section.model_dump(mode="json")}))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with tracking_errors(uri):
            mlflow.start_run(run_id=run_id, nested=True)
        yield stage
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            with contextlib.suppress(Exception):
                mlflow.end_run(status=status)
        else:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status=status)
