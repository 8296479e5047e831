"""Run a multi-node training job to the end from a pipeline pod.

`run_training_job` creates a TrainJob or PyTorchJob (see `unifl.cluster.trainjob`),
polls it and streams every change of its status conditions, and then:

- returns a `JobResult` with the checkpoint directory when the job succeeds;
- raises `TrainingJobError` with the job's own reason and message when it fails;
- raises `TrainingJobTimeout` (and deletes the job) when no training pod is
  running after `start_timeout_s`, e.g. because no GPU node is free, naming
  the pods' scheduling messages when it may read them;
- deletes the job when the pipeline run is cancelled (SIGTERM from the
  kubelet, or Ctrl-C), so that no orphaned job keeps holding GPUs.

A retried pipeline task finds its job already there (HTTP 409): it adopts a
running or finished job of the same checkpoint directory instead of starting
over, and replaces a failed one; the trainer resumes from the last checkpoint.

Polling (not a watch stream) keeps the logic simple and robust to API server
restarts; a few consecutive transient API errors are tolerated.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from unifl.cluster.settings import SecretKeyRef, TrainingSettings
from unifl.cluster.trainjob import (
    CHECKPOINT_ANNOTATION,
    JOB_NAME_LABEL,
    ConfigMapKeyRef,
    build_pytorchjob,
    build_trainjob,
    checkpoint_volume,
    distributed_stage_command,
    gpu_placement,
    make_job_name,
)


@dataclass(frozen=True)
class JobKind:
    """Where a kind of training job lives in the API."""

    kind: str
    group: str
    version: str
    plural: str


JOB_KINDS: dict[str, JobKind] = {
    "TrainJob": JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    "PyTorchJob": JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs"),
}


class Phase(enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class TrainingJobError(RuntimeError):
    """The training job failed, could not be created, or was lost."""

    def __init__(self, message: str, *, kind: str, namespace: str, name: str, reason: str = ""):
        super().__init__(message)
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.reason = reason


class TrainingJobTimeout(TrainingJobError):
    """The job did not start (or finish) within the configured time; it was deleted."""


class TrainingJobCancelled(TrainingJobError):
    """The waiting process was told to stop (SIGTERM); the job was deleted."""


@dataclass(frozen=True)
class JobStatus:
    """One observed state of the job, streamed to `on_status` when it changes."""

    kind: str
    namespace: str
    name: str
    phase: Phase
    reason: str
    message: str
    conditions: tuple[tuple[str, str, str, str], ...]
    elapsed_s: float

    def line(self) -> str:
        detail = ": ".join(part for part in (self.reason, self.message) if part)
        suffix = f" ({detail})" if detail else ""
        return (
            f"[{self.kind} {self.namespace}/{self.name} +{self.elapsed_s:.0f}s] "
            f"{self.phase.value}{suffix}"
        )


@dataclass(frozen=True)
class JobResult:
    """A finished, successful training job and where its checkpoints are."""

    kind: str
    namespace: str
    name: str
    checkpoint_dir: str
    duration_s: float
    adopted: bool
    statuses: tuple[JobStatus, ...] = field(default=())


def job_phase(job: Mapping[str, Any]) -> tuple[Phase, str, str]:
    """(phase, reason, message) of a TrainJob or PyTorchJob object as the API returns it.

    TrainJob: terminal conditions Complete / Failed, Suspended; it is running
    once a child job has all its pods ready (status.jobsStatus). PyTorchJob:
    conditions Succeeded / Failed / Running / Restarting.
    """
    kind = job.get("kind", "")
    status = job.get("status") or {}
    conditions = {
        cond.get("type"): cond for cond in status.get("conditions") or [] if cond.get("type")
    }

    def true(cond_type: str) -> dict[str, Any] | None:
        cond = conditions.get(cond_type)
        return cond if cond and str(cond.get("status")) == "True" else None

    def parts(cond: Mapping[str, Any]) -> tuple[str, str]:
        return str(cond.get("reason") or ""), str(cond.get("message") or "")

    if kind == "TrainJob":
        if cond := true("Failed"):
            return (Phase.FAILED, *parts(cond))
        if cond := true("Complete"):
            return (Phase.SUCCEEDED, *parts(cond))
        if cond := true("Suspended"):
            return (Phase.SUSPENDED, *parts(cond))
        jobs = status.get("jobsStatus") or []
        if any((item.get("ready") or 0) > 0 or (item.get("succeeded") or 0) > 0 for item in jobs):
            return Phase.RUNNING, "", ""
        return Phase.PENDING, "", ""
    if kind == "PyTorchJob":
        if cond := true("Failed"):
            return (Phase.FAILED, *parts(cond))
        if cond := true("Succeeded"):
            return (Phase.SUCCEEDED, *parts(cond))
        if cond := true("Suspended"):
            return (Phase.SUSPENDED, *parts(cond))
        if (cond := true("Running")) or (cond := true("Restarting")):
            return (Phase.RUNNING, *parts(cond))
        if cond := conditions.get("Created"):
            return (Phase.PENDING, *parts(cond))
        return Phase.PENDING, "", ""
    raise ValueError(f"not a TrainJob or PyTorchJob: kind {kind!r}")


def run_training_job(
    api: Any,
    job: Mapping[str, Any],
    *,
    start_timeout_s: float = 1800.0,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    on_status: Callable[[JobStatus], None] | None = None,
    core_api: Any = None,
    max_api_errors: int = 5,
    handle_sigterm: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> JobResult:
    """Create `job` with `api` (a kubernetes `CustomObjectsApi`), wait for it, return its result.

    `start_timeout_s`: how long the job may stay without a running training pod
    (queued for GPUs, image pulling) before it is deleted and
    `TrainingJobTimeout` is raised. `timeout_s`: optional limit for the whole
    run. `core_api` (a `CoreV1Api`): lets the timeout message quote why the
    pods are not scheduled. `on_status` receives every new status (default:
    printed to stderr). SIGTERM is turned into deletion of the job plus
    `TrainingJobCancelled` when called from the main thread.
    """
    kind = JOB_KINDS.get(str(job.get("kind")))
    if kind is None:
        raise ValueError(f"job kind {job.get('kind')!r}: expected one of {sorted(JOB_KINDS)}")
    metadata = job.get("metadata") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not name or not namespace:
        raise ValueError("job.metadata needs a name and a namespace")
    checkpoint_dir = (metadata.get("annotations") or {}).get(CHECKPOINT_ANNOTATION)
    if not checkpoint_dir:
        raise ValueError(
            f"job {name}: no {CHECKPOINT_ANNOTATION} annotation; build it with build_trainjob "
            "or build_pytorchjob"
        )
    if poll_s <= 0 or start_timeout_s <= 0:
        raise ValueError("poll_s and start_timeout_s must be positive")
    report = on_status or _print_status
    waiter = _Waiter(
        api=api,
        kind=kind,
        namespace=namespace,
        name=name,
        checkpoint_dir=checkpoint_dir,
        core_api=core_api,
        max_api_errors=max_api_errors,
        clock=clock,
        sleep=sleep,
    )
    create_attempted = False
    with _sigterm_raises(handle_sigterm):
        try:
            create_attempted = True
            adopted = waiter.create(job, poll_s=poll_s, timeout_s=start_timeout_s)
            return waiter.wait(
                start_timeout_s=start_timeout_s,
                timeout_s=timeout_s,
                poll_s=poll_s,
                on_status=report,
                adopted=adopted,
            )
        except _SigtermReceived:
            if create_attempted:
                waiter.delete_quietly()
            raise TrainingJobCancelled(
                f"{kind.kind} {namespace}/{name}: cancelled by SIGTERM; the job was deleted",
                kind=kind.kind,
                namespace=namespace,
                name=name,
                reason="Cancelled",
            ) from None
        except KeyboardInterrupt:
            if create_attempted:
                waiter.delete_quietly()
            raise


def launch_training_stage(
    stage: str,
    stage_args: Sequence[str],
    *,
    run_id: str,
    image: str,
    settings: TrainingSettings,
    num_nodes: int,
    gpus_per_node: int,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
    env_from_secrets: Mapping[str, SecretKeyRef] | None = None,
    env_from_config_maps: Mapping[str, ConfigMapKeyRef] | None = None,
    start_timeout_s: float = 1800.0,
    poll_s: float = 10.0,
    api: Any = None,
    core_api: Any = None,
) -> JobResult:
    """What a pipeline component calls when a stage runs on more than one node.

    Builds the job kind the cluster runs (`settings.api`), placed on the GPU
    node pool from the ConfigMap unless `node_selector`/`tolerations` are given,
    with the shared checkpoint volume mounted and the checkpoints of this run
    and stage under /checkpoints/<run_id>/<stage>, and runs it to the end.
    Without `api`, the in-cluster service-account credentials are used.
    """
    default_selector, default_tolerations = gpu_placement(
        *next(iter(settings.gpu_node_selector.items())), settings.gpu_toleration_key
    )
    volume, mount = checkpoint_volume(settings.checkpoint_pvc)
    name = make_job_name(stage, run_id)
    checkpoint_dir = f"{mount['mountPath']}/{_path_segment(run_id)}/{_path_segment(stage)}"
    common: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "image": image,
        "command": distributed_stage_command(stage),
        "args": list(stage_args),
        "num_nodes": num_nodes,
        "gpus_per_node": gpus_per_node,
        "node_selector": default_selector if node_selector is None else node_selector,
        "tolerations": default_tolerations if tolerations is None else tolerations,
        "volumes": [volume],
        "volume_mounts": [mount],
        "env_from_secrets": env_from_secrets,
        "checkpoint_dir": checkpoint_dir,
        "env": env,
        "env_from_config_maps": env_from_config_maps,
    }
    if settings.api == "trainjob":
        job = build_trainjob(**common, runtime_ref=settings.runtime)
    else:
        job = build_pytorchjob(**common)
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
        core_api = client.CoreV1Api() if core_api is None else core_api
    return run_training_job(
        api, job, start_timeout_s=start_timeout_s, poll_s=poll_s, core_api=core_api
    )


class _SigtermReceived(BaseException):
    """Raised inside the wait loop by the SIGTERM handler (a BaseException, so no
    `except Exception` on the way swallows it)."""


@contextlib.contextmanager
def _sigterm_raises(enabled: bool) -> Iterator[None]:
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _SigtermReceived()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_status(status: JobStatus) -> None:
    tqdm.write(status.line(), file=sys.stderr)


_TRANSIENT_HTTP = {429, 500, 502, 503, 504}


@dataclass
class _Waiter:
    api: Any
    kind: JobKind
    namespace: str
    name: str
    checkpoint_dir: str
    core_api: Any
    max_api_errors: int
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    @property
    def label(self) -> str:
        return f"{self.kind.kind} {self.namespace}/{self.name}"

    def error(
        self, message: str, cls: type[TrainingJobError] = TrainingJobError, reason: str = ""
    ) -> TrainingJobError:
        return cls(
            f"{self.label}: {message}",
            kind=self.kind.kind,
            namespace=self.namespace,
            name=self.name,
            reason=reason,
        )

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.api, method)(
            self.kind.group, self.kind.version, self.namespace, self.kind.plural, *args, **kwargs
        )

    def create(self, job: Mapping[str, Any], *, poll_s: float, timeout_s: float) -> bool:
        """Create the job; True when an existing job of the same run was adopted."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("create_namespaced_custom_object", dict(job))
            return False
        except ApiException as exc:
            if exc.status != 409:
                raise self.error(_explain_create_error(exc, self.kind, self.namespace)) from None
        existing = self._call("get_namespaced_custom_object", self.name)
        existing_dir = (existing.get("metadata", {}).get("annotations") or {}).get(
            CHECKPOINT_ANNOTATION
        )
        if existing_dir != self.checkpoint_dir:
            raise self.error(
                "another job with this name exists (checkpoint directory "
                f"{existing_dir!r}, expected {self.checkpoint_dir!r}); delete it or pick another name"
            )
        phase, _, _ = job_phase(existing)
        if phase is not Phase.FAILED:
            return True
        # A failed attempt of this run (e.g. before a pod was preempted): replace it;
        # the trainer resumes from the checkpoints it left.
        self._call("delete_namespaced_custom_object", self.name, propagation_policy="Foreground")
        deadline = self.clock() + timeout_s
        while True:
            try:
                self._call("get_namespaced_custom_object", self.name)
            except ApiException as exc:
                if exc.status == 404:
                    break
                raise
            if self.clock() >= deadline:
                raise self.error(
                    f"the failed earlier job was not deleted within {timeout_s:.0f} s",
                    TrainingJobTimeout,
                )
            self.sleep(poll_s)
        self._call("create_namespaced_custom_object", dict(job))
        return False

    def wait(
        self,
        *,
        start_timeout_s: float,
        timeout_s: float | None,
        poll_s: float,
        on_status: Callable[[JobStatus], None],
        adopted: bool,
    ) -> JobResult:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        start = self.clock()
        started = False
        last_key: tuple[Any, ...] | None = None
        history: list[JobStatus] = []
        api_errors = 0
        bar = tqdm(desc=f"waiting for {self.label}", unit="poll", file=sys.stderr, disable=None)
        try:
            while True:
                try:
                    obj = self._call("get_namespaced_custom_object", self.name)
                    api_errors = 0
                except ApiException as exc:
                    if exc.status == 404:
                        raise self.error("the job was deleted while waiting for it") from None
                    if exc.status not in _TRANSIENT_HTTP:
                        raise self.error(
                            f"API error {exc.status} {exc.reason}: {_api_message(exc)}"
                        ) from None
                    api_errors += 1
                    obj = None
                except (Urllib3Error, OSError):
                    api_errors += 1
                    obj = None
                if obj is None:
                    if api_errors >= self.max_api_errors:
                        raise self.error(
                            f"lost contact with the API server ({api_errors} failed requests in a "
                            "row); the job may still be running"
                        )
                    self.sleep(poll_s)
                    continue

                phase, reason, message = job_phase(obj)
                conditions = tuple(
                    (
                        str(cond.get("type", "")),
                        str(cond.get("status", "")),
                        str(cond.get("reason") or ""),
                        str(cond.get("message") or ""),
                    )
                    for cond in (obj.get("status") or {}).get("conditions") or []
                )
                now = self.clock()
                key = (phase, reason, message, conditions)
                if key != last_key:
                    status = JobStatus(
                        kind=self.kind.kind,
                        namespace=self.namespace,
                        name=self.name,
                        phase=phase,
                        reason=reason,
                        message=message,
                        conditions=conditions,
                        elapsed_s=now - start,
                    )
                    history.append(status)
                    on_status(status)
                    last_key = key
                bar.set_postfix_str(phase.value)
                bar.update(1)

                if phase is Phase.SUCCEEDED:
                    return JobResult(
                        kind=self.kind.kind,
                        namespace=self.namespace,
                        name=self.name,
                        checkpoint_dir=self.checkpoint_dir,
                        duration_s=now - start,
                        adopted=adopted,
                        statuses=tuple(history),
                    )
                if phase is Phase.FAILED:
                    raise self.error(
                        f"failed: {reason or 'no reason given'}: {message or 'no message'} "
                        f"(inspect with: kubectl -n {self.namespace} describe "
                        f"{self.kind.plural} {self.name})",
                        reason=reason,
                    )
                started = started or phase is Phase.RUNNING
                if not started and now - start >= start_timeout_s:
                    diagnosis = self.pod_diagnosis()
                    self.delete_quietly()
                    raise self.error(
                        f"did not start within {start_timeout_s:.0f} s (no training pod running; "
                        f"last state {phase.value}). {diagnosis}Check that the GPU node pool has "
                        "free GPUs for the requested nodes, or raise the start timeout. "
                        "The job was deleted.",
                        TrainingJobTimeout,
                        reason="StartTimeout",
                    )
                if timeout_s is not None and now - start >= timeout_s:
                    self.delete_quietly()
                    raise self.error(
                        f"did not finish within {timeout_s:.0f} s; the job was deleted",
                        TrainingJobTimeout,
                        reason="Timeout",
                    )
                self.sleep(poll_s)
        finally:
            bar.close()

    def delete_quietly(self) -> None:
        """Delete the job (and, in the background, its pods); never raises."""
        try:
            self._call(
                "delete_namespaced_custom_object", self.name, propagation_policy="Background"
            )
        except Exception as exc:  # cleanup must not hide the original error
            tqdm.write(f"{self.label}: could not delete the job: {exc}", file=sys.stderr)

    def pod_diagnosis(self) -> str:
        """Why the job's pods are not running, from their status (empty when unknown)."""
        if self.core_api is None:
            return ""
        try:
            pods = self.core_api.list_namespaced_pod(
                self.namespace, label_selector=f"{JOB_NAME_LABEL}={self.name}"
            )
        except Exception as exc:
            return f"(could not list the job's pods: {exc}) "
        items = _as_dict(pods).get("items") or []
        if not items:
            return "No pod of the job exists yet (the operator has not created them). "
        notes = []
        for pod in items:
            pod_name = pod.get("metadata", {}).get("name", "?")
            status = pod.get("status") or {}
            for cond in status.get("conditions") or []:
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                    notes.append(f"pod {pod_name}: {cond.get('reason')}: {cond.get('message')}")
            for container in status.get("containerStatuses") or []:
                waiting = (container.get("state") or {}).get("waiting") or {}
                if waiting.get("reason"):
                    notes.append(
                        f"pod {pod_name}: {waiting.get('reason')}: {waiting.get('message', '')}"
                    )
        return ("; ".join(notes) + ". ") if notes else ""


def _path_segment(text: str) -> str:
    segment = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    if not segment:
        raise ValueError(f"{text!r} gives an empty path segment")
    return segment


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "body", "") or "")


def _explain_create_error(exc: Any, kind: JobKind, namespace: str) -> str:
    detail = _api_message(exc)
    resource = f"{kind.plural}.{kind.group}/{kind.version}"
    if exc.status == 404:
        other = "pytorchjob" if kind.kind == "TrainJob" else "trainjob"
        return (
            f"cannot create: the cluster has no {resource} resource or no namespace {namespace} "
            f"(HTTP 404: {detail}). Install the operator, or set UNIFL_TRAINING_API={other} in "
            "the unifl-endpoints ConfigMap"
        )
    if exc.status == 403:
        return (
            f"cannot create: forbidden to create {resource} in namespace {namespace} (HTTP 403: "
            f"{detail}). Run the pipeline with the service account unifl-pipeline "
            "(k8s/base/rbac.yaml)"
        )
    if exc.status == 422:
        return f"cannot create: the API server rejected the job as invalid: {detail}"
    return f"cannot create: API error {exc.status} {exc.reason}: {detail}"
