"""Keep secrets out of MLflow: params and tags are visible to everyone who can open the UI.

Three checks, applied to every key/value pair before it is logged:

* a key that names a secret (``password``, ``token``, ``api_key``, ``secret`` ...) is dropped,
  except keys ending in ``_env`` which hold the *name* of an environment variable;
* a value that contains the value of a secret-named environment variable, or that looks like
  a well-known token format (JWT, GitHub, Hugging Face, AWS, Slack, OpenAI-style keys,
  ``Bearer ...``), is dropped;
* a URL with embedded credentials keeps its host but loses the password.

Dropped keys are reported by name only, never with their value.

The same URL redaction applies to everything else that leaves the process as text: the
resolved configuration (`safe_params_yaml`: the run's `config/params.yaml` artifact, the
pipelines' `params_yaml` outputs and compiled defaults, `unifl config show`), log lines and
error messages that name a URI. A redacted URL keeps the user name and shows the password
as ``***``; a step that receives one takes the credentials from the environment instead
(`unifl.tracking.runs.client_tracking_uri`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from unifl.config import Params

logger = logging.getLogger(__name__)

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"(pass(word|wd|phrase)|secret|(^|[^a-z])token($|[^a-z])|api[_-]?key|access[_-]?key"
    r"|private[_-]?key|credential|authorization|cookie|session[_-]?id)",
    re.IGNORECASE,
)
_ENV_NAME_KEY = re.compile(r"(_env|\.env|_env_var|_variable)$", re.IGNORECASE)

_TOKEN_FORMATS = re.compile(
    r"(eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style secret keys
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|(Bearer|Token|Basic)\s+[A-Za-z0-9._~+/=-]{16,})"
)
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]+:)[^/@\s]+@")

_MIN_SECRET_LENGTH = 6
"""Environment values shorter than this are too common to search for ("true", "1")."""


def is_secret_key(key: str) -> bool:
    """Whether a key's name says it holds a secret (``labeling.token_env`` does not: a name)."""
    leaf = key.rsplit(".", 1)[-1]
    if _ENV_NAME_KEY.search(leaf):
        return False
    return bool(_SECRET_KEY.search(leaf))


def secret_environment_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the environment variables whose names say they hold a secret."""
    environ = os.environ if environ is None else environ
    return {
        value
        for name, value in environ.items()
        if _SECRET_KEY.search(name) and len(value) >= _MIN_SECRET_LENGTH
    }


def redact_url_credentials(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, wherever in `text`."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)


def has_redacted_password(url: str) -> bool:
    """Whether `url` is a URL whose password was redacted (``user:***@``)."""
    head = url.split("://", 1)
    return len(head) == 2 and f":{REDACTED}@" in head[1].split("/", 1)[0]


def without_url_credentials(url: str) -> str:
    """``scheme://user:password@host/path`` -> ``scheme://host/path``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def safe_params_yaml(params: Params, sections: Sequence[str] | None = None) -> str:
    """The configuration (or only its `sections`) as YAML text with URL credentials redacted.

    What every exported or logged copy of the configuration is made of. `params_to_yaml`
    stays the lossless form for in-process round trips.
    """
    import yaml

    from unifl.config import params_to_yaml

    if sections is None:
        text = params_to_yaml(params)
    else:
        data = params.model_dump(mode="json")
        text = yaml.safe_dump({name: data[name] for name in sections}, sort_keys=False)
    return redact_url_credentials(text)


def looks_secret(value: str, known_secrets: set[str] | None = None) -> bool:
    """Whether a value is, or contains, a secret."""
    known = secret_environment_values() if known_secrets is None else known_secrets
    if any(secret in value for secret in known):
        return True
    return bool(_TOKEN_FORMATS.search(value))


def filter_secrets(
    values: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The pairs that are safe to log, as strings; secret ones are dropped (named in a warning)."""
    known = secret_environment_values(environ)
    safe: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if is_secret_key(key) or looks_secret(text, known):
            dropped.append(key)
            continue
        safe[key] = redact_url_credentials(text)
    if dropped:
        logger.warning("not logged to MLflow (secret-looking): %s", ", ".join(sorted(dropped)))
    return safe


def flatten_params(params: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as ``section.key`` (dicts recurse, lists stay whole)."""
    data = params.model_dump(mode="json") if isinstance(params, BaseModel) else dict(params)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def safe_params(params: BaseModel | Mapping[str, Any]) -> dict[str, str]:
    """Flattened parameters without secrets, ready for ``log_params``."""
    return filter_secrets(flatten_params(params))
