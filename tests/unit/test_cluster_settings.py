"""Cluster settings read from ConfigMap/Secret-provided environment variables.

The environment is built from the real manifests: the `unifl-endpoints`
ConfigMap of k8s/base and the keys of the Secret templates in k8s/secrets (with
test values), so a key renamed on one side and not the other fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from unifl.cli import app
from unifl.cluster.settings import (
    CONFIG_MAP_KEYS,
    GROUPS,
    SECRET_KEYS,
    ClusterSettingsError,
    load_cluster_settings,
    secret_env_sources,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET_VALUE = "s3cr3t-value-of-test"


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _cluster_env() -> dict[str, str]:
    (config_map,) = [
        doc
        for doc in _docs(ROOT / "k8s" / "base" / "configmap-endpoints.yaml")
        if doc["kind"] == "ConfigMap"
    ]
    env = dict(config_map["data"])
    for secret in _docs(ROOT / "k8s" / "secrets" / "templates.yaml"):
        for key in secret["stringData"]:
            env[key] = f"{SECRET_VALUE}-{key.lower()}"
    env["UNIFL_NAMESPACE"] = "unifl"
    return env


def test_manifests_provide_every_group() -> None:
    settings = load_cluster_settings(_cluster_env(), needs=GROUPS)
    assert settings.mlflow and settings.mlflow.tracking_uri == "http://mlflow:5000"
    assert settings.s3 and settings.s3.endpoint_url == "http://minio:9000"
    assert settings.s3.secret_access_key.get_secret_value().endswith("aws_secret_access_key")
    assert settings.labeling and settings.labeling.url == "http://label-studio:8080"
    assert settings.labeling.task_images_bucket == settings.s3.task_images_bucket
    training = settings.training
    assert training and training.api == "trainjob" and training.namespace == "unifl"
    assert training.gpu_node_selector == {"unifl.io/node-pool": "gpu"}
    assert training.gpu_toleration_key == "nvidia.com/gpu"


def test_only_requested_groups_are_required() -> None:
    settings = load_cluster_settings({"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert settings.mlflow is not None
    assert settings.s3 is None and settings.labeling is None and settings.training is None


@pytest.mark.parametrize("group", GROUPS)
def test_each_missing_key_is_named_with_its_source(group: str) -> None:
    for key in CONFIG_MAP_KEYS[group]:
        env = _cluster_env()
        del env[key]
        with pytest.raises(ClusterSettingsError) as info:
            load_cluster_settings(env, needs=[group])
        assert info.value.missing_keys == [key]
        assert f"missing key {key} (ConfigMap unifl-endpoints" in str(info.value)
    for env_name, ref in SECRET_KEYS[group].items():
        env = _cluster_env()
        env[env_name] = "  "
        with pytest.raises(ClusterSettingsError) as info:
            load_cluster_settings(env, needs=[group])
        assert info.value.missing_keys == [env_name]
        assert f"missing key {env_name} (Secret {ref.secret}, key {ref.key})" in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    env = _cluster_env()
    del env["MLFLOW_TRACKING_URI"]
    del env["AWS_SECRET_ACCESS_KEY"]
    env["UNIFL_TRAINING_API"] = "mpijob"
    with pytest.raises(ClusterSettingsError) as info:
        load_cluster_settings(env, needs=GROUPS)
    assert info.value.missing_keys == ["MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"]
    assert "key UNIFL_TRAINING_API: expected 'trainjob' or 'pytorchjob', got 'mpijob'" in str(
        info.value
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("MLFLOW_TRACKING_URI", "mlflow:5000", "an http(s) URL"),
        ("AWS_ENDPOINT_URL_S3", "s3://minio", "an http(s) URL"),
        ("UNIFL_TASK_IMAGES_BUCKET", "Label_Studio", "an S3 bucket name"),
        ("UNIFL_CHECKPOINT_PVC", "Checkpoints", "a PersistentVolumeClaim name"),
        ("UNIFL_GPU_NODE_SELECTOR_KEY", "node pool", "a label key"),
        ("UNIFL_GPU_NODE_SELECTOR_VALUE", "a/b", "a label value"),
        ("UNIFL_NAMESPACE", "Unifl", "a namespace name"),
    ],
)
def test_malformed_values_are_named(key: str, value: str, expected: str) -> None:
    env = _cluster_env()
    env[key] = value
    with pytest.raises(ClusterSettingsError, match=re.escape(f"key {key}: expected {expected}")):
        load_cluster_settings(env, needs=GROUPS)


def test_secret_values_never_show() -> None:
    env = _cluster_env()
    settings = load_cluster_settings(env, needs=GROUPS)
    assert SECRET_VALUE not in repr(settings) and SECRET_VALUE not in str(settings)
    env["MLFLOW_TRACKING_URI"] = "not a url"
    with pytest.raises(ClusterSettingsError) as info:
        load_cluster_settings(env, needs=GROUPS)
    assert SECRET_VALUE not in str(info.value)


def test_namespace_falls_back_to_the_service_account_file(tmp_path: Path) -> None:
    env = _cluster_env()
    del env["UNIFL_NAMESPACE"]
    namespace_file = tmp_path / "namespace"
    with pytest.raises(ClusterSettingsError) as info:
        load_cluster_settings(env, needs=["training"], namespace_file=namespace_file)
    assert info.value.missing_keys == ["UNIFL_NAMESPACE"]
    namespace_file.write_text("kubeflow-user-example-com\n", encoding="utf-8")
    settings = load_cluster_settings(env, needs=["training"], namespace_file=namespace_file)
    assert settings.training and settings.training.namespace == "kubeflow-user-example-com"


def test_secret_env_sources_match_the_secret_templates() -> None:
    templates = {
        doc["metadata"]["name"]: set(doc["stringData"])
        for doc in _docs(ROOT / "k8s" / "secrets" / "templates.yaml")
    }
    sources = secret_env_sources()
    assert sources == {
        "unifl-s3-credentials": {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
        "unifl-label-studio-token": {"LABEL_STUDIO_API_KEY": "LABEL_STUDIO_API_KEY"},
    }
    for secret, keys in sources.items():
        assert set(keys) <= templates[secret], secret
    assert secret_env_sources(["mlflow", "training"]) == {}
    with pytest.raises(ValueError, match="unknown settings group"):
        secret_env_sources(["gpu"])


def test_cli_check_reports_settings_or_missing_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _cluster_env().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    result = runner.invoke(app, ["cluster", "check", "--needs", "s3", "--needs", "training"])
    assert result.exit_code == 0, result.output
    assert "training: trainjob with runtime torch-distributed in namespace unifl" in result.output
    assert "credentials set" in result.output and SECRET_VALUE not in result.output
    monkeypatch.delenv("UNIFL_CHECKPOINT_PVC")
    result = runner.invoke(app, ["cluster", "check", "--needs", "training"])
    assert result.exit_code == 2
    assert "missing key UNIFL_CHECKPOINT_PVC" in result.output
