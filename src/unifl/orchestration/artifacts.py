"""What the pipeline's artifacts hold and how data outputs are versioned with DVC.

A model artifact is either a model directory (a diffusers model, a reward model, the toy
segmenter) or, for a model the pods load from elsewhere (a hub id, a path on a mounted
volume), a small reference file naming it: copying a 5 GB production checkpoint into every
run's artifact store would be waste. `model_source(path)` turns either into what the
loaders accept.

Data outputs (curated prompts, pairs, labels) get their DVC hash, the same `md5` a
`dvc add` of the directory records, computed by DVC itself in a scratch repository; with
a remote configured they are pushed there, so `dvc pull` with that hash brings them back
anywhere. The hash goes into the artifact's metadata and the MLflow lineage tags.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from unifl.io import atomic_directory, write_json

REFERENCE_FILE = "model_reference.json"
"""Inside a model artifact that points at a model instead of holding it."""


class ArtifactError(ValueError):
    """An artifact is missing or does not hold what the step expects; names the path."""


def write_model_reference(directory: str | Path, source: str, kind: str = "model") -> Path:
    """Make `directory` an artifact that names `source` (hub id or path) instead of a copy."""
    with atomic_directory(directory) as tmp:
        write_json(tmp / REFERENCE_FILE, {"source": source, "kind": kind})
    return Path(directory)


def model_source(directory: str | Path) -> str | None:
    """What a loader should open for a model artifact: the directory, or the referenced source.

    Returns None for an empty reference (a model that this run does not have, e.g. the toy
    segmenter when the base model is a production checkpoint).
    """
    path = Path(directory)
    reference = path / REFERENCE_FILE
    if reference.is_file():
        try:
            source = json.loads(reference.read_text(encoding="utf-8"))["source"]
        except (json.JSONDecodeError, KeyError):
            raise ArtifactError(f"{reference}: not a model reference") from None
        return source or None
    if not path.exists():
        raise ArtifactError(f"model artifact {path} does not exist")
    return str(path)


def copy_directory(source: str | Path, target: str | Path, ignore: tuple[str, ...] = ()) -> Path:
    """Copy a directory into an artifact path, whole or not at all (hard links when possible)."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise ArtifactError(f"{source}: no such directory")

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_directory(target) as tmp:
        shutil.copytree(
            source,
            tmp,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(*ignore) if ignore else None,
            copy_function=link_or_copy,
        )
    return target


@dataclass(frozen=True)
class DvcRecord:
    """A directory's DVC version: the `.dir` md5 a `dvc add` records, and where it was pushed."""

    md5: str
    nfiles: int
    size: int
    remote: str | None

    def metadata(self) -> dict[str, object]:
        return {f"dvc_{key}": value for key, value in asdict(self).items() if value is not None}


def dvc_track(path: str | Path, remote: str | None = None) -> DvcRecord:
    """DVC-hash a directory (or file) and push it to `remote` when given.

    The scratch repository lives in a temporary directory and holds hard links (or copies)
    of the files, so the artifact itself is left alone. A remote is a URL DVC understands
    (a directory, s3://... with dvc-s3 installed); its credentials come from the usual
    environment (AWS_* from the Secret), never from the configuration: a remote URL whose
    password was redacted (the configuration a step receives) is refused. The record names
    the remote without credentials.
    """
    from dvc.repo import Repo

    from unifl.tracking.redaction import has_redacted_password, redact_url_credentials

    source = Path(path)
    if not source.exists():
        raise ArtifactError(f"{source}: nothing to version")
    if remote and has_redacted_password(remote):
        raise ArtifactError(
            f"DVC remote {remote}: credentials in the URL are not handed from step to step; "
            "use a remote whose credentials come from the environment (s3:// with "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the unifl-s3-credentials Secret)"
        )
    with tempfile.TemporaryDirectory(prefix="unifl-dvc-") as tmp:
        root = Path(tmp)
        repo = Repo.init(str(root), no_scm=True)
        try:
            data = root / source.name
            if source.is_dir():
                copy_directory(source, data)
            else:
                shutil.copy2(source, data)
            stage = repo.add(str(data))[0]
            out = stage.outs[0]
            if remote:
                with repo.config.edit() as config:
                    config["remote"]["pipeline"] = {"url": remote}
                repo.push(remote="pipeline")
            return DvcRecord(
                md5=str(out.hash_info.value),
                nfiles=int(out.meta.nfiles or (0 if source.is_dir() else 1)),
                size=int(out.meta.size or 0),
                remote=redact_url_credentials(remote) if remote else None,
            )
        finally:
            repo.close()
