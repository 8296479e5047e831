"""Cluster settings of a pipeline pod, read from its environment and checked at start.

On a cluster the endpoints come from the `unifl-endpoints` ConfigMap
(k8s/base/configmap-endpoints.yaml) and the credentials from the unifl Secrets
(k8s/secrets/templates.yaml), both mounted as environment variables. A missing
or malformed key must stop a component before any work, with the key's name
and where it should come from; a half-configured pod would otherwise fail
minutes later deep inside boto3 or the MLflow client.

Each component asks only for the groups it uses (`needs`): a training stage
does not need the Label Studio token. Secret values are held as
`pydantic.SecretStr` and never appear in messages or reprs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import SecretStr

CONFIG_MAP_NAME = "unifl-endpoints"
"""The ConfigMap with endpoints and cluster conventions (mounted with envFrom)."""

SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

GROUPS: tuple[str, ...] = ("mlflow", "s3", "labeling", "training")
"""What a component may need: tracking, object store, annotation, multi-node training."""

TrainingApi = Literal["trainjob", "pytorchjob"]


@dataclass(frozen=True)
class SecretKeyRef:
    """Where a secret environment variable comes from."""

    secret: str
    key: str


CONFIG_MAP_KEYS: dict[str, tuple[str, ...]] = {
    "mlflow": ("MLFLOW_TRACKING_URI",),
    "s3": ("AWS_ENDPOINT_URL_S3", "UNIFL_MLFLOW_ARTIFACTS_BUCKET", "UNIFL_TASK_IMAGES_BUCKET"),
    "labeling": ("LABEL_STUDIO_URL", "UNIFL_TASK_IMAGES_BUCKET"),
    "training": (
        "UNIFL_TRAINING_API",
        "UNIFL_TRAINING_RUNTIME",
        "UNIFL_CHECKPOINT_PVC",
        "UNIFL_GPU_NODE_SELECTOR_KEY",
        "UNIFL_GPU_NODE_SELECTOR_VALUE",
        "UNIFL_GPU_TOLERATION_KEY",
    ),
}
"""ConfigMap keys each group requires."""

SECRET_KEYS: dict[str, dict[str, SecretKeyRef]] = {
    "mlflow": {},
    "s3": {
        "AWS_ACCESS_KEY_ID": SecretKeyRef("unifl-s3-credentials", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": SecretKeyRef("unifl-s3-credentials", "AWS_SECRET_ACCESS_KEY"),
    },
    "labeling": {
        "LABEL_STUDIO_API_KEY": SecretKeyRef("unifl-label-studio-token", "LABEL_STUDIO_API_KEY"),
    },
    "training": {},
}
"""Secret-provided environment variables each group requires."""

MLFLOW_CREDENTIALS_SECRET = "unifl-mlflow-credentials"
"""Optional Secret for an MLflow server behind authentication."""
MLFLOW_CREDENTIAL_KEYS: tuple[str, str] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""Its keys, mounted as the environment variables MLflow reads its login from."""


def unset_secret_keys(names: Sequence[str], secret: str, environ: Mapping[str, str]) -> str:
    """What to set when any of `names` is unset in `environ`, naming the Secret that holds
    them on a cluster (for an error message; never a value); "" when all are set."""
    missing = [name for name in names if not environ.get(name)]
    if not missing:
        return ""
    return (
        f"set {' and '.join(names)} in the environment (on a cluster: the {secret} Secret); "
        f"not set: {', '.join(missing)}"
    )


NAMESPACE_ENV = "UNIFL_NAMESPACE"
"""Set from the downward API (metadata.namespace); the service-account file is the fallback."""


class ClusterSettingsError(ValueError):
    """Required cluster settings are missing or malformed; the message names every key."""

    def __init__(self, problems: list[str], missing_keys: list[str]) -> None:
        self.problems = problems
        self.missing_keys = missing_keys
        super().__init__("cluster settings are incomplete: " + "; ".join(problems))


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: str


@dataclass(frozen=True)
class ObjectStoreSettings:
    endpoint_url: str
    access_key_id: SecretStr
    secret_access_key: SecretStr
    mlflow_artifacts_bucket: str
    task_images_bucket: str


@dataclass(frozen=True)
class LabelingSettings:
    url: str
    api_key: SecretStr
    task_images_bucket: str


