"""unifl-full end to end with kfp.local on the `ci` preset, and what stops a run before it starts.

The pipeline runs as on Kubeflow minus Kubernetes: every step is a subprocess running the
component's function, MLflow is a SQLite file, the checkpoint volume a directory.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unifl.config import ConfigError, load_params
from unifl.orchestration.local import LocalRunError, run_local
from unifl.tracking.runs import TrackingError

REPO = Path(__file__).resolve().parents[2]
# See tests/unit/test_components.py: the ci text encoder makes every toy caption a near twin.
CURATE_OVERRIDES = ["curate.near_duplicate_threshold=1.0", "curate.tau2=1.0"]
STAGES = {
    "curate",
    "validate-prompts",
    "pairs",
    "labeling",
    "validate-labels",
    "reward",
    "pefl",
    "decoupled",
    "adversarial",
    "evaluate",
}


def ci_params(*overrides: str):
    return load_params(
        REPO / "params.yaml",
        preset="ci",
        overrides=[
            *CURATE_OVERRIDES,
            f"bootstrap.cache_dir={REPO / '.cache' / 'unifl' / 'toy'}",
            *overrides,
        ],
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_unifl_full_runs_locally_and_promotes_its_model(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "local"
    summary = run_local(ci_params(), "full", out_dir=out, progress=False)
    client = MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)
    assert summary.tracking_uri == f"sqlite:///{out / 'mlflow.db'}"

    # The tuned model: registered, judged by its evaluation run, promoted to staging.
    version = client.get_model_version("unifl-sd", "1")
    assert version.aliases == ["challenger"]
    tags = version.tags
    assert tags["unifl.stage"] == "staging"
    assert tags["unifl.pipeline_run_id"] == summary.pipeline_run_id
    assert tags["unifl.gate.staging.verdict"] == "pass"
    for data in ("prompts", "pairs", "labels"):
        assert tags[f"unifl.lineage.dvc.{data}"].endswith(".dir")
    evaluation = client.get_run(tags["unifl.evaluation_run_id"])
    for metric in ("caption_match_20steps", "caption_match_4steps", "reward_color_20steps"):
        assert metric in evaluation.data.metrics
    assert 0.0 <= evaluation.data.metrics["caption_match_4steps"] <= 1.0
    reward = client.get_model_version("unifl-reward", "1")
    assert reward.aliases == ["candidate"]

    # One parent run per pipeline run, finished, with a nested run per stage.
    parent_id = evaluation.data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["unifl.pipeline_run_id"] == summary.pipeline_run_id
    assert parent.data.tags["unifl.promotion.decision"] == "promoted"
    nested = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert {run.data.tags["unifl.stage_name"] for run in nested} == STAGES
    assert all(run.info.status == "FINISHED" for run in nested)
    pefl = next(run for run in nested if run.data.tags["unifl.stage_name"] == "pefl")
    assert len(client.get_metric_history(pefl.info.run_id, "loss")) == 2

    # What `unifl run` prints, and the files it points at.
    text = summary.text()
    assert "caption_match" in text and "promoted to staging" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in text
    assert (summary.evaluation_dir / "report.html").is_file()
    assert (summary.outputs["tuned model"] / "model" / "model_index.json").is_file()
    assert summary.decision["promoted"] is True and summary.decision["version"] == "1"
    checkpoints = out / "checkpoints" / summary.pipeline_run_id
    assert {path.name for path in checkpoints.iterdir()} == {"pefl", "decoupled", "adversarial"}


def test_a_missing_input_file_stops_the_run_before_any_step(tmp_path: Path) -> None:
    out = tmp_path / "local"
    with pytest.raises(ConfigError, match=r"'labels_export': .*nowhere.json not found"):
        run_local(ci_params(), "full", out_dir=out, labels_export=str(tmp_path / "nowhere.json"))
    assert not (out / "pipeline_root").exists()


def test_an_unreachable_mlflow_server_stops_the_run_with_its_uri(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    params = ci_params(f"tracking.tracking_uri={uri}", "tracking.http_timeout_s=2")
    with pytest.raises(TrackingError, match=rf"{uri} is unreachable"):
        run_local(params, "full", out_dir=tmp_path / "local")
    assert not (tmp_path / "local" / "pipeline_root").exists()


def test_collect_without_label_studio_is_refused_before_any_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    with pytest.raises(ConfigError, match=r"'label_studio_url': the collect pipeline"):
        run_local(ci_params(), "collect", out_dir=tmp_path / "local")
    with pytest.raises(ConfigError, match=r"'pairs_uri' is required by the train pipeline"):
        run_local(ci_params(), "train", out_dir=tmp_path / "local")
    assert not (tmp_path / "local" / "pipeline_root").exists()


def test_unifl_run_names_an_invalid_parameter(tmp_path: Path) -> None:
    from unifl.cli import app

    result = CliRunner().invoke(
        app,
        ["run", "--out", str(tmp_path), "--params", str(REPO / "params.yaml"),
         "--set", "adversarial.steps=-2"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "adversarial.steps" in result.output
    assert not (tmp_path / "pipeline_root").exists()
    result = CliRunner().invoke(app, ["run", "--pipeline", "everything", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown pipeline 'everything'" in result.output


def test_a_second_run_in_the_same_directory_is_refused_at_once(tmp_path: Path) -> None:
    """The lock `unifl run` holds on its output directory, held here by the test."""
    from unifl.cli import app

    out = tmp_path / "local"
    out.mkdir()
    with (out / "run.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 4242, pipeline run id local-holder\n")
        held.flush()
        started = time.perf_counter()
        with pytest.raises(LocalRunError) as raised:
            run_local(ci_params(), "full", out_dir=out, progress=False)
        assert time.perf_counter() - started < 5
        message = str(raised.value)
        assert f"{out} is in use by another run" in message
        assert "pipeline run id local-holder" in message
        result = CliRunner().invoke(
            app, ["run", "--out", str(out), "--params", str(REPO / "params.yaml")]
        )
        assert result.exit_code == 1 and "is in use by another run" in result.output
    assert not (out / "pipeline_root").exists() and not (out / "logs").exists()


def _start_run(out: Path, stderr: Path, *extra: str) -> subprocess.Popen:
    """`unifl run` in its own process group, as a terminal starts it (Ctrl-C reaches all)."""
    command = [
        str(Path(sys.executable).with_name("unifl")), "run", "--preset", "ci",
        "--params", str(REPO / "params.yaml"), "--out", str(out), "--no-cache",
        "--set", f"bootstrap.cache_dir={REPO / '.cache' / 'unifl' / 'toy'}", *extra,
    ]  # fmt: skip
    with stderr.open("w") as errors:
        return subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
            # A test run started in the background (`make test &`) inherits SIGINT ignored,
            # and so would the run: give it a terminal's default.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


def _started_line(stderr: Path) -> str:
    lines = [line for line in stderr.read_text().splitlines() if "pipeline run id" in line]
    return lines[0] if lines else ""


def test_an_interrupted_run_says_how_to_resume_and_keeps_its_log(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the run's process group) during the first steps, twice."""
    from unifl.cli import app

    out = tmp_path / "local"
    first_err = tmp_path / "first.err"
    first = _start_run(out, first_err)
    _wait_for(lambda: _started_line(first_err), "start line")
    line = _started_line(first_err)
    run_id = line.split("pipeline run id ")[1].split(";")[0]
    log = out / "logs" / f"{run_id}.log"
    assert line == f"pipeline run id {run_id}; log: {log}"
    _wait_for(lambda: log.exists() and "Executing task" in log.read_text(), "step in the log")
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=120) == 130
    said = first_err.read_text()
    assert f"resume with the same options and --run-id {run_id} (log: {log})" in said
    first_log = log.read_text()
    assert first_log.count(f"pipeline run id {run_id}, started") == 1

    second_err = tmp_path / "second.err"
    second = _start_run(out, second_err, "--run-id", run_id)
    try:
        _wait_for(lambda: _started_line(second_err), "start line of the resumed run")
        assert _started_line(second_err) == line
        # A third run in the same directory, while the second one runs: refused at once.
        other = CliRunner().invoke(
            app, ["run", "--out", str(out), "--params", str(REPO / "params.yaml")]
        )
        assert other.exit_code == 1
        assert f"{out} is in use by another run (process {second.pid}" in other.output
        _wait_for(lambda: log.read_text().count("Executing task") > first_log.count(
            "Executing task"), "step of the resumed run in the log")  # fmt: skip
    finally:
        os.killpg(second.pid, signal.SIGINT)
        second.wait(timeout=120)
    assert second.returncode == 130
    both = log.read_text()
    assert both.startswith(first_log)
    assert both.count(f"pipeline run id {run_id}, started") == 2


def test_a_resumed_run_reports_only_its_own_failure_from_the_shared_log(tmp_path: Path) -> None:
    from unifl.orchestration.local import _log_tail

    log = tmp_path / "run.log"
    log.write_text(
        "==== attempt 1 ====\nTraceback (most recent call last):\nValueError: first attempt\n"
    )
    start = log.stat().st_size
    with log.open("a") as handle:
        handle.write("==== attempt 2 ====\nTask 'pefl' finished with status FAILURE\n")
    assert "first attempt" in _log_tail(log)
    tail = _log_tail(log, start=start)
    assert "first attempt" not in tail and "attempt 2" in tail
