"""Upload a pipeline version to Kubeflow Pipelines and start a run: `unifl submit`.

Kept thin on purpose: compile (the same code as `unifl compile`), upload as a new version
of the pipeline (creating the pipeline on first use), make sure the experiment exists, and
start the run with the given run parameters, as the service account `unifl-pipeline`
(k8s/base/rbac.yaml) unless told otherwise. The KFP API token, when the endpoint needs
one, comes from the environment (`KFP_TOKEN_ENV`), never from a flag or the configuration,
and is never printed.

Before anything is compiled or uploaded, one request to the API's health endpoint, without
retries, checks that the host answers as Kubeflow Pipelines and accepts the credentials: a
wrong host, a refused connection or a missing token is reported at once, naming the host.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unifl.config import Params

KFP_TOKEN_ENV = "KFP_TOKEN"
"""Environment variable with a bearer token for the KFP API (optional)."""

DEFAULT_SERVICE_ACCOUNT = "unifl-pipeline"
"""The Kubernetes service account of the runs' pods: the one k8s/base/rbac.yaml creates."""

HEALTHZ_PATH = "/apis/v2beta1/healthz"
"""The KFP API's health endpoint, which `kfp.Client` itself calls when it is created."""

AUTH_HINT = (
    f"set {KFP_TOKEN_ENV} to a bearer token that this Kubeflow accepts, or port-forward the "
    "API (`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 3000:80`) and pass "
    "--host http://localhost:3000 (docs/cluster.md, 'Compile, upload and start a run')"
)


class SubmitError(RuntimeError):
    """The pipeline could not be uploaded or started; names the host and the step."""


@dataclass(frozen=True)
class SubmittedRun:
    """Where the run went."""

    host: str
    pipeline_id: str
    version_id: str
    experiment_id: str
    run_id: str

    @property
    def url(self) -> str:
        return f"{self.host.rstrip('/')}/#/runs/details/{self.run_id}"


def check_host(host: str, token: str | None = None, timeout_s: float = 10.0) -> None:
    """Fail with a `SubmitError` naming `host` unless its KFP API answers the health check.

    One GET of `HEALTHZ_PATH`, no retries and no redirects followed (a login page behind a
    redirect means the API wants credentials). 401/403 and redirects name `KFP_TOKEN_ENV`.
    """
    import certifi
    import urllib3

    from unifl.tracking.redaction import redact_url_credentials

    shown = redact_url_credentials(host)
    if not re.match(r"https?://[^/]", host):
        raise SubmitError(
            f"Kubeflow Pipelines host {shown!r}: expected a URL starting with http:// or "
            "https://, e.g. https://kubeflow.example.com/pipeline"
        )
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        response = pool.request(
            "GET",
            host.rstrip("/") + HEALTHZ_PATH,
            headers=headers,
            retries=False,
            redirect=False,
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        )
    except urllib3.exceptions.HTTPError as exc:
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {shown}: {_cause(exc)}") from None
    status = response.status
    if status in (401, 403):
        given = (
            f"the token in {KFP_TOKEN_ENV} was refused (expired, or not valid for this "
            "endpoint); set it to a valid bearer token"
            if token
            else f"it needs authentication: {AUTH_HINT}"
        )
        raise SubmitError(
            f"Kubeflow Pipelines at {shown} answered {status} {response.reason} to "
            f"GET {HEALTHZ_PATH}: {given}"
        )
    if 300 <= status < 400:
        target = (response.headers.get("Location") or "").split("?")[0]
        raise SubmitError(
            f"Kubeflow Pipelines at {shown} redirected GET {HEALTHZ_PATH} to {target or '?'} "
            f"(a login page): the API needs authentication; {AUTH_HINT}"
        )
    if status == 404:
        raise SubmitError(
            f"no Kubeflow Pipelines API at {shown}: GET {HEALTHZ_PATH} answered 404; the "
            "API's URL is the UI's address, on a full Kubeflow ending in /pipeline"
        )
    if status != 200:
        raise SubmitError(
            f"Kubeflow Pipelines at {shown} answered {status} {response.reason} to "
            f"GET {HEALTHZ_PATH}: {_body(response.data, token)}"
        )
    try:
        json.loads(response.data)
    except ValueError:
        raise SubmitError(
            f"{shown} answered GET {HEALTHZ_PATH} with something other than the Kubeflow "
            f"Pipelines API's JSON ({response.headers.get('Content-Type', 'no content type')}): "
            "check the host"
        ) from None


def _cause(exc: Exception) -> str:
    """An exception in one line, without the object addresses urllib3 puts in its messages."""
    text = str(getattr(exc, "reason", None) or exc)
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>:?\s*", "", text)
    return f"{type(exc).__name__}: {text}"[:300]


def _body(data: bytes, token: str | None) -> str:
    text = " ".join(data.decode("utf-8", errors="replace").split())[:300]
    return text.replace(token, "***") if token else text


