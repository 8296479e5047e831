"""Where a run's inputs came from: git commit, DVC content hashes, Label Studio ids.

These end up as run tags (``unifl.lineage.*``) so a registered model can be traced back to
the exact data and labels it was trained on, and ``dvc checkout`` / the Label Studio export
can bring them back.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

GIT_COMMIT_ENV = "UNIFL_GIT_COMMIT"
"""Set in container images built without `.git` so runs still name their commit."""

LINEAGE_PREFIX = "unifl.lineage."


class LineageError(ValueError):
    """A lineage file (dvc.lock, .dvc) cannot be read; the message names it."""


def _git(args: list[str], cwd: str | Path | None) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the working tree (``$UNIFL_GIT_COMMIT`` first); none outside git."""
    from_env = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if from_env:
        return from_env
    return _git(["rev-parse", "HEAD"], cwd) or None


def git_is_dirty(cwd: str | Path | None = None) -> bool | None:
    """Whether tracked files differ from the commit; none outside git."""
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return None if status is None else bool(status)


def _outs_hashes(entries: Any, source: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    if entries is None:
        return hashes
    if not isinstance(entries, list):
        raise LineageError(f"{source}: 'outs'/'deps' must be a list")
    for number, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise LineageError(f"{source}: entry {number} has no 'path'")
        digest = entry.get("md5") or entry.get("etag") or entry.get("checksum")
        if digest:
            hashes[str(entry["path"])] = str(digest)
    return hashes


def dvc_lock_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """``path -> md5`` of every dependency and output recorded in a ``dvc.lock``."""
    path = Path(lock_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LineageError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise LineageError(f"{path}: not valid YAML: {exc}") from None
    stages = data.get("stages") if isinstance(data, Mapping) else None
    if not isinstance(stages, Mapping):
        raise LineageError(f"{path}: no 'stages' mapping (is it a dvc.lock?)")
    hashes: dict[str, str] = {}
    for name, stage in stages.items():
        if not isinstance(stage, Mapping):
            raise LineageError(f"{path}: stage {name!r} is not a mapping")
        hashes.update(_outs_hashes(stage.get("deps"), path))
        hashes.update(_outs_hashes(stage.get("outs"), path))
    return hashes


def dvc_file_hashes(dvc_file: str | Path) -> dict[str, str]:
    """``path -> md5`` of the outputs tracked by one ``.dvc`` file (paths as in the repo)."""
    path = Path(dvc_file)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LineageError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise LineageError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise LineageError(f"{path}: not a .dvc file")
    outs = _outs_hashes(data.get("outs"), path)
    base = path.parent
    return {(base / out).as_posix(): digest for out, digest in outs.items()}


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents (order-independent)."""
    target = Path(path)
    digest = hashlib.sha256()
    if target.is_file():
        files = [(target.name, target)]
    elif target.is_dir():
        files = sorted(
            (p.relative_to(target).as_posix(), p) for p in target.rglob("*") if p.is_file()
        )
    else:
        raise LineageError(f"{target}: no such file or directory")
    for relative, file in files:
        digest.update(relative.encode())
        digest.update(b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def lineage_tags(
    dvc_hashes: Mapping[str, str] | None = None,
    label_studio_project_id: str | int | None = None,
    label_studio_export_id: str | int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Run tags naming the data versions: ``unifl.lineage.dvc.<path>`` and Label Studio ids."""
    tags: dict[str, str] = {}
    for data_path, digest in (dvc_hashes or {}).items():
        tags[f"{LINEAGE_PREFIX}dvc.{data_path}"] = str(digest)
    if label_studio_project_id is not None:
        tags[f"{LINEAGE_PREFIX}label_studio.project_id"] = str(label_studio_project_id)
    if label_studio_export_id is not None:
        tags[f"{LINEAGE_PREFIX}label_studio.export_id"] = str(label_studio_export_id)
    for key, value in (extra or {}).items():
        tags[f"{LINEAGE_PREFIX}{key}"] = str(value)
    return tags