@dataclass(frozen=True)
class TrainingSettings:
    namespace: str
    api: TrainingApi
    runtime: str
    checkpoint_pvc: str
    gpu_node_selector: dict[str, str]
    gpu_toleration_key: str


@dataclass(frozen=True)
class ClusterSettings:
    """The groups a component asked for; the others are None."""

    mlflow: MlflowSettings | None = None
    s3: ObjectStoreSettings | None = None
    labeling: LabelingSettings | None = None
    training: TrainingSettings | None = None


def secret_env_sources(needs: Collection[str] = GROUPS) -> dict[str, dict[str, str]]:
    """Secrets to mount for `needs`, as {secret name: {secret key: env var}}.

    The shape of `kfp.kubernetes.use_secret_as_env(task, secret_name, secret_key_to_env)`,
    so the pipeline mounts exactly what `load_cluster_settings` checks.
    """
    _check_groups(needs)
    sources: dict[str, dict[str, str]] = {}
    for group in needs:
        for env_name, ref in SECRET_KEYS[group].items():
            sources.setdefault(ref.secret, {})[ref.key] = env_name
    return sources


def load_cluster_settings(
    env: Mapping[str, str] | None = None,
    *,
    needs: Collection[str] = ("mlflow",),
    namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE_FILE,
) -> ClusterSettings:
    """Read and check the settings of the groups in `needs` from `env` (default: os.environ).

    Raises `ClusterSettingsError` listing every missing key (with the ConfigMap
    or Secret it belongs in) and every malformed value (secret values are never
    echoed).
    """
    import os

    _check_groups(needs)
    source = dict(os.environ if env is None else env)
    problems: list[str] = []
    missing: list[str] = []

    def config(key: str) -> str:
        value = source.get(key, "").strip()
        if not value:
            missing.append(key)
            problems.append(
                f"missing key {key} (ConfigMap {CONFIG_MAP_NAME}, k8s/base/configmap-endpoints.yaml)"
            )
        return value

    def secret(env_name: str, ref: SecretKeyRef) -> SecretStr:
        value = source.get(env_name, "")
        if not value.strip():
            missing.append(env_name)
            problems.append(f"missing key {env_name} (Secret {ref.secret}, key {ref.key})")
        return SecretStr(value)

    def check(key: str, value: str, ok: bool, expected: str) -> None:
        if value and not ok:
            origin = "" if key == NAMESPACE_ENV else f"ConfigMap {CONFIG_MAP_NAME} "
            problems.append(f"{origin}key {key}: expected {expected}, got {value!r}")

    settings: dict[str, object] = {}
    if "mlflow" in needs:
        uri = config("MLFLOW_TRACKING_URI")
        check("MLFLOW_TRACKING_URI", uri, _is_http_url(uri), "an http(s) URL")
        settings["mlflow"] = MlflowSettings(tracking_uri=uri)
    if "s3" in needs:
        endpoint = config("AWS_ENDPOINT_URL_S3")
        check("AWS_ENDPOINT_URL_S3", endpoint, _is_http_url(endpoint), "an http(s) URL")
        buckets = {}
        for key in ("UNIFL_MLFLOW_ARTIFACTS_BUCKET", "UNIFL_TASK_IMAGES_BUCKET"):
            buckets[key] = config(key)
            check(key, buckets[key], _is_bucket_name(buckets[key]), "an S3 bucket name")
        keys = SECRET_KEYS["s3"]
        settings["s3"] = ObjectStoreSettings(
            endpoint_url=endpoint,
            access_key_id=secret("AWS_ACCESS_KEY_ID", keys["AWS_ACCESS_KEY_ID"]),
            secret_access_key=secret("AWS_SECRET_ACCESS_KEY", keys["AWS_SECRET_ACCESS_KEY"]),
            mlflow_artifacts_bucket=buckets["UNIFL_MLFLOW_ARTIFACTS_BUCKET"],
            task_images_bucket=buckets["UNIFL_TASK_IMAGES_BUCKET"],
        )
    if "labeling" in needs:
        url = config("LABEL_STUDIO_URL")
        check("LABEL_STUDIO_URL", url, _is_http_url(url), "an http(s) URL")
        bucket = source.get("UNIFL_TASK_IMAGES_BUCKET", "").strip()
        if "s3" not in needs:
            bucket = config("UNIFL_TASK_IMAGES_BUCKET")
            check("UNIFL_TASK_IMAGES_BUCKET", bucket, _is_bucket_name(bucket), "an S3 bucket name")
        ref = SECRET_KEYS["labeling"]["LABEL_STUDIO_API_KEY"]
        settings["labeling"] = LabelingSettings(
            url=url, api_key=secret("LABEL_STUDIO_API_KEY", ref), task_images_bucket=bucket
        )
    if "training" in needs:
        settings["training"] = _training_settings(source, config, check, namespace_file)
        if not settings["training"]:
            missing.append(NAMESPACE_ENV)
            problems.append(
                f"missing key {NAMESPACE_ENV} (downward API metadata.namespace) and no "
                f"service-account namespace file {namespace_file}"
            )
    if problems:
        raise ClusterSettingsError(problems, missing)
    return ClusterSettings(**settings)  # type: ignore[arg-type]


