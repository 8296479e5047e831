"""Tracking without a server: secret filtering, flattened params, lineage, fail-fast checks."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from unifl.config import Params, TrackingConfig, load_params
from unifl.tracking.lineage import (
    GIT_COMMIT_ENV,
    LineageError,
    content_digest,
    dvc_file_hashes,
    dvc_lock_hashes,
    git_commit,
    git_is_dirty,
    lineage_tags,
)
from unifl.tracking.redaction import (
    filter_secrets,
    flatten_params,
    is_secret_key,
    redact_url_credentials,
    safe_params,
    safe_params_yaml,
)
from unifl.tracking.runs import (
    TrackingError,
    check_tracking_server,
    client_tracking_uri,
    configure_http,
    tracking_errors,
)

TOKEN = "ls-9f8e7d6c5b4a39281706"
URL_PASSWORD = "S3cret-url-pw-5930"


def test_flatten_params_covers_every_section() -> None:
    flat = flatten_params(Params())
    assert flat["pefl.steps"] == 200
    assert flat["decoupled.weights.color"] == 1.0
    assert flat["evaluate.steps"] == [20, 4]
    assert flat["model.revision"] is None
    sections = {key.split(".", 1)[0] for key in flat}
    assert sections == set(Params.model_fields)


def test_safe_params_are_strings_and_keep_env_variable_names() -> None:
    safe = safe_params(Params())
    assert safe["pefl.steps"] == "200"
    assert safe["evaluate.steps"] == "[20, 4]"
    assert safe["model.revision"] == "null"
    # The *name* of the variable holding the token is not a secret.
    assert safe["labeling.token_env"] == "LABEL_STUDIO_API_KEY"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("labeling.api_key", True),
        ("db.password", True),
        ("s3.secret_access_key", True),
        ("hub.token", True),
        ("auth.access_token", True),
        ("labeling.token_env", False),
        ("trainer.max_tokens", False),
        ("model.tokenizer", False),
        ("pefl.steps", False),
    ],
)
def test_secret_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_token_from_environment_never_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    # A user pasted the token into a value (and into a tag): both are dropped.
    params = load_params(None, overrides=[f"labeling.project_title=project {TOKEN}"])
    safe = safe_params(params)
    assert "labeling.project_title" not in safe
    assert all(TOKEN not in value for value in safe.values())
    tags = filter_secrets({"note": f"Authorization: Token {TOKEN}", "stage": "pefl"})
    assert tags == {"stage": "pefl"}


@pytest.mark.parametrize(
    "value",
    [
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
        "AKIAABCDEFGHIJKLMNOP",
        "Bearer abcdefghijklmnopqrstuvwxyz",
    ],
)
def test_token_formats_are_dropped(value: str) -> None:
    assert filter_secrets({"anything": value}, environ={}) == {}


def test_url_credentials_are_redacted_not_dropped() -> None:
    safe = filter_secrets({"db": "postgresql://unifl:hunter22@db:5432/mlflow"}, environ={})
    assert safe == {"db": "postgresql://unifl:***@db:5432/mlflow"}
    assert redact_url_credentials("http://host:5000") == "http://host:5000"


def test_ordinary_values_survive(monkeypatch: pytest.MonkeyPatch) -> None:
    # Short environment values ("true", "1") are too common to treat as secrets.
    monkeypatch.setenv("SOME_TOKEN", "1")
    values = {"a": 1, "b": "0.0001", "c": "3f2a" * 10, "d": None}
    assert filter_secrets(values) == {"a": "1", "b": "0.0001", "c": "3f2a" * 10, "d": "null"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        check_tracking_server(uri, timeout_s=2)
    assert time.monotonic() - start < 3


def test_credentials_in_an_unreachable_uri_are_not_shown() -> None:
    uri = f"http://user:pa55word@127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingError) as error:
        check_tracking_server(uri, timeout_s=2)
    assert "pa55word" not in str(error.value) and "user:***@" in str(error.value)


def test_mlflow_errors_lose_the_credentials_of_the_request_url(monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://alice:{URL_PASSWORD}@127.0.0.1:{_closed_port()}"
    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(MlflowException) as raw:
        client.get_experiment_by_name("any")
    assert URL_PASSWORD in str(raw.value)  # MLflow names the request URL as it was given
    with pytest.raises(TrackingError) as error, tracking_errors(uri):
        client.get_experiment_by_name("any")
    assert "stopped answering" in str(error.value) and "alice:***@127.0.0.1" in str(error.value)
    assert URL_PASSWORD not in str(error.value)
    # Other MLflow errors keep their type and code, without the credentials.
    with pytest.raises(MlflowException) as other, tracking_errors(uri):
        raise MlflowException(f"{uri}/api/2.0/mlflow/runs/get: no such run", error_code=1)
    assert URL_PASSWORD not in str(other.value) and "alice:***@" in other.value.message


def test_a_redacted_tracking_uri_logs_in_with_the_environment() -> None:
    redacted = "https://alice:***@mlflow.example.com/base"
    with pytest.raises(TrackingError) as error:
        client_tracking_uri(redacted, environ={"MLFLOW_TRACKING_USERNAME": "alice"})
    message = str(error.value)
    assert message.startswith(f"tracking URI {redacted}: credentials in the URL are not handed")
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment" in message
    assert "unifl-mlflow-credentials Secret" in message
    assert message.endswith("not set: MLFLOW_TRACKING_PASSWORD")
    login = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": URL_PASSWORD}
    assert client_tracking_uri(redacted, login) == "https://mlflow.example.com/base"
    given = f"https://alice:{URL_PASSWORD}@mlflow.example.com"
    assert client_tracking_uri(given, {}) == given
    assert client_tracking_uri("sqlite:///runs/mlflow.db", {}) == "sqlite:///runs/mlflow.db"


def test_a_local_run_hands_the_url_login_to_its_steps_as_environment() -> None:
    from unifl.orchestration.local import tracking_credentials_env

    assert tracking_credentials_env("https://alice:p%40ss-w0rd@mlflow.example.com") == {
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "p@ss-w0rd",
    }
    assert tracking_credentials_env("https://mlflow.example.com") == {}
    assert tracking_credentials_env("sqlite:///runs/local/mlflow.db") == {}


def test_configuration_text_has_no_url_credentials() -> None:
    params = load_params(
        None,
        overrides=[
            f"tracking.tracking_uri=https://alice:{URL_PASSWORD}@mlflow.example.com",
            f"pipeline.dvc_remote=s3://key:{URL_PASSWORD}@bucket/dvc",
        ],
    )
    text = safe_params_yaml(params)
    assert URL_PASSWORD not in text
    assert "tracking_uri: https://alice:***@mlflow.example.com" in text
    assert "dvc_remote: s3://key:***@bucket/dvc" in text
    import yaml

    section = yaml.safe_load(safe_params_yaml(params, ["pipeline"]))
    assert list(section) == ["pipeline"]
    assert section["pipeline"]["dvc_remote"] == "s3://key:***@bucket/dvc"


def test_cli_shows_no_url_credentials(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from unifl.cli import app

    (tmp_path / "params.yaml").write_text("{}\n")
    runner = CliRunner()
    shown = runner.invoke(
        app,
        [
            "config",
            "show",
            "--params",
            str(tmp_path / "params.yaml"),
            "--set",
            f"tracking.tracking_uri=https://alice:{URL_PASSWORD}@mlflow.example.com",
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert "tracking_uri: https://alice:***@mlflow.example.com" in shown.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{URL_PASSWORD}@mlflow.example.com")
    checked = runner.invoke(app, ["cluster", "check", "--needs", "mlflow"])
    assert checked.exit_code == 0, checked.output
    assert "mlflow: tracking URI https://alice:***@mlflow.example.com" in checked.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"ftp://alice:{URL_PASSWORD}@mlflow.example.com")
    refused = runner.invoke(app, ["cluster", "check", "--needs", "mlflow"])
    assert refused.exit_code == 2 and "MLFLOW_TRACKING_URI" in refused.output
    for result in (shown, checked, refused):
        assert URL_PASSWORD not in result.output


def test_file_store_needs_the_explicit_switch(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_ALLOW_FILE_STORE"):
        check_tracking_server(str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_server(str(tmp_path / "mlruns"))


def test_sqlite_directory_is_created(tmp_path) -> None:
    check_tracking_server(f"sqlite:///{tmp_path}/deep/er/mlflow.db")
    assert (tmp_path / "deep" / "er").is_dir()


def test_http_settings_respect_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    configure_http(TrackingConfig(http_timeout_s=4, http_max_retries=1))
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"


DVC_LOCK = """\
schema: '2.0'
stages:
  curate:
    cmd: unifl stage curate
    deps:
    - path: data/raw_prompts.csv
      hash: md5
      md5: 11111111111111111111111111111111
      size: 10
    outs:
    - path: data/prompts.parquet
      hash: md5
      md5: 22222222222222222222222222222222
      size: 20
  pairs:
    cmd: unifl stage pairs
    deps:
    - path: data/prompts.parquet
      hash: md5
      md5: 22222222222222222222222222222222
    outs:
    - path: data/pairs
      hash: md5
      md5: 33333333333333333333333333333333.dir
      nfiles: 4
