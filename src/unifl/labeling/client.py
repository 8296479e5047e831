"""A small client over label-studio-sdk 2.x for what the pipeline needs.

* Auth: a personal access token (a JWT refresh token; the SDK exchanges it for
  short-lived access tokens itself) or a legacy token, read from the
  environment variable named by `labeling.token_env` or from a file (a mounted
  Kubernetes Secret, `labeling.token_file`). The token is held in a `Secret`
  whose repr and str never show it, and every error message is scrubbed of it.
* Errors: an unreachable server or a refused token raise
  `LabelStudioClientError` naming the URL and where the token came from, never
  the token.
* Idempotency: the project is found by title (same title and config -> same
  project; a changed config is written back); tasks are imported in batches
  and a task whose `pair_id` is already in the project is not imported again;
  storages and annotator users are reused when they already exist.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from xml.etree import ElementTree

import httpx
from tqdm import tqdm

from unifl.labeling.tasks import PAIR_ID_FIELD

T = TypeVar("T")


class LabelStudioClientError(RuntimeError):
    """Talking to Label Studio failed; the message names the URL, never the token."""


class Secret:
    """A credential that does not print itself (repr, str, f-strings, logs, pickles)."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """The raw value, for the one place that sends it (the SDK's auth header)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Secret is not serialisable; read it from the environment where it is used"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self.source)


def resolve_token(token_env: str, token_file: str | Path | None = None) -> Secret:
    """The Label Studio token from `token_env`, else from `token_file` (a Secret mount).

    Surrounding whitespace is stripped (Secret files usually end with a newline).
    """
    value = os.environ.get(token_env, "").strip()
    if value:
        return Secret(value, f"environment variable {token_env}")
    if token_file:
        path = Path(token_file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise LabelStudioClientError(
                f"no Label Studio token: environment variable {token_env} is unset and "
                f"token file {path} does not exist"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LabelStudioClientError(
                f"no Label Studio token: cannot read token file {path} ({type(exc).__name__})"
            ) from None
        if value:
            return Secret(value, f"file {path}")
        raise LabelStudioClientError(f"no Label Studio token: token file {path} is empty")
    raise LabelStudioClientError(
        f"no Label Studio token: set environment variable {token_env} (a personal access token "
        "or a legacy token) or labeling.token_file (a mounted Kubernetes Secret)"
    )


def canonical_label_config(xml: str) -> str:
    """The config in canonical XML, so formatting differences do not count as changes."""
    try:
        return ElementTree.canonicalize(xml, strip_text=True)
    except ElementTree.ParseError:
        return xml.strip()


@dataclass(frozen=True)
class ProjectSetup:
    id: int
    created: bool
    config_updated: bool


@dataclass(frozen=True)
class ImportSummary:
    imported: int
    already_present: int
    task_ids_by_pair: dict[str, int]


class LabelStudioClient:
    """The pipeline's view of one Label Studio server."""

    def __init__(
        self, url: str, token: Secret, *, timeout: float = 60.0, max_retries: int = 1
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise LabelStudioClientError(
                f"Label Studio URL must start with http:// or https://, got {url!r}"
            )
        from label_studio_sdk import LabelStudio
        from label_studio_sdk.core.api_error import ApiError

        self.url = url.rstrip("/")
        self._token = token
        try:
            self._sdk = LabelStudio(
                base_url=self.url, api_key=token.reveal(), timeout=timeout, max_retries=max_retries
            )
        except ApiError as exc:
            # The SDK refuses an expired personal access token before any request.
            raise self._error("setting up the client", exc) from None

    @classmethod
    def from_config(cls, labeling: Any) -> LabelStudioClient:
        """A client for `labeling.url` with the token named by `labeling.token_env` / `token_file`."""
        if not labeling.url:
            raise LabelStudioClientError(
                "labeling.url is not set: no Label Studio server configured"
            )
        from unifl.tracking.redaction import has_redacted_password

        if has_redacted_password(labeling.url):
            raise LabelStudioClientError(
                f"labeling.url {labeling.url}: credentials in the URL are not handed from step "
                f"to step; give the URL without them (the API token comes from "
                f"{labeling.token_env})"
            )
        token = resolve_token(labeling.token_env, labeling.token_file)
        return cls(labeling.url, token, timeout=labeling.request_timeout)

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r}, token={self._token!r})"

    @property
    def sdk(self) -> Any:
        """The underlying `label_studio_sdk.LabelStudio` client, for calls not wrapped here."""
        return self._sdk

    # -- error handling ---------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        token = self._token.reveal()
        return text.replace(token, "***") if token else text

    def _error(self, doing: str, exc: Exception) -> LabelStudioClientError:
        from label_studio_sdk.core.api_error import ApiError

        if isinstance(exc, ApiError):
            status = exc.status_code
            body = self._scrub(str(exc.body))[:500]
            if status in (401, 403):
                return LabelStudioClientError(
                    f"Label Studio at {self.url} refused the token from {self._token.source} "
                    f"(HTTP {status}) while {doing}: {body}. Check that the token is valid for this "
                    "server (personal access token, or legacy token with legacy tokens enabled)."
                )
            return LabelStudioClientError(
                f"Label Studio at {self.url} answered HTTP {status} while {doing}: {body}"
            )
        if isinstance(exc, httpx.TimeoutException):
            return LabelStudioClientError(f"Label Studio at {self.url} timed out while {doing}")
        if isinstance(exc, httpx.TransportError):
            return LabelStudioClientError(
                f"cannot reach Label Studio at {self.url} while {doing} "
                f"({type(exc).__name__}: {self._scrub(str(exc))}). Is the server running "
                "(`unifl labeling serve`) and labeling.url right?"
            )
        return LabelStudioClientError(
            f"Label Studio at {self.url}: {type(exc).__name__} while {doing}: {self._scrub(str(exc))}"
        )

    def _call(self, doing: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from label_studio_sdk.core.api_error import ApiError

        try:
            return function(*args, **kwargs)
        except (ApiError, httpx.HTTPError) as exc:
            raise self._error(doing, exc) from None

    # -- server and project -------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """The authenticated user ({id, email}); the cheapest check of URL and token."""
        user = self._call("checking the token", self._sdk.users.whoami)
        return {"id": user.id, "email": user.email}

    def find_projects(self, title: str) -> list[Any]:
        projects = self._call(
            f"listing projects titled {title!r}", lambda: list(self._sdk.projects.list(title=title))
        )
        return sorted((p for p in projects if p.title == title), key=lambda p: p.id)

    def ensure_project(
        self,
        title: str,
        label_config: str,
        *,
        description: str = "",
        instructions_html: str | None = None,
    ) -> ProjectSetup:
        """The project with `title`, created if missing, its config updated if it changed.

        With several projects of the same title the oldest is used.
        """
        existing = self.find_projects(title)
        options: dict[str, Any] = {"description": description}
        if instructions_html is not None:
            options.update(expert_instruction=instructions_html, show_instruction=True)
        if not existing:
            project = self._call(
                f"creating project {title!r}",
                self._sdk.projects.create,
                title=title,
                label_config=label_config,
                show_skip_button=True,
                **options,
            )
            return ProjectSetup(id=int(project.id), created=True, config_updated=False)
        project_id = int(existing[0].id)
        current = self._call(f"reading project {project_id}", self._sdk.projects.get, project_id)
        changed = canonical_label_config(current.label_config or "") != canonical_label_config(
            label_config
        )
        if changed or (
            instructions_html is not None and current.expert_instruction != instructions_html
        ):
            self._call(
                f"updating the labeling config of project {project_id}",
                self._sdk.projects.update,
                project_id,
                label_config=label_config,
                **options,
            )
        return ProjectSetup(id=project_id, created=False, config_updated=changed)

    # -- tasks ----------------------------------------------------------------------------

    def task_ids_by_pair(self, project_id: int) -> dict[str, int]:
        """`pair_id -> task id` of the tasks already in the project."""

        def collect() -> dict[str, int]:
            found: dict[str, int] = {}
            for task in self._sdk.tasks.list(project=project_id, page_size=500):
                pair_id = (task.data or {}).get(PAIR_ID_FIELD)
                if pair_id is not None:
                    found.setdefault(str(pair_id), int(task.id))
            return found

        return self._call(f"listing the tasks of project {project_id}", collect)

    def import_tasks(
        self, project_id: int, tasks: Sequence[dict[str, Any]], batch_size: int = 100
    ) -> ImportSummary:
        """Import tasks in batches, skipping pair ids the project already has."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        known = self.task_ids_by_pair(project_id)
        new_tasks = [t for t in tasks if str(t["data"][PAIR_ID_FIELD]) not in known]
        with tqdm(total=len(new_tasks), desc="importing tasks", unit="task", disable=None) as bar:
            for start in range(0, len(new_tasks), batch_size):
                batch = new_tasks[start : start + batch_size]
                response = self._call(
                    f"importing tasks {start}..{start + len(batch) - 1} into project {project_id}",
                    self._sdk.projects.import_tasks,
                    project_id,
                    request=batch,
                    return_task_ids=True,
                )
                ids = list(response.task_ids or [])
                if len(ids) != len(batch):
                    raise LabelStudioClientError(
                        f"Label Studio at {self.url} created {len(ids)} tasks for a batch of "
                        f"{len(batch)} in project {project_id}"
                    )
                for task, task_id in zip(batch, ids, strict=True):
                    known[str(task["data"][PAIR_ID_FIELD])] = int(task_id)
                bar.update(len(batch))
        return ImportSummary(
            imported=len(new_tasks),
            already_present=len(tasks) - len(new_tasks),
            task_ids_by_pair=known,
        )

    # -- storages ---------------------------------------------------------------------------

    def ensure_local_storage(self, project_id: int, path: str | Path, title: str = "pairs") -> int:
        """A Local Files import storage covering `path` (absolute, under the server's
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT); without one, /data/local-files/ answers 404."""
        path = str(Path(path).resolve())
        storages = self._call(
            f"listing local storages of project {project_id}",
            self._sdk.import_storage.local.list,
            project=project_id,
        )
        for storage in storages:
            if storage.path and Path(path).is_relative_to(str(storage.path)):
                return int(storage.id)
        storage = self._call(
            f"adding local storage {path} to project {project_id}",
            self._sdk.import_storage.local.create,
            project=project_id,
            path=path,
            title=title,
            use_blob_urls=False,
        )
        return int(storage.id)

    def ensure_s3_storage(
        self,
        project_id: int,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint: str | None = None,
        presign: bool = False,
        presign_ttl_minutes: int = 60,
        title: str = "pairs",
    ) -> int:
        """An S3-compatible import storage that resolves the tasks' s3:// URLs.

        With `presign` the annotators' browsers are redirected to presigned URLs
        of the storage endpoint, which they must be able to reach; without it
        Label Studio streams the images itself, which is what an in-cluster
        object store (not reachable from outside the cluster) needs.

        Keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN)
        when set; otherwise the server's own credentials (e.g. an IAM role) are used.
        """
        storages = self._call(
            f"listing S3 storages of project {project_id}",
            self._sdk.import_storage.s3.list,
            project=project_id,
        )
        for storage in storages:
            if storage.bucket == bucket and (storage.prefix or "") == prefix:
                return int(storage.id)
        options: dict[str, Any] = {
            "project": project_id,
            "bucket": bucket,
            "prefix": prefix,
            "presign": presign,
            "presign_ttl": presign_ttl_minutes,
            "use_blob_urls": False,
            "title": title,
        }
        if region:
            options["region_name"] = region
        if endpoint:
            options["s3endpoint"] = endpoint
        for option, env in (
            ("aws_access_key_id", "AWS_ACCESS_KEY_ID"),
            ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("aws_session_token", "AWS_SESSION_TOKEN"),
        ):
            if os.environ.get(env):
                options[option] = os.environ[env]
        storage = self._call(
            f"adding S3 storage s3://{bucket}/{prefix} to project {project_id}",
            self._sdk.import_storage.s3.create,
            **options,
        )
        return int(storage.id)

    # -- annotators and annotations ------------------------------------------------------------

    def ensure_user(self, email: str, first_name: str = "", last_name: str = "") -> int:
        """Id of the user with `email`, created (with a random, unused password) if missing.

        Label Studio Community lets an administrator create users through the API;
        they join the administrator's organization.
        """
        users = self._call("listing users", self._sdk.users.list)
        for user in users:
            if (user.email or "").lower() == email.lower():
                return int(user.id)
        user = self._call(
            f"creating user {email}",
            self._sdk.users.create,
            email=email,
            username=email.split("@")[0],
            first_name=first_name,
            last_name=last_name,
            password=secrets.token_urlsafe(24),
        )
        return int(user.id)

    def create_annotation(
        self,
        task_id: int,
        result: list[dict[str, Any]],
        *,
        completed_by: int | None = None,
        was_cancelled: bool = False,
        lead_time: float | None = None,
    ) -> int:
        """Post one annotation; `completed_by` records it as that user's (Community honours it)."""
        options: dict[str, Any] = {"result": result, "was_cancelled": was_cancelled}
        if completed_by is not None:
            options["completed_by"] = completed_by
        if lead_time is not None:
            options["lead_time"] = lead_time
        annotation = self._call(
            f"posting an annotation on task {task_id}",
            self._sdk.annotations.create,
            task_id,
            **options,
        )
        return int(annotation.id)

    def export_json(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks of the project with their annotations, in Label Studio's JSON export format."""
        data = self._call(
            f"exporting project {project_id}", self._sdk.projects.exports.as_json, project_id
        )
        if not isinstance(data, list):
            raise LabelStudioClientError(
                f"Label Studio at {self.url} returned a {type(data).__name__} for the JSON export "
                f"of project {project_id}, expected a list of tasks"
            )
        return data

    def image_status(self, url: str) -> int:
        """HTTP status of an image URL as the server serves it (relative URLs allowed)."""
        full = url if url.startswith(("http://", "https://")) else f"{self.url}{url}"
        headers = self._sdk._client_wrapper.get_headers()
        try:
            return httpx.get(full, headers=headers, timeout=30).status_code
        except httpx.HTTPError as exc:
            raise self._error(f"fetching {url}", exc) from None
