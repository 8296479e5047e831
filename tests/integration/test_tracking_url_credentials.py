"""A tracking URI with credentials, against a real MLflow server (see mlflow_server.py).

The first step of a pipeline gets the URI as configured; nothing it writes or logs shows
the password, and the steps after it, which receive the configuration with the password
redacted, log in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead. The
test server does not check credentials: it shows what the client sends and logs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from unifl.config import load_params, params_to_yaml
from unifl.orchestration.parameters import params_from_yaml
from unifl.orchestration.steps import finish_step, resolve_step
from unifl.tracking.runs import TrackingError, stage_run

from .mlflow_server import MlflowServer, running_mlflow_server

pytestmark = pytest.mark.integration

PASSWORD = "S3cret-tracking-6642"
RUN_ID = "url-credentials-run"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-url-credentials")) as server:
        yield server


def test_credentials_of_the_tracking_uri_reach_no_log_or_artifact(
    server: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    # Set by the tracking code for a URI with credentials; restored after the test.
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    caplog.set_level(logging.INFO)
    host = server.url.split("://", 1)[1]
    params = load_params(
        None,
        overrides=[
            f"tracking.tracking_uri=http://alice:{PASSWORD}@{host}",
            "tracking.experiment=url-credentials",
        ],
    )

    resolved = resolve_step(
        params_to_yaml(params),
        [],
        {},
        {"unifl.io/node-pool": "gpu"},
        [],
        "collect",
        RUN_ID,
        config_out=tmp_path / "config.yaml",
    )
    client = MlflowClient(tracking_uri=server.url)
    logged = client.download_artifacts(resolved.parent_run_id, "config/params.yaml", str(tmp_path))
    parent = client.get_run(resolved.parent_run_id)
    texts = {
        "params_yaml": resolved.params_yaml,
        "config artifact": (tmp_path / "config.yaml").read_text(),
        "MLflow config/params.yaml": Path(logged).read_text(),
        "MLflow params": json.dumps(parent.data.params),
    }
    for where, text in texts.items():
        assert PASSWORD not in text, where
        assert f"http://alice:***@{host}" in text, where
    assert f"on http://alice:***@{host}" in caplog.text  # the pipeline run's log line

    # A later step gets the redacted URI: without the login in the environment it says
    # which variables to set; with it, it logs to the same server.
    handed_on = params_from_yaml(resolved.params_yaml)
    with (
        pytest.raises(TrackingError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        stage_run("labeling", resolved.parent_run_id, handed_on),
    ):
        pass
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with stage_run("labeling", resolved.parent_run_id, handed_on) as run:
        run.log_metrics({"tasks_imported": 3.0})
    nested = client.get_run(run.run_id)
    assert nested.data.tags["mlflow.parentRunId"] == resolved.parent_run_id
    assert nested.data.metrics["tasks_imported"] == 3.0
    assert finish_step(resolved.params_yaml, [], {}, RUN_ID, "", "SUCCEEDED") == "FINISHED"
    assert client.get_run(resolved.parent_run_id).info.status == "FINISHED"

    # A stage run on its own (a DVC stage, the CLI) with the URI as configured: when it ends
    # MLflow prints the run's URL, without the password.
    with stage_run("pefl", None, params) as own:
        own.log_metrics({"loss": 0.5})
    assert client.get_run(own.run_id).info.status == "FINISHED"

    printed = capfd.readouterr()
    assert PASSWORD not in caplog.text + printed.out + printed.err