"""


def test_dvc_lock_hashes(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(DVC_LOCK)
    assert dvc_lock_hashes(lock) == {
        "data/raw_prompts.csv": "1" * 32,
        "data/prompts.parquet": "2" * 32,
        "data/pairs": "3" * 32 + ".dir",
    }


def test_dvc_file_hashes_are_relative_to_the_repo(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    dvc_file = tmp_path / "data" / "images.dvc"
    dvc_file.write_text("outs:\n- md5: abcd.dir\n  path: images\n")
    hashes = dvc_file_hashes(dvc_file)
    assert hashes == {(tmp_path / "data" / "images").as_posix(): "abcd.dir"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: [1, 2]\n", "no 'stages' mapping"),
        ("stages:\n  a:\n    outs: {path: x}\n", "must be a list"),
        ("stages:\n  a:\n    outs:\n    - md5: 1\n", "entry 0 has no 'path'"),
        ("stages: {a: [\n", "not valid YAML"),
    ],
)
def test_bad_dvc_lock_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(text)
    with pytest.raises(LineageError, match=message) as error:
        dvc_lock_hashes(lock)
    assert str(lock) in str(error.value)
    with pytest.raises(LineageError, match="file not found"):
        dvc_lock_hashes(tmp_path / "missing.lock")


def test_content_digest_follows_content_and_names(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.txt").write_text("beta")
    first = content_digest(folder)
    assert first == content_digest(folder) and len(first) == 64
    (folder / "sub" / "b.txt").write_text("beta!")
    assert content_digest(folder) != first
    (folder / "sub" / "b.txt").write_text("beta")
    (folder / "sub" / "b.txt").rename(folder / "sub" / "c.txt")
    assert content_digest(folder) != first
    with pytest.raises(LineageError, match="no such file"):
        content_digest(tmp_path / "nothing")


def test_git_commit_of_a_repository(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    assert git_commit(tmp_path) is None and git_is_dirty(tmp_path) is None
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "f").write_text("1")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_commit(tmp_path) == head and len(head) == 40
    assert git_is_dirty(tmp_path) is False
    (tmp_path / "f").write_text("2")
    assert git_is_dirty(tmp_path) is True
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc123")
    assert git_commit(tmp_path) == "abc123"


def test_lineage_tags() -> None:
    tags = lineage_tags(
        {"data/pairs": "33.dir"}, label_studio_project_id=7, label_studio_export_id="e-9",
        extra={"prompts_sha256": "ff"},
    )  # fmt: skip
    assert tags == {
        "unifl.lineage.dvc.data/pairs": "33.dir",
        "unifl.lineage.label_studio.project_id": "7",
        "unifl.lineage.label_studio.export_id": "e-9",
        "unifl.lineage.prompts_sha256": "ff",
    }
    assert json.dumps(tags)  # plain strings, ready for MLflow
