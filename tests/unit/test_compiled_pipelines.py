"""The compiled pipelines: current, valid YAML, GPU placement, retries, caching, secrets, UI.

Also the run parameters' validation (a bad value is named before any compute) and
`unifl submit`'s calls, against a recording stand-in for the Kubeflow Pipelines API server
(no KFP server can run here).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from unifl.config import ConfigError, Params, load_params
from unifl.orchestration.parameters import (
    DATA_SECTIONS,
    check_gpu_placement,
    data_params_yaml,
    params_from_yaml,
    resolve_run_parameters,
)
from unifl.pipelines.compile import COMPILED_DIR, compile_pipelines

REPO = Path(__file__).resolve().parents[2]
PIPELINES = ("unifl-full", "unifl-collect", "unifl-train")
GPU_COMPONENTS = {"generate-pairs", "train-reward", "pefl", "decoupled", "adversarial", "evaluate"}
TRAINING_COMPONENTS = {"train-reward", "pefl", "decoupled", "adversarial"}
CACHED_COMPONENTS = {"bootstrap-toy", "curate-prompts", "validate-data", "generate-pairs"}
FAKE_SECRETS = {
    "LABEL_STUDIO_API_KEY": "lsk-test-3f9a27c1d8e04b55",
    "AWS_ACCESS_KEY_ID": "AKIATESTFAKE00000001",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-test-8d1c5e7f2a9b4c6d",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-test-61b0e4f2",
    "KFP_TOKEN": "kfp-token-test-0c3d9e8a7b",
}


def repo_params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Fresh compiles with fake secrets in the environment (none may leak into the YAML)."""
    out = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_SECRETS.items():
            patch.setenv(key, value)
        paths = compile_pipelines(repo_params(), out)
    return {path.stem: path.read_text(encoding="utf-8") for path in paths}


