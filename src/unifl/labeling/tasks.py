"""The pair manifest (what pair generation writes) and its Label Studio tasks.

Pair generation writes, in its output directory, the images and one JSONL
manifest (`PAIR_MANIFEST_NAME`) with one row per pair; the row schema below is
the single definition that the writer and every reader share. Image paths are
relative to the directory holding the manifest, so the directory can move
(DVC, object storage) without rewriting the rows.

A Label Studio task carries the prompt and the two image URLs the interface
shows, the pair id, and the images' relative paths (so the export can be turned
back into a table of image paths whatever URL scheme served them). The sampler
settings travel in the task's `meta`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from unifl.io import atomic_path, split_lines
from unifl.labeling.label_config import IMAGE_A_FIELD, IMAGE_B_FIELD, PROMPT_FIELD

PAIR_MANIFEST_NAME = "pairs.jsonl"
"""File name of the pair manifest inside a pairs directory."""

PAIR_MANIFEST_FIELDS: dict[str, type] = {
    "pair_id": str,
    "prompt": str,
    "image_a": str,
    "image_b": str,
    "seed_a": int,
    "seed_b": int,
    "model_version": str,
    "steps": int,
    "guidance_scale": float,
    "timestep_spacing": str,
}
"""Every field of a manifest row with its type; all are required, no others allowed."""

PAIR_ID_FIELD = "pair_id"
IMAGE_A_PATH_FIELD = "image_a_path"
IMAGE_B_PATH_FIELD = "image_b_path"
TASK_META_FIELDS: tuple[str, ...] = (
    "seed_a",
    "seed_b",
    "model_version",
    "steps",
    "guidance_scale",
    "timestep_spacing",
)

LOCAL_FILES_PREFIX = "/data/local-files/?d="
"""How Label Studio serves a file under its LOCAL_FILES_DOCUMENT_ROOT."""


class PairManifestError(ValueError):
    """A pair manifest row is malformed; the message names file, line and field."""


def _check_relative_image_path(value: str, where: str, field: str) -> None:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise PairManifestError(
            f"{where}: field {field!r} must be a path relative to the pairs directory "
            f"without '..', got {value!r}"
        )


def validate_pair_row(row: Any, where: str) -> dict[str, Any]:
    """Check one manifest row against `PAIR_MANIFEST_FIELDS`; return it with exact types."""
    if not isinstance(row, dict):
        raise PairManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [name for name in PAIR_MANIFEST_FIELDS if name not in row]
    if missing:
        raise PairManifestError(f"{where}: missing fields {missing}")
    unknown = sorted(set(row) - set(PAIR_MANIFEST_FIELDS))
    if unknown:
        raise PairManifestError(f"{where}: unknown fields {unknown}")
    clean: dict[str, Any] = {}
    for name, kind in PAIR_MANIFEST_FIELDS.items():
        value = row[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise PairManifestError(
                f"{where}: field {name!r} must be {kind.__name__}, got {value!r}"
            )
        if kind is str and not value.strip():
            raise PairManifestError(f"{where}: field {name!r} is empty")
        if kind is float and not math.isfinite(value):
            raise PairManifestError(f"{where}: field {name!r} is not finite: {value!r}")
        clean[name] = value
    _check_relative_image_path(clean["image_a"], where, "image_a")
    _check_relative_image_path(clean["image_b"], where, "image_b")
    if clean["image_a"] == clean["image_b"]:
        raise PairManifestError(
            f"{where}: image_a and image_b are the same file {clean['image_a']!r}"
        )
    return clean


def read_pair_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a pair manifest (JSONL); errors name the file and line.

    `path` may be the manifest file or the pairs directory holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PAIR_MANIFEST_NAME
    if not path.is_file():
        raise PairManifestError(f"{path}: pair manifest not found")
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    try:
        lines = split_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PairManifestError(f"{path}: not UTF-8 text ({exc.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PairManifestError(f"{where}: not valid JSON: {exc.msg}") from None
        row = validate_pair_row(raw, where)
        if row["pair_id"] in seen:
            raise PairManifestError(
                f"{where}: duplicate pair_id {row['pair_id']!r} (first on line {seen[row['pair_id']]})"
            )
        seen[row["pair_id"]] = number
        rows.append(row)
    if not rows:
        raise PairManifestError(f"{path}: pair manifest has no rows")
    return rows


def write_pair_manifest(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Validate rows and write the manifest atomically; `path` may be the pairs directory."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / PAIR_MANIFEST_NAME
    clean = [validate_pair_row(row, f"{path}: row {index}") for index, row in enumerate(rows)]
    ids = [row["pair_id"] for row in clean]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise PairManifestError(f"{path}: duplicate pair_id {duplicate!r}")
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in clean:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def pair_image_paths(pairs_dir: str | Path, rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Every image of the manifest rows: relative path -> file under `pairs_dir`.

    A missing file is an error naming the row, the pair, the field and the path (and how
    many more are missing), so a half-copied pairs directory is never pushed.
    """
    base = Path(pairs_dir)
    files: dict[str, Path] = {}
    missing: list[str] = []
    for number, row in enumerate(rows, start=1):
        for field in ("image_a", "image_b"):
            relative = row[field]
            path = base / relative
            if not path.is_file():
                missing.append(
                    f"row {number} (pair {row['pair_id']!r}): {field} {relative!r} not found "
                    f"at {path}"
                )
            files[relative] = path
    if missing:
        more = f"; {len(missing) - 1} more images are missing" if len(missing) > 1 else ""
        raise PairManifestError(f"{base / PAIR_MANIFEST_NAME}: {missing[0]}{more}")
    return files


