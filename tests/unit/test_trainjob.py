"""Multi-node training jobs: the manifests and the create / wait / fail / cancel logic.

There is no Kubernetes API server here. The manifests are checked against the
CRD schemas kept in k8s/crds/ (made strict: unknown fields are errors) and
their pod parts against the official core/v1 schema (kubernetes-validate).
The launcher runs against `ReplayCustomObjectsApi`, a stand-in for
`kubernetes.client.CustomObjectsApi` that answers with the sequences of API
responses in tests/fixtures/k8s/: full objects in the shape the API server
returns for these CRDs (and its Status bodies for errors), written from the
CRDs' status types since no cluster is available to record them. Errors are
raised as the real `kubernetes.client.exceptions.ApiException`.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from unifl.cluster.launcher import (
    JobStatus,
    Phase,
    TrainingJobCancelled,
    TrainingJobError,
    TrainingJobTimeout,
    job_phase,
    launch_training_stage,
    run_training_job,
)
from unifl.cluster.settings import SecretKeyRef, TrainingSettings
from unifl.cluster.trainjob import (
    CHECKPOINT_ENV,
    TRAINING_POD_LABEL,
    ConfigMapKeyRef,
    build_pytorchjob,
    build_trainjob,
    checkpoint_volume,
    distributed_stage_command,
    gpu_placement,
    make_job_name,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "k8s" / "crds"
FIXTURES = ROOT / "tests" / "fixtures" / "k8s"
K8S_VERSION = "1.33"


# ---------------------------------------------------------------- schemas


def _strict(schema: Any) -> Any:
    """The CRD schema as a strict JSON schema: objects with properties admit no other keys
    (the API server would prune them silently; for us they are a builder bug)."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _crd_validator(file_name: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / file_name).read_text(encoding="utf-8"))
    (version,) = crd["spec"]["versions"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


TRAINJOB_SCHEMA = _crd_validator("trainer.kubeflow.org_trainjobs.yaml")
PYTORCHJOB_SCHEMA = _crd_validator("kubeflow.org_pytorchjobs.yaml")


def _schema_errors(validator: jsonschema.Draft7Validator, obj: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in validator.iter_errors(obj)
    ]


def _check_name_rules(job: dict[str, Any]) -> None:
    """The CEL rules of the TrainJob CRD on metadata.name (not evaluated by jsonschema)."""
    import re

    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def _validate_core(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{obj['kind']} invalid at {path}: {exc.message[:300]}") from None


def _trainjob_as_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The pod a TrainJob node would run: trainer fields + the runtime patch, as core/v1."""
    trainer = job["spec"]["trainer"]
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    template = replicated["template"]["spec"]["template"]
    pod_spec = copy.deepcopy(template["spec"])
    (container_patch,) = pod_spec.pop("containers")
    container = {
        "name": container_patch["name"],
        "image": trainer["image"],
        "command": trainer["command"],
        "args": trainer["args"],
        "env": trainer["env"],
        "volumeMounts": container_patch["volumeMounts"],
    }
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "node-0", "labels": template["metadata"]["labels"]},
        "spec": {**pod_spec, "containers": [container]},
    }


# ---------------------------------------------------------------- builders

PLACEMENT = gpu_placement("unifl.io/node-pool", "gpu", "nvidia.com/gpu")
CHECKPOINTS = checkpoint_volume("unifl-checkpoints")
SECRETS = {
    "AWS_ACCESS_KEY_ID": SecretKeyRef("unifl-s3-credentials", "AWS_ACCESS_KEY_ID"),
    "AWS_SECRET_ACCESS_KEY": SecretKeyRef("unifl-s3-credentials", "AWS_SECRET_ACCESS_KEY"),
}


def _job_args(**overrides: Any) -> dict[str, Any]:
    node_selector, tolerations = PLACEMENT
    volume, mount = CHECKPOINTS
    args: dict[str, Any] = {
        "name": make_job_name("pefl", "run-42"),
        "namespace": "unifl",
        "image": "registry.local/unifl:0.1.0-cuda",
        "command": distributed_stage_command("pefl"),
        "args": ["--params", "/work/params.yaml", "--set", "pefl.steps=400"],
        "num_nodes": 4,
        "gpus_per_node": 8,
        "node_selector": node_selector,
        "tolerations": tolerations,
        "volumes": [volume],
        "volume_mounts": [mount],
        "env_from_secrets": SECRETS,
        "checkpoint_dir": "/checkpoints/run-42/pefl",
        "env": {"MLFLOW_RUN_ID": "f00d"},
        "env_from_config_maps": {
            "MLFLOW_TRACKING_URI": ConfigMapKeyRef("unifl-endpoints", "MLFLOW_TRACKING_URI")
        },
        "cpu": "32",
        "memory": "256Gi",
    }
    args.update(overrides)
    return args


def test_trainjob_validates_against_crd_and_core_schemas() -> None:
    job = build_trainjob(**_job_args())
    assert _schema_errors(TRAINJOB_SCHEMA, job) == []
    _check_name_rules(job)
    _validate_core(_trainjob_as_pod(job))

    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {
        "nvidia.com/gpu": 8,
        "cpu": "32",
        "memory": "256Gi",
    }
    assert trainer["command"] == ["torchrun", "--module", "unifl.cli", "stage", "pefl"]
    env = {item["name"]: item for item in trainer["env"]}
    assert env[CHECKPOINT_ENV]["value"] == "/checkpoints/run-42/pefl"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "unifl-s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    pod = _trainjob_as_pod(job)
    assert pod["metadata"]["labels"][TRAINING_POD_LABEL] == "true"
    assert pod["spec"]["nodeSelector"] == {"unifl.io/node-pool": "gpu"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/checkpoints": "checkpoints", "/dev/shm": "dshm"}
    assert job["metadata"]["annotations"]["unifl.io/checkpoint-dir"] == "/checkpoints/run-42/pefl"


def test_crd_schema_rejects_what_the_operator_would_not_accept() -> None:
    """The strict schema is a real check: typos, wrong types and bad enums fail it."""
    job = build_trainjob(**_job_args())
    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in err for err in _schema_errors(TRAINJOB_SCHEMA, typo))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["trainer"]["numNodes"] = "4"
    assert _schema_errors(TRAINJOB_SCHEMA, wrong_type)
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["runtimeRef"]["kind"] = "Runtime"
    assert _schema_errors(TRAINJOB_SCHEMA, bad_enum)
    pytorch = build_pytorchjob(**_job_args())
    pytorch["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"
    assert _schema_errors(PYTORCHJOB_SCHEMA, pytorch)


def test_pytorchjob_validates_and_places_pods_like_the_trainjob() -> None:
    job = build_pytorchjob(**_job_args())
    assert _schema_errors(PYTORCHJOB_SCHEMA, job) == []
    _check_name_rules(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3}
    for replica_type, replica in replicas.items():
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": replica_type.lower()},
            "template": replica["template"],
        }
        _validate_core(template)
        assert replica["template"]["spec"]["containers"][0]["name"] == "pytorch"

    trainjob_pod = _trainjob_as_pod(build_trainjob(**_job_args()))["spec"]
    pytorch_pod = replicas["Worker"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "volumes", "securityContext"):
        assert pytorch_pod[key] == trainjob_pod[key], key
    trainjob_container = trainjob_pod["containers"][0]
    pytorch_container = pytorch_pod["containers"][0]
    for key in ("image", "command", "args", "env", "resources", "volumeMounts"):
        assert pytorch_container[key] == trainjob_container[key], key


def test_single_node_cpu_job_has_no_worker_and_no_gpu() -> None:
    job = build_pytorchjob(**_job_args(num_nodes=1, gpus_per_node=0, cpu=None, memory=None))
    assert _schema_errors(PYTORCHJOB_SCHEMA, job) == []
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "resources" not in container
    trainjob = build_trainjob(**_job_args(num_nodes=1, gpus_per_node=0, cpu=None, memory=None))
    assert _schema_errors(TRAINJOB_SCHEMA, trainjob) == []
    assert "resourcesPerNode" not in trainjob["spec"]["trainer"]
    assert trainjob["spec"]["trainer"]["numProcPerNode"] == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"name": "Pefl_Run"}, "RFC 1035"),
        ({"name": "x" * 64}, "RFC 1035"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"checkpoint_dir": "checkpoints/run"}, "absolute path"),
        ({"checkpoint_dir": ""}, "checkpoint_dir"),
        ({"command": []}, "command"),
        ({"command": "torchrun -m unifl.cli"}, "list of strings"),
        ({"env": {"AWS_ACCESS_KEY_ID": "inline"}}, "duplicate environment variable"),
        ({"volume_mounts": [{"name": "data", "mountPath": "/data"}]}, "refers to no volume"),
        ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, "duplicate volume 'dshm'"),
        ({"node_selector": {"bad key!": "gpu"}}, "node_selector"),
        ({"tolerations": [{"key": "nvidia.com/gpu", "operator": "In"}]}, "operator"),
        ({"image": ""}, "image"),
    ],
)
def test_builders_reject_bad_input_naming_the_field(override: dict[str, Any], message: str) -> None:
    for builder in (build_trainjob, build_pytorchjob):
        with pytest.raises(ValueError, match=message):
            builder(**_job_args(**override))


def test_make_job_name_is_valid_short_and_distinct() -> None:
    long_run = "Run_2026-11-20T09:14:03 " + "x" * 80
    a = make_job_name("decoupled", long_run)
    b = make_job_name("decoupled", long_run + "y")
    for name in (a, b, make_job_name("42", "run")):
        assert len(name) <= 40
        _check_name_rules({"metadata": {"name": name}})
    assert a != b
    assert make_job_name("pefl", "run-42") == make_job_name("pefl", "run-42")
    with pytest.raises(ValueError):
        make_job_name("   ")


# ---------------------------------------------------------------- launcher


class ReplayCustomObjectsApi:
    """Stands in for kubernetes.client.CustomObjectsApi (no API server here): answers
    each method with the next recorded response, repeating the last one when exhausted."""

    def __init__(self, fixture: dict[str, Any], on_get: Any = None) -> None:
        self.responses = {
            "create": list(fixture.get("create", [])),
            "get": list(fixture.get("get", [])),
            "delete": list(fixture.get("delete", [])),
        }
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.on_get = on_get

    def _answer(self, method: str) -> Any:
        queue = self.responses[method]
        if not queue:
            raise AssertionError(f"unexpected {method} call: no recorded response left")
        response = queue.pop(0) if len(queue) > 1 else queue[0]
        if "error" in response:
            error = response["error"]
            exc = ApiException(status=error["status"], reason=error["reason"])
            exc.body = json.dumps(error["body"])
            raise exc
        return copy.deepcopy(response["body"])

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        self.calls.append(("create", {"group": group, "version": version, "plural": plural}))
        assert body["metadata"]["namespace"] == namespace
        return self._answer("create")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self.calls.append(("get", {"name": name, "plural": plural}))
        if self.count("get") > 500:
            raise AssertionError("runaway polling: the launcher never stopped waiting")
        if self.on_get is not None:
            self.on_get(len([c for c in self.calls if c[0] == "get"]))
        return self._answer("get")

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self.calls.append(("delete", {"name": name, **kw}))
        return self._answer("delete")

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call[0] == method)


class ReplayCoreV1Api:
    """Stands in for kubernetes.client.CoreV1Api.list_namespaced_pod (recorded pod list)."""

    def __init__(self, pods: dict[str, Any]) -> None:
        self.pods = pods
        self.selectors: list[str] = []

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **kw: Any) -> Any:
        self.selectors.append(label_selector)
        return copy.deepcopy(self.pods)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def _job_for(fixture: dict[str, Any]) -> dict[str, Any]:
    info = fixture["job"]
    builder = build_trainjob if info["kind"] == "TrainJob" else build_pytorchjob
    return builder(**_job_args(name=info["name"], checkpoint_dir=info["checkpoint_dir"]))


def _run(fixture: dict[str, Any], api: Any, **kwargs: Any) -> tuple[Any, list[JobStatus]]:
    statuses: list[JobStatus] = []
    clock = FakeClock()
    kwargs.setdefault("poll_s", 10.0)
    result = run_training_job(
        api,
        _job_for(fixture),
        on_status=statuses.append,
        clock=clock,
        sleep=clock.sleep,
        **kwargs,
    )
    return result, statuses


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in FIXTURES.glob("*job_*.json")),
)
def test_recorded_objects_conform_to_the_crd_schemas(name: str) -> None:
    """The fixtures are in the CRDs' shape (spec and status), so the launcher is tested
    against what the operators write."""
    fixture = _fixture(name)
    validator = TRAINJOB_SCHEMA if fixture["job"]["kind"] == "TrainJob" else PYTORCHJOB_SCHEMA
    bodies = [r["body"] for key in ("create", "get") for r in fixture[key] if "body" in r]
    assert bodies
    for body in bodies:
        assert _schema_errors(validator, body) == []


def test_successful_trainjob_streams_status_and_returns_checkpoint_dir() -> None:
    fixture = _fixture("trainjob_succeeds.json")
    api = ReplayCustomObjectsApi(fixture)
    result, statuses = _run(fixture, api, start_timeout_s=600)
    assert result.checkpoint_dir == fixture["job"]["checkpoint_dir"]
    assert result.kind == "TrainJob" and not result.adopted
    assert [s.phase for s in statuses] == [Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED]
    assert statuses[-1].reason == "JobsCompleted"
    assert statuses[1].elapsed_s == 30.0  # third poll, 10 s apart
    assert result.duration_s == 50.0
    assert api.count("create") == 1 and api.count("get") == 6 and api.count("delete") == 0
    assert api.calls[0][1] == {
        "group": "trainer.kubeflow.org",
        "version": "v1alpha1",
        "plural": "trainjobs",
    }


def test_failed_trainjob_raises_with_the_jobs_reason_and_keeps_it() -> None:
    fixture = _fixture("trainjob_fails.json")
    api = ReplayCustomObjectsApi(fixture)
    with pytest.raises(TrainingJobError) as info:
        _run(fixture, api)
    assert not isinstance(info.value, TrainingJobTimeout)
    assert info.value.reason == "FailedJobs"
    message = str(info.value)
    assert "jobset failed due to one or more job failures" in message
    assert fixture["job"]["name"] in message and "kubectl -n unifl describe" in message
    assert api.count("delete") == 0  # kept for inspection


def test_job_that_never_starts_times_out_with_the_scheduling_reason_and_is_deleted() -> None:
    fixture = _fixture("trainjob_never_starts.json")
    api = ReplayCustomObjectsApi(fixture)
    core = ReplayCoreV1Api(fixture["pods"])
    with pytest.raises(TrainingJobTimeout) as info:
        _run(fixture, api, start_timeout_s=600, poll_s=30, core_api=core)
    message = str(info.value)
    assert "did not start within 600 s" in message
    assert "Insufficient nvidia.com/gpu" in message
    assert f"pod {fixture['job']['name']}-node-0-0-x0k9z: Unschedulable" in message
    assert info.value.reason == "StartTimeout"
    assert core.selectors == [f"unifl.io/job-name={fixture['job']['name']}"]
    assert api.count("get") == 21  # t = 0, 30, ..., 600
    assert api.calls[-1] == (
        "delete",
        {"name": fixture["job"]["name"], "propagation_policy": "Background"},
    )


def test_start_timeout_is_configurable() -> None:
    fixture = _fixture("trainjob_never_starts.json")
    api = ReplayCustomObjectsApi(fixture)
    with pytest.raises(TrainingJobTimeout, match="within 60 s"):
        _run(fixture, api, start_timeout_s=60, poll_s=10)
    assert api.count("get") == 7


def test_running_job_is_not_subject_to_the_start_timeout() -> None:
    """Once a pod runs, only the optional overall timeout applies."""
    fixture = _fixture("trainjob_succeeds.json")
    api = ReplayCustomObjectsApi(fixture)
    result, _ = _run(fixture, api, start_timeout_s=35, poll_s=10)
    assert result.duration_s == 50.0
    api = ReplayCustomObjectsApi(fixture)
    with pytest.raises(TrainingJobTimeout, match="did not finish within 40 s"):
        _run(fixture, api, start_timeout_s=35, timeout_s=40, poll_s=10)
    assert api.count("delete") == 1


def test_transient_api_errors_are_tolerated_but_not_forever() -> None:
    fixture = _fixture("trainjob_transient_errors.json")
    result, statuses = _run(fixture, ReplayCustomObjectsApi(fixture))
    assert result.checkpoint_dir == fixture["job"]["checkpoint_dir"]
    assert [s.phase for s in statuses] == [Phase.RUNNING, Phase.SUCCEEDED]

    outage = copy.deepcopy(fixture)
    outage["get"] = outage["get"][:2]  # the 503 repeats
    api = ReplayCustomObjectsApi(outage)
    with pytest.raises(TrainingJobError, match="lost contact with the API server"):
        _run(outage, api, max_api_errors=4)
    assert api.count("get") == 5


def test_create_errors_explain_what_to_install_or_grant() -> None:
    fixture = _fixture("create_errors.json")
    for case, expected in (
        ("no_crd", "UNIFL_TRAINING_API=pytorchjob"),
        ("forbidden", "service account unifl-pipeline"),
    ):
        api = ReplayCustomObjectsApi({"create": [fixture[case]]})
        with pytest.raises(TrainingJobError) as info:
            _run(fixture, api)
        assert expected in str(info.value)
        assert fixture[case]["error"]["body"]["message"] in str(info.value)
        assert api.count("get") == 0


def test_retried_task_adopts_its_running_job() -> None:
    fixture = _fixture("trainjob_conflict_running.json")
    api = ReplayCustomObjectsApi(fixture)
    result, statuses = _run(fixture, api)
    assert result.adopted
    assert api.count("create") == 1 and api.count("delete") == 0
    assert statuses[-1].phase is Phase.SUCCEEDED


def test_retried_task_replaces_its_failed_job() -> None:
    fixture = _fixture("trainjob_conflict_failed.json")
    api = ReplayCustomObjectsApi(fixture)
    result, statuses = _run(fixture, api)
    assert not result.adopted
    methods = [method for method, _ in api.calls]
    assert methods == ["create", "get", "delete", "get", "get", "create", "get", "get"]
    assert api.calls[2][1]["propagation_policy"] == "Foreground"
    assert [s.phase for s in statuses] == [Phase.RUNNING, Phase.SUCCEEDED]


def test_conflict_with_a_foreign_job_is_an_error() -> None:
    fixture = _fixture("trainjob_conflict_running.json")
    job = _job_for(fixture)
    job["metadata"]["annotations"]["unifl.io/checkpoint-dir"] = "/checkpoints/other-run/pefl"
    clock = FakeClock()
    with pytest.raises(TrainingJobError, match="another job with this name exists"):
        run_training_job(ReplayCustomObjectsApi(fixture), job, clock=clock, sleep=clock.sleep)


def test_sigterm_deletes_the_job_and_restores_the_handler() -> None:
    fixture = _fixture("trainjob_succeeds.json")
    fixture["delete"] = [{"body": {"kind": "Status", "status": "Success"}}]
    api = ReplayCustomObjectsApi(
        fixture, on_get=lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None
    )
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingJobCancelled, match="cancelled by SIGTERM"):
        _run(fixture, api)
    assert api.calls[-1] == (
        "delete",
        {"name": fixture["job"]["name"], "propagation_policy": "Background"},
    )
    assert api.count("get") == 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_keyboard_interrupt_deletes_the_job_and_propagates() -> None:
    fixture = _fixture("pytorchjob_succeeds.json")
    fixture["delete"] = [
        {"error": {"status": 404, "reason": "Not Found", "body": {"message": "gone"}}}
    ]

    def interrupt(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt

    api = ReplayCustomObjectsApi(fixture, on_get=interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(fixture, api)
    assert api.count("delete") == 1  # attempted; its failure does not mask the interrupt


def test_pytorchjob_success_and_failure() -> None:
    fixture = _fixture("pytorchjob_succeeds.json")
    api = ReplayCustomObjectsApi(fixture)
    result, statuses = _run(fixture, api)
    assert result.kind == "PyTorchJob"
    assert [s.phase for s in statuses] == [Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED]
    assert statuses[1].reason == "PyTorchJobRunning"
    assert api.calls[0][1]["plural"] == "pytorchjobs"

    fixture = _fixture("pytorchjob_fails.json")
    with pytest.raises(TrainingJobError) as info:
        _run(fixture, ReplayCustomObjectsApi(fixture))
    assert info.value.reason == "PyTorchJobFailed"
    assert "1 Worker replica(s) failed" in str(info.value)


def test_job_phase_reads_both_kinds() -> None:
    assert job_phase({"kind": "TrainJob"}) == (Phase.PENDING, "", "")
    suspended = {
        "kind": "TrainJob",
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended"}]},
    }
    assert job_phase(suspended)[0] is Phase.SUSPENDED
    not_failed = {
        "kind": "PyTorchJob",
        "status": {"conditions": [{"type": "Failed", "status": "False"}]},
    }
    assert job_phase(not_failed)[0] is Phase.PENDING
    with pytest.raises(ValueError, match="kind"):
        job_phase({"kind": "Job"})


def test_launch_training_stage_builds_the_configured_kind() -> None:
    settings = TrainingSettings(
        namespace="unifl",
        api="pytorchjob",
        runtime="torch-distributed",
        checkpoint_pvc="unifl-checkpoints",
        gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        gpu_toleration_key="nvidia.com/gpu",
    )
    fixture = _fixture("pytorchjob_succeeds.json")
    created: list[dict[str, Any]] = []
    api = ReplayCustomObjectsApi(fixture)
    original_create = api.create_namespaced_custom_object

    def create(group, version, namespace, plural, body, **kw):
        created.append(body)
        return original_create(group, version, namespace, plural, body, **kw)

    api.create_namespaced_custom_object = create  # type: ignore[method-assign]
    result = launch_training_stage(
        "pefl",
        ["--params", "/work/params.yaml"],
        run_id="run 7/Nov",
        image="registry.local/unifl:0.1.0-cuda",
        settings=settings,
        num_nodes=2,
        gpus_per_node=4,
        poll_s=0.001,
        api=api,
    )
    (job,) = created
    assert job["kind"] == "PyTorchJob"
    assert _schema_errors(PYTORCHJOB_SCHEMA, job) == []
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert result.checkpoint_dir == "/checkpoints/run-7-Nov/pefl"
    assert pod["containers"][0]["command"][:3] == ["torchrun", "--module", "unifl.cli"]


def test_cluster_section_of_params_drives_the_launcher() -> None:
    import inspect

    from unifl.config import ConfigError, load_params

    params = load_params(ROOT / "params.yaml")
    defaults = inspect.signature(run_training_job).parameters
    assert params.cluster.start_timeout_s == defaults["start_timeout_s"].default
    assert params.cluster.poll_s == defaults["poll_s"].default
    assert params.cluster.num_nodes == 1  # one node trains in the pipeline pod
    with pytest.raises(ConfigError, match="cluster.num_nodes"):
        load_params(ROOT / "params.yaml", overrides=["cluster.num_nodes=0"])