def documents(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(text)
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def component_of(executor: str) -> str:
    """exec-validate-data-2 -> validate-data."""
    name = executor.removeprefix("exec-")
    parts = name.rsplit("-", 1)
    return parts[0] if len(parts) == 2 and parts[1].isdigit() else name


def all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_committed_pipelines_are_current(compiled: dict[str, str]) -> None:
    for name in PIPELINES:
        committed = COMPILED_DIR / f"{name}.yaml"
        assert committed.is_file(), f"{committed} is missing: run `unifl compile`"
        assert committed.read_text(encoding="utf-8") == compiled[name], (
            f"{committed} is stale (components, graph, params.yaml or image changed): "
            "run `unifl compile`"
        )


def test_compiled_files_are_valid_yaml_with_the_pipeline_names(compiled: dict[str, str]) -> None:
    for name in PIPELINES:
        spec, executors = documents(compiled[name])
        assert spec["pipelineInfo"]["name"] == name
        assert executors, name


def test_gpu_steps_request_gpus_on_the_gpu_pool_and_cpu_steps_do_not(
    compiled: dict[str, str],
) -> None:
    seen_gpu = set()
    for name in PIPELINES:
        spec, platform = documents(compiled[name])
        for executor, deployment in spec["deploymentSpec"]["executors"].items():
            if "container" not in deployment:
                continue  # importers
            component = component_of(executor)
            resources = deployment["container"].get("resources", {})
            placement = platform.get(executor, {})
            if component in GPU_COMPONENTS:
                seen_gpu.add(component)
                accelerator = resources["accelerator"]
                assert "gpu_type" in accelerator["resourceType"], executor
                assert "gpu_count" in accelerator["resourceCount"], executor
                selector = placement["nodeSelector"]["nodeSelectorJson"]
                assert selector["componentInputParameter"].endswith("gpu_node_selector")
                toleration = placement["tolerations"][0]["tolerationJson"]
                assert toleration["componentInputParameter"].endswith("gpu_tolerations")
                shm = placement["emptyDirMounts"]
                assert shm == [
                    {
                        "medium": "Memory",
                        "mountPath": "/dev/shm",
                        "sizeLimit": "16Gi",
                        "volumeName": "dshm",
                    }
                ]
            else:
                assert "accelerator" not in resources, executor
                for key in ("nodeSelector", "tolerations", "emptyDirMounts"):
                    assert key not in placement, f"{executor} is a CPU step but has {key}"
    assert seen_gpu == GPU_COMPONENTS


def test_gpu_pool_defaults_come_from_the_configuration(compiled: dict[str, str]) -> None:
    params = repo_params().pipeline
    spec, _ = documents(compiled["unifl-full"])
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["gpu_node_selector"]["defaultValue"] == {
        params.node_selector_key: params.node_selector_value
    }
    assert inputs["gpu_tolerations"]["defaultValue"] == [
        {"key": params.toleration_key, "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert inputs["gpu_type"]["defaultValue"] == params.gpu_type
    assert inputs["gpu_count"]["defaultValue"] == params.gpu_count


def test_training_steps_retry_and_keep_checkpoints_on_the_volume(compiled: dict[str, str]) -> None:
    params = repo_params().pipeline
    for name in ("unifl-full", "unifl-train"):
        spec, platform = documents(compiled[name])
        for key, task in all_tasks(spec).items():
            component = task["componentRef"]["name"].removeprefix("comp-")
            component = component_of(f"exec-{component}")
            executor = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if component in TRAINING_COMPONENTS:
                assert task["retryPolicy"]["maxRetryCount"] == params.retries, key
                mounts = platform[executor]["pvcMount"]
                assert [(m["constant"], m["mountPath"]) for m in mounts] == [
                    (params.checkpoint_pvc, params.checkpoint_root)
                ]
                assert not task.get("cachingOptions", {}).get("enableCache"), key
            elif executor is not None:
                assert "retryPolicy" not in task, key
                assert "pvcMount" not in platform.get(executor, {}), key
            cached = task.get("cachingOptions", {}).get("enableCache", False)
            if executor is not None and component not in ("importer",):
                assert cached == (component in CACHED_COMPONENTS | {"label-preferences"}), key


def test_every_task_has_a_display_name(compiled: dict[str, str]) -> None:
    for name in PIPELINES:
        spec, _ = documents(compiled[name])
        for key, task in all_tasks(spec).items():
            shown = task["taskInfo"]["name"]
            # Display names are written for people: capitalised words, not the task key.
            assert shown != key and shown[0].isupper(), (name, key, shown)


def test_ui_parameters_have_descriptions(compiled: dict[str, str]) -> None:
    expected = {
        "unifl-full": {"base_model", "prompt_source", "label_studio_project", "pefl_steps",
                       "pefl_learning_rate", "reward_epochs", "gpu_type", "gpu_count",
                       "gpu_node_selector", "gpu_tolerations", "mlflow_experiment",
                       "registered_model", "labels_export", "params_yaml"},
        "unifl-collect": {"base_model", "prompt_source", "label_studio_url", "dvc_remote"},
        "unifl-train": {"pairs_uri", "prompts_uri", "adversarial_steps", "promotion_target"},
    }  # fmt: skip
    for name in PIPELINES:
        spec, _ = documents(compiled[name])
        inputs = spec["root"]["inputDefinitions"]["parameters"]
        assert expected[name] <= set(inputs), name
        for parameter, definition in inputs.items():
            assert len(definition.get("description", "")) > 20, (name, parameter)
    collect_inputs = documents(compiled["unifl-collect"])[0]["root"]["inputDefinitions"]
    assert "pefl_steps" not in collect_inputs["parameters"]


def test_no_secret_reaches_the_yaml_and_secrets_come_from_kubernetes(
    compiled: dict[str, str],
) -> None:
    for name, text in compiled.items():
        for key, value in FAKE_SECRETS.items():
            assert value not in text, f"{key} leaked into {name}"
    _, platform = documents(compiled["unifl-collect"])
    push = platform["exec-push-to-label-studio"]["secretAsEnv"]
    token = [s for s in push if s["secretName"] == "unifl-label-studio-token"]
    assert token and token[0]["keyToEnv"] == [
        {"envVar": "LABEL_STUDIO_API_KEY", "secretKey": "LABEL_STUDIO_API_KEY"}
    ]
    assert not token[0].get("optional")
    _, train_platform = documents(compiled["unifl-train"])
    names = {s["secretName"] for s in train_platform["exec-pull-labels"]["secretAsEnv"]}
    assert "unifl-label-studio-token" in names
    # CPU data steps get no Label Studio token.
    assert "secretAsEnv" not in train_platform["exec-bootstrap-toy"]
    # The push uploads the pair images (labeling.storage s3) and the pull may push the labels
    # to an s3:// DVC remote: both get the S3 keys, optional as for the other data steps.
    s3_keys = [
        {"envVar": "AWS_ACCESS_KEY_ID", "secretKey": "AWS_ACCESS_KEY_ID"},
        {"envVar": "AWS_SECRET_ACCESS_KEY", "secretKey": "AWS_SECRET_ACCESS_KEY"},
    ]
    for executor in (platform["exec-push-to-label-studio"], train_platform["exec-pull-labels"]):
        (s3,) = [s for s in executor["secretAsEnv"] if s["secretName"] == "unifl-s3-credentials"]
        assert s3["optional"] is True
        assert sorted(s3["keyToEnv"], key=lambda pair: pair["envVar"]) == s3_keys


def test_url_credentials_of_the_configuration_never_reach_the_yaml(tmp_path: Path) -> None:
    secret = "S3cret-compile-7731"
    params = load_params(
        REPO / "params.yaml",
        overrides=[
            f"tracking.tracking_uri=https://alice:{secret}@mlflow.example.com",
            f"pipeline.dvc_remote=https://bob:{secret}@dvc.example.com/store",
            f"labeling.url=https://carol:{secret}@labels.example.com",
        ],
    )
    for path in compile_pipelines(params, tmp_path):
        text = path.read_text(encoding="utf-8")
        assert secret not in text, path.name
        spec, _ = documents(text)
        parameters = spec["root"]["inputDefinitions"]["parameters"]
        baked = params_from_yaml(parameters["params_yaml"]["defaultValue"])
        assert baked.tracking.tracking_uri == "https://alice:***@mlflow.example.com"
        assert baked.labeling.url == "https://carol:***@labels.example.com"
        assert (
            "https://alice:***@mlflow.example.com"
            in parameters["mlflow_tracking_uri"]["description"]
        )
        if "dvc_remote" in parameters:
            assert parameters["dvc_remote"]["defaultValue"] == (
                "https://bob:***@dvc.example.com/store"
            )


def test_every_secret_the_pipelines_mount_has_a_template(compiled: dict[str, str]) -> None:
    templates = {
        doc["metadata"]["name"]: set(doc["stringData"])
        for doc in yaml.safe_load_all(
            (REPO / "k8s" / "secrets" / "templates.yaml").read_text(encoding="utf-8")
        )
        if doc
    }
    mounted: dict[str, set[str]] = {}
    for text in compiled.values():
        _, platform = documents(text)
        for executor in platform.values():
            for source in executor.get("secretAsEnv", []):
                keys = {pair["secretKey"] for pair in source["keyToEnv"]}
                mounted.setdefault(source["secretName"], set()).update(keys)
    assert "unifl-mlflow-credentials" in mounted
    for name, keys in mounted.items():
        assert name in templates, f"{name} is mounted but has no template"
        assert keys <= templates[name], f"{name}: keys {keys - templates[name]} missing"


def test_image_is_set_at_compile_time(tmp_path: Path) -> None:
    (path,) = compile_pipelines(
        repo_params(), tmp_path, image="registry.example/unifl:9.9.1", names=["collect"]
    )
    spec, _ = documents(path.read_text(encoding="utf-8"))
    images = {
        component_of(name): executor["container"]["image"]
        for name, executor in spec["deploymentSpec"]["executors"].items()
    }
    assert images["curate-prompts"] == "registry.example/unifl:9.9.1"
    assert images["generate-pairs"] == "registry.example/unifl:9.9.1-cuda"
    # Lightweight components run on the image's own unifl and kfp: nothing pip-installed.
    commands = json.dumps(spec["deploymentSpec"]["executors"])
    assert "pip install" not in commands


# ---------------------------------------------------------------------------- run parameters


def test_bad_run_parameters_are_named() -> None:
    base = repo_params()
    text = yaml.safe_dump(base.model_dump(mode="json"))
    with pytest.raises(ConfigError, match=r"'pefl_steps' \(pefl\.steps\).*-3"):
        resolve_run_parameters(text, [], {"pefl_steps": -3})
    with pytest.raises(ConfigError, match=r"'gpu_count' \(pipeline\.gpu_count\)"):
        resolve_run_parameters(text, [], {"gpu_count": "two"})
    with pytest.raises(ConfigError, match=r"'base_model'.*must not be empty"):
        resolve_run_parameters(text, [], {"base_model": " "})
    with pytest.raises(ConfigError, match=r"'overrides'.*unknown key 'pefl.nope'"):
        resolve_run_parameters(text, ["pefl.nope=1"], {})
    with pytest.raises(ConfigError, match=r"params_yaml.*not valid YAML"):
        params_from_yaml("pefl: [unclosed")
    with pytest.raises(ConfigError, match=r"unknown pipeline parameters \['pefl_step'\]"):
        resolve_run_parameters(text, [], {"pefl_step": 3})


def test_run_parameters_set_their_keys_and_empty_ones_keep_the_configuration() -> None:
    text = yaml.safe_dump(repo_params().model_dump(mode="json"))
    params = resolve_run_parameters(
        text,
        ["decoupled.steps=7"],
        {"pefl_steps": 5, "pefl_learning_rate": 3e-5, "mlflow_tracking_uri": "", "dvc_remote": ""},
        environ={},
    )
    assert (params.pefl.steps, params.pefl.learning_rate, params.decoupled.steps) == (5, 3e-5, 7)
    assert params.tracking.tracking_uri == repo_params().tracking.tracking_uri
    cluster_env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "LABEL_STUDIO_URL": "http://ls:8080",
    }
    on_cluster = resolve_run_parameters(
        text, [], {"mlflow_tracking_uri": "", "label_studio_url": ""}, environ=cluster_env
    )
    assert on_cluster.tracking.tracking_uri == "http://mlflow:5000"  # replaces the SQLite file
    assert on_cluster.labeling.url is None  # full: simulated annotators unless asked
    configured = resolve_run_parameters(
        text,
        ["tracking.tracking_uri=http://tracking.example:5000"],
        {"mlflow_tracking_uri": ""},
        environ=cluster_env,
    )
    assert configured.tracking.tracking_uri == "http://tracking.example:5000"
    collecting = resolve_run_parameters(
        text, [], {"label_studio_url": ""}, environ=cluster_env, label_studio_from_env=True
    )
    assert collecting.labeling.url == "http://ls:8080"


def test_gpu_placement_is_checked_by_entry() -> None:
    check_gpu_placement({"unifl.io/node-pool": "gpu"}, [{"key": "nvidia.com/gpu"}])
    with pytest.raises(ConfigError, match=r"gpu_node_selector.*'bad key!' is no label key"):
        check_gpu_placement({"bad key!": "gpu"}, [])
    with pytest.raises(ConfigError, match=r"gpu_node_selector.*value 'a b'"):
        check_gpu_placement({"pool": "a b"}, [])
    with pytest.raises(
        ConfigError, match=r"gpu_tolerations.*entry 1 has unknown fields \['efect'\]"
    ):
        check_gpu_placement({}, [{"key": "a"}, {"key": "b", "efect": "NoSchedule"}])
    with pytest.raises(ConfigError, match=r"gpu_tolerations.*entry 0.*unknown effect 'Never'"):
        check_gpu_placement({}, [{"key": "a", "effect": "Never"}])


def test_data_steps_see_only_data_sections() -> None:
    params = repo_params()
    changed = params.model_copy(deep=True)
    changed.pefl.steps += 1
    changed.tracking.experiment = "other"
    assert data_params_yaml(params) == data_params_yaml(changed)
    assert set(yaml.safe_load(data_params_yaml(params))) == set(DATA_SECTIONS)
    changed.curate.num_prompts += 1
    assert data_params_yaml(params) != data_params_yaml(changed)


# ---------------------------------------------------------------------------- submit


class RecordingKfpClient:
    """Stands in for `kfp.Client` (no Kubeflow Pipelines server can run here): records the
    calls `submit_pipeline` makes and answers like the KFP v2beta1 API objects."""

    def __init__(self, existing_pipeline: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.existing = existing_pipeline
        self.packages: list[dict[str, Any]] = []

    def _record(self, call: str, **kwargs: Any) -> None:
        self.calls.append((call, kwargs))

    def get_pipeline_id(self, name: str) -> str | None:
        self._record("get_pipeline_id", name=name)
        return self.existing

    def upload_pipeline(self, path: str, pipeline_name: str) -> Any:
        self._record("upload_pipeline", pipeline_name=pipeline_name)
        self.packages.append(next(yaml.safe_load_all(Path(path).read_text())))
        return SimpleNamespace(pipeline_id="p-1")

    def list_pipeline_versions(self, pipeline_id: str) -> Any:
        self._record("list_pipeline_versions", pipeline_id=pipeline_id)
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id="v-1")])

    def upload_pipeline_version(
        self, path: str, pipeline_version_name: str, pipeline_id: str
    ) -> Any:
        self._record("upload_pipeline_version", name=pipeline_version_name, pipeline_id=pipeline_id)
        self.packages.append(next(yaml.safe_load_all(Path(path).read_text())))
        return SimpleNamespace(pipeline_version_id="v-2")

    def create_experiment(self, name: str, namespace: str | None = None) -> Any:
        self._record("create_experiment", name=name, namespace=namespace)
        return SimpleNamespace(experiment_id="e-1")

    def run_pipeline(self, **kwargs: Any) -> Any:
        self._record("run_pipeline", **kwargs)
        return SimpleNamespace(run_id="r-1")