def make_client(host: str, namespace: str | None = None) -> Any:
    """A `kfp.Client` for `host`, with the token from the environment when set.

    The host is checked first (`check_host`): `kfp.Client` calls the health endpoint in its
    constructor and retries a failure for about half a minute before a message that names
    neither the host nor the cause.
    """
    import kfp

    from unifl.tracking.redaction import redact_url_credentials

    token = os.environ.get(KFP_TOKEN_ENV) or None
    check_host(host, token)
    try:
        with warnings.catch_warnings():
            # The version notice kfp.Client gives on every creation, not about this host.
            warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
            return kfp.Client(host=host, existing_token=token, namespace=namespace)
    except Exception as exc:
        raise SubmitError(
            f"Kubeflow Pipelines at {redact_url_credentials(host)}: {_describe(exc, token)}"
        ) from None


def _describe(exc: Exception, token: str | None = None) -> str:
    """An error of the KFP client in one line: an API answer's status and body, or the cause."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status > 0:
        text = f"{status} {getattr(exc, 'reason', '') or ''}".rstrip()
        body = getattr(exc, "body", None)
        if body:
            raw = body if isinstance(body, bytes) else str(body).encode()
            text += f": {_body(raw, token)}"
        if status in (401, 403):
            text += f" ({AUTH_HINT})" if not token else f" (check the token in {KFP_TOKEN_ENV})"
        return text
    return _cause(exc)


def _id(value: Any, *names: str) -> str:
    for name in names:
        found = getattr(value, name, None)
        if found:
            return str(found)
    raise SubmitError(f"KFP answered without {' or '.join(names)}: {type(value).__name__}")


def submit_pipeline(
    params: Params,
    host: str,
    pipeline: str = "full",
    experiment: str = "unifl",
    run_name: str | None = None,
    arguments: Mapping[str, Any] | None = None,
    image: str | None = None,
    gpu_image: str | None = None,
    namespace: str | None = None,
    service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
    client: Any = None,
) -> SubmittedRun:
    """Compile `pipeline`, upload it as a new version, and start a run in `experiment`.

    `arguments` are run parameters by name (e.g. `{"pefl_steps": 500}`); the rest keep the
    defaults compiled from `params`. The steps' image is `image` or `pipeline.image`; one of
    them must be set (the compile fallback `unifl:<version>` is in no registry). The run's pods
    use `service_account` (None or "": the namespace's default pipeline runner). `client` is a
    `kfp.Client` (made from `host`, after `check_host`, if None).
    Run parameters are visible to everyone who sees the run: credentials in a URL are sent
    as ``***`` (the steps log in with the Secrets' credentials), as in the compiled defaults.
    """
    from unifl.pipelines.compile import compile_pipeline
    from unifl.pipelines.unifl_pipelines import PIPELINE_IDS
    from unifl.tracking.redaction import redact_url_credentials

    if pipeline not in PIPELINE_IDS:
        raise SubmitError(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINE_IDS)}")
    if not (image or params.pipeline.image):
        raise SubmitError(
            "no image for the pipeline's steps: pass --image NAME:TAG (an image your cluster "
            "can pull, see docs/cluster.md) or set pipeline.image in the params file"
        )
    name = PIPELINE_IDS[pipeline]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    client = client or make_client(host, namespace)
    with tempfile.TemporaryDirectory(prefix="unifl-submit-") as tmp:
        package = compile_pipeline(pipeline, params, Path(tmp) / f"{name}.yaml", image, gpu_image)
        try:
            pipeline_id = client.get_pipeline_id(name)
            if pipeline_id is None:
                uploaded = client.upload_pipeline(str(package), pipeline_name=name)
                pipeline_id = _id(uploaded, "pipeline_id", "id")
                versions = client.list_pipeline_versions(pipeline_id=pipeline_id)
                version_id = _id(versions.pipeline_versions[0], "pipeline_version_id", "id")
            else:
                version = client.upload_pipeline_version(
                    str(package), pipeline_version_name=f"{name}-{stamp}", pipeline_id=pipeline_id
                )
                version_id = _id(version, "pipeline_version_id", "id")
            experiment_id = _id(
                client.create_experiment(experiment, namespace=namespace), "experiment_id", "id"
            )
            run = client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name or f"{name}-{stamp}",
                pipeline_id=pipeline_id,
                version_id=version_id,
                params={
                    name: redact_url_credentials(value) if isinstance(value, str) else value
                    for name, value in (arguments or {}).items()
                },
                service_account=service_account or None,
            )
        except SubmitError:
            raise
        except Exception as exc:
            token = os.environ.get(KFP_TOKEN_ENV) or None
            raise SubmitError(
                f"Kubeflow Pipelines at {redact_url_credentials(host)}: {_describe(exc, token)}"
            ) from None
    return SubmittedRun(host, pipeline_id, version_id, experiment_id, _id(run, "run_id", "id"))


def parse_arguments(values: list[str]) -> dict[str, Any]:
    """`name=value` run parameters; the value is read as YAML (numbers, lists, mappings)."""
    import yaml

    from unifl.config import ConfigError

    parsed: dict[str, Any] = {}
    for text in values:
        if "=" not in text:
            raise ConfigError(f"run parameter {text!r}: expected name=value")
        name, raw = text.split("=", 1)
        parsed[name.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return parsed
