"""The model registry's vocabulary: lifecycle stages as aliases and version tags.

A version moves candidate -> staging -> production. MLflow's registry stages are deprecated,
so the lifecycle is expressed with

* aliases, one version each: ``candidate`` (newest registered), ``challenger`` (staging),
  ``champion`` (production) -- serving code loads ``models:/<name>@champion``;
* the version tag ``unifl.stage`` (candidate, staging, production, archived), which keeps the
  history visible on versions that no longer hold an alias;
* optionally MLflow's legacy stages (Staging, Production, Archived) for registry UIs that
  still show them (``promotion.legacy_stages``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from unifl.tracking.redaction import filter_secrets

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

STAGES: tuple[str, ...] = ("candidate", "staging", "production")
ARCHIVED = "archived"
ALIASES: dict[str, str] = {
    "candidate": "candidate",
    "staging": "challenger",
    "production": "champion",
}
LEGACY_STAGES: dict[str, str] = {"staging": "Staging", "production": "Production"}

STAGE_TAG = "unifl.stage"
EVALUATION_RUN_TAG = "unifl.evaluation_run_id"
"""Run whose metrics and per-prompt table judge the version (default: the version's run)."""


class RegistryError(ValueError):
    """A registry request names a model, version or stage that does not fit; says which."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def get_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """The model version, or a `RegistryError` naming model and version."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise RegistryError(
            f"registered model {name!r} version {version!r}: {exc.message}"
        ) from None


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, or none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "INVALID_PARAMETER" in str(
            exc.error_code
        ):
            return None
        raise


def stage_of(version: ModelVersion) -> str:
    """A version's lifecycle stage (versions registered by other tools count as candidates)."""
    return version.tags.get(STAGE_TAG, "candidate")


def set_version_tags(
    client: MlflowClient, name: str, version: str | int, tags: Mapping[str, Any]
) -> None:
    """Set version tags (secret-looking ones are dropped, as for runs)."""
    for key, value in filter_secrets(tags).items():
        client.set_model_version_tag(name, str(version), key, value)


def ensure_registered_model(client: MlflowClient, name: str, description: str | None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if "ALREADY_EXISTS" not in str(exc.error_code):
            raise


def register_model_version(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str | None = None,
    model_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    evaluation_run_id: str | None = None,
    description: str | None = None,
) -> ModelVersion:
    """Register a logged model as a new version, tagged and aliased as the newest candidate.

    `evaluation_run_id` names the run that evaluated this model when it is not the run that
    logged it (the pipeline evaluates in a later stage); the promotion gates read it.
    """
    ensure_registered_model(client, name, description=None)
    version_tags = {STAGE_TAG: "candidate", "unifl.registered_at": now_iso(), **dict(tags or {})}
    if evaluation_run_id:
        version_tags[EVALUATION_RUN_TAG] = evaluation_run_id
    version = client.create_model_version(
        name,
        source=model_uri,
        run_id=run_id,
        tags=filter_secrets(version_tags),
        description=description,
        model_id=model_id,
    )
    client.set_registered_model_alias(name, ALIASES["candidate"], version.version)
    return client.get_model_version(name, version.version)


def set_evaluation_run(client: MlflowClient, name: str, version: str | int, run_id: str) -> None:
    """Point a version at the run whose metrics and per-prompt table judge it."""
    get_version(client, name, version)
    client.set_model_version_tag(name, str(version), EVALUATION_RUN_TAG, run_id)


def archive_version(
    client: MlflowClient, name: str, version: str | int, replaced_by: str | int
) -> None:
    """Mark a version that lost its place (its alias moved to `replaced_by`)."""
    set_version_tags(
        client,
        name,
        version,
        {
            STAGE_TAG: ARCHIVED,
            "unifl.archived_at": now_iso(),
            "unifl.replaced_by": str(replaced_by),
        },
    )


def set_legacy_stage(client: MlflowClient, name: str, version: str | int, stage: str) -> None:
    """MLflow's deprecated stage transition, archiving the versions that held the stage.

    The deprecation warning is silenced here because using the legacy stages is an explicit
    choice (``promotion.legacy_stages``), not an accident.
    """
    if stage not in LEGACY_STAGES:
        raise RegistryError(f"no legacy stage for {stage!r}; expected one of {list(LEGACY_STAGES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(
            name, str(version), LEGACY_STAGES[stage], archive_existing_versions=True
        )