def test_submit_uploads_a_pipeline_then_versions_and_starts_runs() -> None:
    from unifl.orchestration.submit import parse_arguments, submit_pipeline

    params = repo_params()
    params.pipeline.image = "registry.example/unifl:0.1.0"
    first = RecordingKfpClient()
    run = submit_pipeline(
        params,
        "http://kfp.example",
        "train",
        experiment="uniflx",
        arguments=parse_arguments(["pefl_steps=500", "pairs_uri=s3://b/pairs", "gpu_count=2"]),
        client=first,
    )
    assert [name for name, _ in first.calls] == [
        "get_pipeline_id",
        "upload_pipeline",
        "list_pipeline_versions",
        "create_experiment",
        "run_pipeline",
    ]
    assert first.calls[1][1] == {"pipeline_name": "unifl-train"}
    started = first.calls[-1][1]
    assert started["experiment_id"] == "e-1" and started["pipeline_id"] == "p-1"
    assert started["version_id"] == "v-1"
    assert started["service_account"] == "unifl-pipeline"
    assert started["params"] == {"pefl_steps": 500, "pairs_uri": "s3://b/pairs", "gpu_count": 2}
    assert first.packages[0]["pipelineInfo"]["name"] == "unifl-train"
    assert run.url == "http://kfp.example/#/runs/details/r-1"

    again = RecordingKfpClient(existing_pipeline="p-1")
    submit_pipeline(params, "http://kfp.example", "train", client=again, service_account="")
    names = [name for name, _ in again.calls]
    assert "upload_pipeline" not in names and "upload_pipeline_version" in names
    assert again.calls[-1][1]["version_id"] == "v-2"
    assert again.calls[-1][1]["service_account"] is None  # the namespace's default
    with pytest.raises(ConfigError, match="run parameter 'pefl_steps': expected name=value"):
        parse_arguments(["pefl_steps"])

    # A URL with credentials given as a run parameter is sent without them.
    third = RecordingKfpClient(existing_pipeline="p-1")
    uri = "mlflow_tracking_uri=https://alice:S3cret-run-2210@mlflow.example.com"
    submit_pipeline(
        params, "http://kfp.example", "train", arguments=parse_arguments([uri]), client=third
    )
    assert third.calls[-1][1]["params"] == {
        "mlflow_tracking_uri": "https://alice:***@mlflow.example.com"
    }
