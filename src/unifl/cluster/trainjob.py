"""Manifests of multi-node training jobs: Kubeflow Trainer v2 `TrainJob` and legacy `PyTorchJob`.

A training stage with more than one node does not train in its pipeline pod:
it hands the same image and command to the cluster's distributed-training
operator. Both builders take the same arguments and place the job the same way
(GPU node pool selector and toleration, volumes, secrets, checkpoint
directory), so a cluster on the legacy Training Operator runs the same stage.

The command should be a launcher that reads the rendezvous from the
environment both operators set (`PET_NNODES`, `PET_NODE_RANK`,
`PET_MASTER_ADDR`, ...), i.e. `torchrun`: see `distributed_stage_command`.

The TrainJob follows the Trainer >= 2.2 API (`runtimePatches` carries the pod
placement); the PyTorchJob follows `kubeflow.org/v1`. The schemas these
manifests are checked against are in k8s/crds/.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unifl.cluster.settings import SecretKeyRef, is_label_key, is_label_value

TRAINJOB_API_VERSION = "trainer.kubeflow.org/v1alpha1"
PYTORCHJOB_API_VERSION = "kubeflow.org/v1"

TRAINING_POD_LABEL = "unifl.io/training-job"
"""Label of every training pod; the NetworkPolicies let these pods reach MLflow."""
JOB_NAME_LABEL = "unifl.io/job-name"
CHECKPOINT_ANNOTATION = "unifl.io/checkpoint-dir"
"""Annotation on the job with its checkpoint directory; the launcher hands it back."""
CHECKPOINT_ENV = "UNIFL_CHECKPOINT_DIR"
RUNTIME_PATCH_MANAGER = "unifl.io/launcher"

TRAINER_REPLICATED_JOB = "node"
"""Replicated job (and container) name of the trainer in Kubeflow's torch runtimes."""
PYTORCH_CONTAINER = "pytorch"
"""The container name the Training Operator requires in a PyTorchJob."""

IMAGE_USER_ID = 10001
"""The non-root user of the unifl images (docker/Dockerfile.*)."""

_RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


@dataclass(frozen=True)
class ConfigMapKeyRef:
    """An environment variable taken from a ConfigMap key."""

    config_map: str
    key: str


def make_job_name(*parts: str, max_length: int = 40) -> str:
    """A valid, unique-enough job name from free text, e.g. ('pefl', run_id).

    RFC 1035 label, at most `max_length` characters (pod names of multi-node
    jobs append several suffixes, so stay well under 63), ending in a short
    hash of the full text so that truncated names of different runs differ.
    """
    if max_length < 12 or max_length > 63:
        raise ValueError(f"max_length must be in [12, 63], got {max_length}")
    text = "-".join(parts)
    if not text.strip():
        raise ValueError("make_job_name needs some non-empty text")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"job-{slug}".rstrip("-")
    slug = slug[: max_length - len(digest) - 1].rstrip("-")
    return f"{slug}-{digest}"


def distributed_stage_command(stage: str, stage_args: Sequence[str] = ()) -> list[str]:
    """`torchrun -m unifl.cli stage <stage> ...`: one process per GPU on every node.

    torchrun takes nodes, node rank, processes per node and the master address
    from the PET_* variables that both Trainer v2 and the Training Operator set,
    and accelerate inside the stage picks up the process group torchrun made.
    """
    return ["torchrun", "--module", "unifl.cli", "stage", stage, *stage_args]