def _training_settings(
    source: Mapping[str, str],
    config: Callable[[str], str],
    check: Callable[[str, str, bool, str], None],
    namespace_file: Path,
) -> TrainingSettings | None:
    """The training group; None when no namespace can be found (reported by the caller)."""
    api = config("UNIFL_TRAINING_API")
    check(
        "UNIFL_TRAINING_API", api, api in ("trainjob", "pytorchjob"), "'trainjob' or 'pytorchjob'"
    )
    runtime = config("UNIFL_TRAINING_RUNTIME")
    check("UNIFL_TRAINING_RUNTIME", runtime, _is_dns_subdomain(runtime), "a resource name")
    pvc = config("UNIFL_CHECKPOINT_PVC")
    check("UNIFL_CHECKPOINT_PVC", pvc, _is_dns_subdomain(pvc), "a PersistentVolumeClaim name")
    label_key = config("UNIFL_GPU_NODE_SELECTOR_KEY")
    check("UNIFL_GPU_NODE_SELECTOR_KEY", label_key, is_label_key(label_key), "a label key")
    label_value = config("UNIFL_GPU_NODE_SELECTOR_VALUE")
    check(
        "UNIFL_GPU_NODE_SELECTOR_VALUE", label_value, is_label_value(label_value), "a label value"
    )
    taint_key = config("UNIFL_GPU_TOLERATION_KEY")
    check("UNIFL_GPU_TOLERATION_KEY", taint_key, is_label_key(taint_key), "a taint key")
    namespace = source.get(NAMESPACE_ENV, "").strip()
    if not namespace and namespace_file.is_file():
        namespace = namespace_file.read_text(encoding="utf-8").strip()
    if not namespace:
        return None
    check(NAMESPACE_ENV, namespace, _is_dns_label(namespace), "a namespace name")
    return TrainingSettings(
        namespace=namespace,
        api=api,  # type: ignore[arg-type]
        runtime=runtime,
        checkpoint_pvc=pvc,
        gpu_node_selector={label_key: label_value},
        gpu_toleration_key=taint_key,
    )


def _check_groups(needs: Collection[str]) -> None:
    unknown = sorted(set(needs) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown settings group(s) {unknown}; known: {list(GROUPS)}")


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _is_http_url(text: str) -> bool:
    parsed = urlparse(text)
    return parsed.scheme in ("http", "https") and bool(parsed.hostname)


def _is_bucket_name(text: str) -> bool:
    return bool(_BUCKET.match(text)) and ".." not in text


def _is_dns_label(text: str) -> bool:
    return bool(_DNS_LABEL.match(text))


def _is_dns_subdomain(text: str) -> bool:
    return 0 < len(text) <= 253 and all(_is_dns_label(part) for part in text.split("."))


def is_label_key(text: str) -> bool:
    """A Kubernetes label (or taint) key: optional DNS-subdomain prefix, '/', a name."""
    prefix, _, name = text.rpartition("/")
    if "/" in text and not _is_dns_subdomain(prefix):
        return False
    return bool(_LABEL_NAME.match(name))


def is_label_value(text: str) -> bool:
    """A Kubernetes label value (may be empty)."""
    return text == "" or bool(_LABEL_NAME.match(text))
