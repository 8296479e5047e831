"""Upload a pipeline version to Kubeflow Pipelines and start a run: `unifl submit`.

Kept thin on purpose: compile (the same code as `unifl compile`), upload as a new version
of the pipeline (creating the pipeline on first use), make sure the experiment exists, and
start the run with the given run parameters. The KFP API token, when the endpoint needs
one, comes from the environment (`KFP_TOKEN_ENV`), never from a flag or the configuration,
and is never printed.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unifl.config import Params

KFP_TOKEN_ENV = "KFP_TOKEN"
"""Environment variable with a bearer token for the KFP API (optional)."""


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


def make_client(host: str, namespace: str | None = None) -> Any:
    """A `kfp.Client` for `host`, with the token from the environment when set."""
    import kfp

    token = os.environ.get(KFP_TOKEN_ENV) or None
    return kfp.Client(host=host, existing_token=token, namespace=namespace)


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
    client: Any = None,
) -> SubmittedRun:
    """Compile `pipeline`, upload it as a new version, and start a run in `experiment`.

    `arguments` are run parameters by name (e.g. `{"pefl_steps": 500}`); the rest keep the
    defaults compiled from `params`. `client` is a `kfp.Client` (made from `host` if None).
    Run parameters are visible to everyone who sees the run: credentials in a URL are sent
    as ``***`` (the steps log in with the Secrets' credentials), as in the compiled defaults.
    """
    from unifl.pipelines.compile import compile_pipeline
    from unifl.pipelines.unifl_pipelines import PIPELINE_IDS
    from unifl.tracking.redaction import redact_url_credentials

    if pipeline not in PIPELINE_IDS:
        raise SubmitError(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINE_IDS)}")
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
            )
        except SubmitError:
            raise
        except Exception as exc:
            raise SubmitError(
                f"Kubeflow Pipelines at {host}: {type(exc).__name__}: {str(exc)[:300]}"
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