def build_trainjob(
    name: str,
    namespace: str,
    image: str,
    command: Sequence[str],
    args: Sequence[str] = (),
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    volumes: Sequence[Mapping[str, Any]] = (),
    volume_mounts: Sequence[Mapping[str, Any]] = (),
    env_from_secrets: Mapping[str, SecretKeyRef] | None = None,
    checkpoint_dir: str = "",
    runtime_ref: str = "torch-distributed",
    *,
    runtime_kind: str = "ClusterTrainingRuntime",
    env: Mapping[str, str] | None = None,
    env_from_config_maps: Mapping[str, ConfigMapKeyRef] | None = None,
    gpu_resource: str = "nvidia.com/gpu",
    cpu: str | None = None,
    memory: str | None = None,
    shm_size: str = "16Gi",
    labels: Mapping[str, str] | None = None,
    active_deadline_s: int | None = None,
) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob running `command` + `args` on `num_nodes` nodes.

    The trainer container gets the image, command, environment (secrets by
    key reference, never by value) and per-node resources; the pods get the
    node selector, tolerations, volumes and mounts through a runtime patch of
    the runtime's `node` job. `checkpoint_dir` is passed as UNIFL_CHECKPOINT_DIR
    and recorded as an annotation for the launcher.
    """
    parts = _JobParts.build(
        name=name,
        namespace=namespace,
        image=image,
        command=command,
        args=args,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        node_selector=node_selector,
        tolerations=tolerations,
        volumes=volumes,
        volume_mounts=volume_mounts,
        env_from_secrets=env_from_secrets,
        checkpoint_dir=checkpoint_dir,
        env=env,
        env_from_config_maps=env_from_config_maps,
        gpu_resource=gpu_resource,
        cpu=cpu,
        memory=memory,
        shm_size=shm_size,
        labels=labels,
    )
    if not runtime_ref:
        raise ValueError("runtime_ref: name a ClusterTrainingRuntime, e.g. 'torch-distributed'")
    if runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise ValueError(
            f"runtime_kind must be ClusterTrainingRuntime or TrainingRuntime, got {runtime_kind!r}"
        )
    pod_spec_patch: dict[str, Any] = {
        "securityContext": parts.pod_security_context,
        "nodeSelector": parts.node_selector,
        "tolerations": parts.tolerations,
        "volumes": parts.volumes,
        "containers": [{"name": TRAINER_REPLICATED_JOB, "volumeMounts": parts.volume_mounts}],
    }
    if not pod_spec_patch["nodeSelector"]:
        del pod_spec_patch["nodeSelector"]
    if not pod_spec_patch["tolerations"]:
        del pod_spec_patch["tolerations"]
    spec: dict[str, Any] = {
        "runtimeRef": {
            "name": runtime_ref,
            "apiGroup": "trainer.kubeflow.org",
            "kind": runtime_kind,
        },
        "trainer": {
            "image": image,
            "command": list(command),
            "args": list(args),
            "env": parts.env,
            "numNodes": num_nodes,
            "numProcPerNode": parts.processes_per_node,
        },
        "runtimePatches": [
            {
                "manager": RUNTIME_PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": TRAINER_REPLICATED_JOB,
                                    "template": {
                                        "spec": {
                                            "template": {
                                                "metadata": {"labels": parts.pod_labels},
                                                "spec": pod_spec_patch,
                                            }
                                        }
                                    },
                                }
                            ]
                        }
                    }
                },
            }
        ],
    }
    if parts.resources:
        spec["trainer"]["resourcesPerNode"] = parts.resources
    if active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = _positive_int("active_deadline_s", active_deadline_s)
    return {
        "apiVersion": TRAINJOB_API_VERSION,
        "kind": "TrainJob",
        "metadata": parts.metadata,
        "spec": spec,
    }


def build_pytorchjob(
    name: str,
    namespace: str,
    image: str,
    command: Sequence[str],
    args: Sequence[str] = (),
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    volumes: Sequence[Mapping[str, Any]] = (),
    volume_mounts: Sequence[Mapping[str, Any]] = (),
    env_from_secrets: Mapping[str, SecretKeyRef] | None = None,
    checkpoint_dir: str = "",
    *,
    env: Mapping[str, str] | None = None,
    env_from_config_maps: Mapping[str, ConfigMapKeyRef] | None = None,
    gpu_resource: str = "nvidia.com/gpu",
    cpu: str | None = None,
    memory: str | None = None,
    shm_size: str = "16Gi",
    labels: Mapping[str, str] | None = None,
    active_deadline_s: int | None = None,
    backoff_limit: int = 3,
) -> dict[str, Any]:
    """The same job for clusters on the legacy Training Operator (`kubeflow.org/v1` PyTorchJob).

    One Master and `num_nodes - 1` Workers with identical pod templates;
    `nprocPerNode` makes the operator set the PET_* variables torchrun reads.
    Pods restart on failure up to `backoff_limit` times; running pods are
    cleaned up when the job ends.
    """
    parts = _JobParts.build(
        name=name,
        namespace=namespace,
        image=image,
        command=command,
        args=args,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        node_selector=node_selector,
        tolerations=tolerations,
        volumes=volumes,
        volume_mounts=volume_mounts,
        env_from_secrets=env_from_secrets,
        checkpoint_dir=checkpoint_dir,
        env=env,
        env_from_config_maps=env_from_config_maps,
        gpu_resource=gpu_resource,
        cpu=cpu,
        memory=memory,
        shm_size=shm_size,
        labels=labels,
    )
    if backoff_limit < 0:
        raise ValueError(f"backoff_limit must be >= 0, got {backoff_limit}")
    pod_spec: dict[str, Any] = {
        "securityContext": parts.pod_security_context,
        "containers": [
            {
                "name": PYTORCH_CONTAINER,
                "image": image,
                "command": list(command),
                "args": list(args),
                "env": parts.env,
                "resources": parts.resources,
                "volumeMounts": parts.volume_mounts,
                "securityContext": parts.container_security_context,
            }
        ],
        "volumes": parts.volumes,
    }
    if not parts.resources:
        del pod_spec["containers"][0]["resources"]
    if parts.node_selector:
        pod_spec["nodeSelector"] = parts.node_selector
    if parts.tolerations:
        pod_spec["tolerations"] = parts.tolerations

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"metadata": {"labels": parts.pod_labels}, "spec": pod_spec},
        }

    replica_specs = {"Master": replica(1)}
    if num_nodes > 1:
        replica_specs["Worker"] = replica(num_nodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": backoff_limit}
    if active_deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = _positive_int("active_deadline_s", active_deadline_s)
    return {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": "PyTorchJob",
        "metadata": parts.metadata,
        "spec": {
            "nprocPerNode": str(parts.processes_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


@dataclass(frozen=True)
class _JobParts:
    """The validated pieces both job kinds are made of."""

    metadata: dict[str, Any]
    pod_labels: dict[str, str]
    env: list[dict[str, Any]]
    resources: dict[str, Any]
    processes_per_node: int
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    volume_mounts: list[dict[str, Any]]
    pod_security_context: dict[str, Any]
    container_security_context: dict[str, Any]

    @classmethod
    def build(
        cls,
        *,
        name: str,
        namespace: str,
        image: str,
        command: Sequence[str],
        args: Sequence[str],
        num_nodes: int,
        gpus_per_node: int,
        node_selector: Mapping[str, str] | None,
        tolerations: Sequence[Mapping[str, Any]],
        volumes: Sequence[Mapping[str, Any]],
        volume_mounts: Sequence[Mapping[str, Any]],
        env_from_secrets: Mapping[str, SecretKeyRef] | None,
        checkpoint_dir: str,
        env: Mapping[str, str] | None,
        env_from_config_maps: Mapping[str, ConfigMapKeyRef] | None,
        gpu_resource: str,
        cpu: str | None,
        memory: str | None,
        shm_size: str,
        labels: Mapping[str, str] | None,
    ) -> _JobParts:
        if not _RFC1035_LABEL.match(name):
            raise ValueError(
                f"job name {name!r}: must be a lowercase RFC 1035 label of at most 63 "
                "characters (use make_job_name)"
            )
        if not _RFC1035_LABEL.match(namespace):
            raise ValueError(f"namespace {namespace!r} is not a valid namespace name")
        if not image or any(c.isspace() for c in image):
            raise ValueError(f"image {image!r}: expected a container image reference")
        if not command:
            raise ValueError("command: give the launcher, e.g. distributed_stage_command(stage)")
        for field, items in (("command", command), ("args", args)):
            if isinstance(items, str) or not all(isinstance(item, str) for item in items):
                raise ValueError(f"{field} must be a list of strings, got {items!r}")
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {gpus_per_node}")
        if not checkpoint_dir or not checkpoint_dir.startswith("/"):
            raise ValueError(
                f"checkpoint_dir {checkpoint_dir!r}: give an absolute path on a mounted volume, "
                "so a retried job resumes from it"
            )

        env_list: list[dict[str, Any]] = [{"name": CHECKPOINT_ENV, "value": checkpoint_dir}]
        for env_name, value in (env or {}).items():
            env_list.append({"name": env_name, "value": str(value)})
        for env_name, secret_ref in (env_from_secrets or {}).items():
            env_list.append(
                {
                    "name": env_name,
                    "valueFrom": {
                        "secretKeyRef": {"name": secret_ref.secret, "key": secret_ref.key}
                    },
                }
            )
        for env_name, map_ref in (env_from_config_maps or {}).items():
            env_list.append(
                {
                    "name": env_name,
                    "valueFrom": {
                        "configMapKeyRef": {"name": map_ref.config_map, "key": map_ref.key}
                    },
                }
            )
        _check_unique("environment variable", [item["name"] for item in env_list])
        for item in env_list:
            if not _ENV_NAME.match(item["name"]):
                raise ValueError(f"environment variable name {item['name']!r} is not valid")

        selector = dict(node_selector or {})
        for key, value in selector.items():
            if not is_label_key(key) or not is_label_value(value):
                raise ValueError(f"node_selector {key}={value!r} is not a valid label")

        toleration_list = [dict(item) for item in tolerations]
        for item in toleration_list:
            unknown = set(item) - {"key", "operator", "value", "effect", "tolerationSeconds"}
            if unknown:
                raise ValueError(f"toleration {item}: unknown field(s) {sorted(unknown)}")
            if item.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError(f"toleration {item}: operator must be Equal or Exists")

        volume_list = [dict(item) for item in volumes]
        volume_list.append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}
        )
        volume_names = [item.get("name", "") for item in volume_list]
        _check_unique("volume", volume_names)
        mount_list = [dict(item) for item in volume_mounts]
        mount_list.append({"name": "dshm", "mountPath": "/dev/shm"})
        for mount in mount_list:
            if mount.get("name") not in volume_names:
                raise ValueError(
                    f"volume mount {mount} refers to no volume; volumes: {sorted(volume_names)}"
                )
            if not str(mount.get("mountPath", "")).startswith("/"):
                raise ValueError(f"volume mount {mount}: mountPath must be an absolute path")
        _check_unique("volume mount path", [mount["mountPath"] for mount in mount_list])

        limits: dict[str, Any] = {}
        requests: dict[str, Any] = {}
        if gpus_per_node:
            limits[gpu_resource] = gpus_per_node
            requests[gpu_resource] = gpus_per_node
        if cpu:
            requests["cpu"] = limits["cpu"] = cpu
        if memory:
            requests["memory"] = limits["memory"] = memory
        resources: dict[str, Any] = {}
        if limits:
            resources = {"limits": limits, "requests": requests}

        pod_labels = {TRAINING_POD_LABEL: "true", JOB_NAME_LABEL: name}
        for key, value in (labels or {}).items():
            if not is_label_key(key) or not is_label_value(value):
                raise ValueError(f"label {key}={value!r} is not a valid label")
            pod_labels.setdefault(key, value)
        metadata = {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/part-of": "unifl",
                "app.kubernetes.io/managed-by": "unifl-launcher",
                JOB_NAME_LABEL: name,
            },
            "annotations": {CHECKPOINT_ANNOTATION: checkpoint_dir},
        }
        return cls(
            metadata=metadata,
            pod_labels=pod_labels,
            env=env_list,
            resources=resources,
            processes_per_node=max(gpus_per_node, 1),
            node_selector=selector,
            tolerations=toleration_list,
            volumes=volume_list,
            volume_mounts=mount_list,
            pod_security_context={
                "runAsNonRoot": True,
                "runAsUser": IMAGE_USER_ID,
                "runAsGroup": IMAGE_USER_ID,
                "fsGroup": IMAGE_USER_ID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            container_security_context={
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        )


def gpu_placement(
    node_selector_key: str, node_selector_value: str, toleration_key: str
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The node selector and toleration of the GPU node-pool convention.

    Nodes carry the label `node_selector_key=node_selector_value` and the taint
    `toleration_key:NoSchedule` (any value), e.g. unifl.io/node-pool=gpu and
    nvidia.com/gpu; on GKE the label is cloud.google.com/gke-accelerator.
    """
    toleration = {"key": toleration_key, "operator": "Exists", "effect": "NoSchedule"}
    return {node_selector_key: node_selector_value}, [toleration]


def checkpoint_volume(
    claim_name: str, mount_path: str = "/checkpoints"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared checkpoint PVC as a (volume, volume mount) pair."""
    volume = {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim_name}}
    return volume, {"name": "checkpoints", "mountPath": mount_path}


def _check_unique(what: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for item in names:
        if not item:
            raise ValueError(f"every {what} needs a name")
        if item in seen:
            raise ValueError(f"duplicate {what} {item!r}")
        seen.add(item)


def _positive_int(field: str, value: int) -> int:
    if int(value) < 1:
        raise ValueError(f"{field} must be a positive number of seconds, got {value}")
    return int(value)