def local_files_url(path: str | Path, document_root: str | Path) -> str:
    """URL under which Label Studio's local-file serving shows `path`.

    `path` must lie inside `document_root` (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT).
    """
    absolute = Path(path).resolve()
    root = Path(document_root).resolve()
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        raise PairManifestError(
            f"{absolute} is outside the Label Studio document root {root}: "
            "set labeling.document_root to a directory that contains the pairs"
        ) from None
    return LOCAL_FILES_PREFIX + quote(relative.as_posix(), safe="/")


def s3_key(relative_path: str, prefix: str = "") -> str:
    """The object key of a pairs directory's file under `prefix` (no leading or double '/')."""
    return "/".join(part.strip("/") for part in (prefix, relative_path) if part.strip("/"))


def s3_url(relative_path: str, bucket: str, prefix: str = "") -> str:
    """`s3://bucket/prefix/relative_path`: Label Studio presigns it through an S3 storage."""
    return f"s3://{bucket}/{s3_key(relative_path, prefix)}"


def url_to_relative_path(url: str) -> str | None:
    """Best-effort path of an image from its URL (for exports of tasks we did not create):
    a local-files or cloud-storage URL's path; None for a URL that names no file (http,
    uploads)."""
    if url.startswith(LOCAL_FILES_PREFIX):
        return unquote(url[len(LOCAL_FILES_PREFIX) :])
    parts = urlsplit(url)
    if parts.scheme in ("s3", "gs", "azure-blob"):
        return parts.path.lstrip("/")
    if parts.scheme or url.startswith("/data/"):
        return None
    return url


def pair_rows_to_tasks(
    rows: Sequence[dict[str, Any]], image_url: Callable[[str], str]
) -> list[dict[str, Any]]:
    """Label Studio import tasks for manifest rows; `image_url` maps a relative path to a URL."""
    tasks = []
    for row in rows:
        data = {
            PROMPT_FIELD: row["prompt"],
            IMAGE_A_FIELD: image_url(row["image_a"]),
            IMAGE_B_FIELD: image_url(row["image_b"]),
            PAIR_ID_FIELD: row["pair_id"],
            IMAGE_A_PATH_FIELD: row["image_a"],
            IMAGE_B_PATH_FIELD: row["image_b"],
        }
        meta = {name: row[name] for name in TASK_META_FIELDS}
        tasks.append({"data": data, "meta": meta})
    return tasks
