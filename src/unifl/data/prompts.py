"""Prompt curation: ingest prompt files, normalise, filter, dedupe, select, write.

Input files are CSV, JSONL or Parquet with a `prompt` column; every other
column is metadata and is carried to the output. The output is a Parquet table
(`PROMPTS_FILE`) with `prompt_id` (a stable hash of the normalised text),
`prompt`, `semantic_score`, `source`, `source_row` and the metadata columns,
plus a JSON curation report (`REPORT_FILE`) with a count per filter, so that
nothing is dropped without being counted.

What is an error and what is a counted skip:

* Errors (the whole file is suspect; the message names file and line/row):
  a missing file, an unknown extension, an empty file or a file without data
  rows, bytes that are not UTF-8 (UTF-16 and Latin-1 files are named as such),
  NUL bytes, a line longer than `curate.max_line_chars`, malformed CSV/JSON,
  a CSV row with the wrong number of fields, a missing `prompt` column or key,
  a prompt value that is not text.
* Counted skips (one bad prompt among many; `dropped` in the report, the first
  reason that applies): `empty` (missing, NaN or blank after normalisation),
  `control_characters` (C0/C1 control characters left after whitespace
  normalisation, e.g. escape sequences or NULs inside Parquet strings),
  `too_many_chars`, `too_few_words`, `too_many_words`, `blocked_word`,
  `exact_duplicate`, then `semantic_filter`, `near_duplicate`,
  `similarity_compression` and `not_sampled` from active selection.

Normalisation is Unicode NFKC (full-width letters, ligatures and compatibility
forms become plain text), removal of invisible format characters (zero-width
spaces, soft hyphens, byte-order marks, direction marks), and collapsing every
run of whitespace, including tabs and newlines, to one space.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from unifl.config import CurateConfig
from unifl.data.scene_graph import SceneGraphParser, semantic_scores
from unifl.data.selection import (
    Embedder,
    SelectionReport,
    compress_and_sample,
    greedy_similarity_compression,
    normalize_embeddings,
)
from unifl.io import atomic_directory, check_output_apart, split_lines, write_json

PROMPT_COLUMN = "prompt"
PROMPTS_FILE = "prompts.parquet"
REPORT_FILE = "curation_report.json"
DERIVED_COLUMNS: tuple[str, ...] = ("prompt_id", "semantic_score", "source", "source_row")
"""Columns the curated table computes; input columns with these names are replaced."""

SKIP_REASONS: tuple[str, ...] = (
    "empty",
    "control_characters",
    "too_many_chars",
    "too_few_words",
    "too_many_words",
    "blocked_word",
    "exact_duplicate",
    "semantic_filter",
    "near_duplicate",
    "similarity_compression",
    "not_sampled",
)
MISSING_MARKERS = frozenset({"", "nan", "none", "null", "n/a", "na"})
"""Cell texts read as a missing prompt (pandas' usual NA spellings)."""

SUPPORTED_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".ndjson", ".parquet")


class PromptSourceError(ValueError):
    """A prompt file cannot be read; the message names the file and the line or row."""


class CurationError(ValueError):
    """Curation cannot produce a prompt set (e.g. every prompt was filtered out)."""


def normalize_prompt(text: str) -> str:
    """NFKC, invisible format characters removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(char for char in text if unicodedata.category(char) != "Cf")
    return " ".join(text.split())


def has_control_characters(text: str) -> bool:
    """True when a C0/C1 control character is left (whitespace is normalised first)."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def prompt_id(normalized_prompt: str) -> str:
    """Stable id of a normalised prompt: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(normalized_prompt.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- reading


def _decode_utf8(raw: bytes, path: Path) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PromptSourceError(f"{path}: the file is UTF-16 (byte-order mark); save it as UTF-8")
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise PromptSourceError(
            f"{path}: line {line}: NUL byte; the file is binary or UTF-16/32, not UTF-8 text"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - line_start + 1
        raise PromptSourceError(
            f"{path}: line {line}, column {column}: byte 0x{raw[exc.start]:02x} is not UTF-8 "
            "(Latin-1 or Windows-1252?); re-encode the file as UTF-8"
        ) from None


def _check_line_lengths(text: str, path: Path, max_line_chars: int) -> None:
    for number, line in enumerate(split_lines(text), start=1):
        if len(line) > max_line_chars:
            raise PromptSourceError(
                f"{path}: line {number} has {len(line)} characters, more than "
                f"curate.max_line_chars={max_line_chars}; the file is malformed "
                "(missing line breaks?) or the limit must be raised"
            )


def _read_text(path: Path, max_line_chars: int) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise PromptSourceError(f"{path}: the file is empty")
    text = _decode_utf8(raw, path)
    _check_line_lengths(text, path, max_line_chars)
    return text


def _prompt_value(value: Any, where: str) -> str | None:
    """A raw prompt cell: text, or None when missing; any other type is an error."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if not isinstance(value, str):
        raise PromptSourceError(
            f"{where}: column 'prompt' must be text, got {type(value).__name__} {value!r}"
        )
    return None if value.strip().lower() in MISSING_MARKERS else value


def _read_csv(path: Path, max_line_chars: int) -> tuple[pd.DataFrame, list[int]]:
    text = _read_text(path, max_line_chars)
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(max(previous_limit, max_line_chars + 1))
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except csv.Error as exc:
            raise PromptSourceError(f"{path}: line 1: malformed CSV header: {exc}") from None
        header = [name.strip() for name in header]
        if PROMPT_COLUMN not in header:
            raise PromptSourceError(f"{path}: missing column 'prompt' (the header has {header})")
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise PromptSourceError(f"{path}: line 1: duplicated columns {duplicated}")
        position = header.index(PROMPT_COLUMN)
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        line = reader.line_num
        while True:
            start_line = line + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise PromptSourceError(
                    f"{path}: line {reader.line_num}: malformed CSV: {exc}"
                ) from None
            line = reader.line_num
            if not row:
                continue  # a blank line is not a record
            if len(row) != len(header):
                raise PromptSourceError(
                    f"{path}: line {start_line}: {len(row)} fields, the header has {len(header)}"
                )
            record: dict[str, Any] = dict(zip(header, row, strict=True))
            record[PROMPT_COLUMN] = _prompt_value(row[position], f"{path}: line {start_line}")
            records.append(record)
            rows.append(start_line)
    finally:
        csv.field_size_limit(previous_limit)
    if not records:
        raise PromptSourceError(f"{path}: no data rows under the header")
    return pd.DataFrame.from_records(records, columns=header), rows


def _read_jsonl(path: Path, max_line_chars: int) -> tuple[pd.DataFrame, list[int]]:
    text = _read_text(path, max_line_chars)
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSourceError(f"{where}: not valid JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise PromptSourceError(f"{where}: expected a JSON object, got {type(value).__name__}")
        if PROMPT_COLUMN not in value:
            raise PromptSourceError(f"{where}: missing key 'prompt' (keys: {sorted(value)})")
        record = {
            key: (json.dumps(item, sort_keys=True) if isinstance(item, dict | list) else item)
            for key, item in value.items()
        }
        record[PROMPT_COLUMN] = _prompt_value(value[PROMPT_COLUMN], where)
        records.append(record)
        rows.append(number)
    if not records:
        raise PromptSourceError(f"{path}: no JSON rows")
    return pd.DataFrame.from_records(records), rows


def _read_parquet(path: Path) -> tuple[pd.DataFrame, list[int]]:
    try:
        frame = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PromptSourceError(f"{path}: not a readable Parquet file: {exc}") from None
    if PROMPT_COLUMN not in frame.columns:
        raise PromptSourceError(f"{path}: missing column 'prompt' (columns: {list(frame.columns)})")
    if frame.empty:
        raise PromptSourceError(f"{path}: the table has no rows")
    frame = frame.reset_index(drop=True)
    frame[PROMPT_COLUMN] = [
        _prompt_value(value, f"{path}: row {row}")
        for row, value in enumerate(frame[PROMPT_COLUMN].tolist(), start=1)
    ]
    return frame, list(range(1, len(frame) + 1))


def read_prompt_source(path: str | Path, max_line_chars: int = 100_000) -> pd.DataFrame:
    """Read one prompt file into `prompt` (raw text or None), `source`, `source_row`, metadata.

    `source_row` is the 1-based line (CSV: where the record starts; JSONL) or
    row (Parquet). Errors are `PromptSourceError`s naming file and line/row.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSourceError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame, rows = _read_csv(path, max_line_chars)
    elif suffix in (".jsonl", ".ndjson"):
        frame, rows = _read_jsonl(path, max_line_chars)
    elif suffix == ".parquet":
        frame, rows = _read_parquet(path)
    else:
        raise PromptSourceError(
            f"{path}: unsupported prompt file type {suffix!r} (expected {SUPPORTED_SUFFIXES})"
        )
    return _with_provenance(frame, str(path), rows)


def _with_provenance(frame: pd.DataFrame, source: str, rows: Sequence[int]) -> pd.DataFrame:
    """Add `source` and `source_row`; input columns named like derived ones are replaced."""
    replaced = [name for name in DERIVED_COLUMNS if name in frame.columns]
    frame = frame.drop(columns=replaced)
    frame["source"] = source
    frame["source_row"] = list(rows)
    frame.attrs["replaced_columns"] = replaced
    return frame


def prompts_frame(prompts: Sequence[str], source: str = "<memory>") -> pd.DataFrame:
    """A prompt source from a list of strings (e.g. the toy world's captions)."""
    return frame_source(pd.DataFrame({PROMPT_COLUMN: list(prompts)}), source)


def frame_source(frame: pd.DataFrame, source: str = "<dataframe>") -> pd.DataFrame:
    """A prompt source from an in-memory table, checked like a file (rows are 1-based)."""
    if PROMPT_COLUMN not in frame.columns:
        raise PromptSourceError(
            f"{source}: missing column 'prompt' (columns: {list(frame.columns)})"
        )
    if frame.empty:
        raise PromptSourceError(f"{source}: no prompts")
    frame = frame.reset_index(drop=True).copy()
    frame[PROMPT_COLUMN] = [
        _prompt_value(value, f"{source}: row {row}")
        for row, value in enumerate(frame[PROMPT_COLUMN].tolist(), start=1)
    ]
    return _with_provenance(frame, source, range(1, len(frame) + 1))


# --------------------------------------------------------------------------- cleaning


def _blocked_pattern(words: Sequence[str]) -> re.Pattern[str] | None:
    terms = [" ".join(normalize_prompt(word).casefold().split()) for word in words]
    terms = [term for term in terms if term]
    if not terms:
        return None
    alternatives = "|".join(re.escape(term) for term in sorted(set(terms), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def _skip_reason(
    text: str | None, config: CurateConfig, blocked: re.Pattern[str] | None
) -> str | None:
    if not text:
        return "empty"
    if has_control_characters(text):
        return "control_characters"
    if len(text) > config.max_chars:
        return "too_many_chars"
    words = len(text.split())
    if words < config.min_words:
        return "too_few_words"
    if words > config.max_words:
        return "too_many_words"
    if blocked is not None and blocked.search(text.casefold()):
        return "blocked_word"
    return None


def clean_prompts(frame: pd.DataFrame, config: CurateConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise, filter and drop exact duplicates (first occurrence kept).

    Returns the kept rows (with `prompt` normalised and `prompt_id` added) and
    a count per skip reason; the first failing filter is the one counted.
    """
    if config.min_words > config.max_words:
        raise CurationError(
            f"curate.min_words={config.min_words} is larger than max_words={config.max_words}"
        )
    blocked = _blocked_pattern(config.blocked_words)
    counts = {reason: 0 for reason in SKIP_REASONS}
    keep: list[bool] = []
    texts: list[str] = []
    ids: list[str] = []
    seen: set[str] = set()
    for raw in tqdm(
        frame[PROMPT_COLUMN].tolist(), desc="clean prompts", unit="prompt", leave=False
    ):
        text = normalize_prompt(raw) if isinstance(raw, str) else ""  # None/NaN: missing
        reason = _skip_reason(text, config, blocked)
        identifier = prompt_id(text) if reason is None else ""
        if reason is None and identifier in seen:
            reason = "exact_duplicate"
        if reason is not None:
            counts[reason] += 1
            keep.append(False)
            continue
        seen.add(identifier)
        keep.append(True)
        texts.append(text)
        ids.append(identifier)
    kept = frame.loc[keep].reset_index(drop=True)
    kept[PROMPT_COLUMN] = texts
    kept.insert(0, "prompt_id", ids)
    return kept, counts


def remove_near_duplicates(
    embeddings: torch.Tensor, threshold: float, block_size: int = 4096
) -> torch.Tensor:
    """Indices of rows kept when later rows within cosine `threshold` of a kept row are dropped.

    The first occurrence (input order) is kept; the same greedy walk as the
    similarity compression, without shuffling.
    """
    return (
        greedy_similarity_compression(normalize_embeddings(embeddings), threshold, None, block_size)
        .sort()
        .values
    )


# --------------------------------------------------------------------------- curation


@dataclass
class CurationReport:
    """What curation read, dropped (per reason) and wrote."""

    sources: list[dict[str, Any]]
    input_rows: int
    output_rows: int
    dropped: dict[str, int]
    near_duplicate_threshold: float
    active_selection: bool
    selection: dict[str, Any] | None = None
    replaced_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arrow_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns of mixed types become text so the Parquet schema is well defined."""
    for column in frame.columns:
        if frame[column].dtype != object or column == PROMPT_COLUMN:
            continue
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    return frame


def load_prompt_sources(
    sources: Sequence[str | Path | pd.DataFrame], max_line_chars: int
) -> tuple[pd.DataFrame, list[dict[str, Any]], list[str]]:
    """Read every source; return the combined table, per-source row counts, replaced columns."""
    if not sources:
        raise CurationError("no prompt sources given")
    frames: list[pd.DataFrame] = []
    summary: list[dict[str, Any]] = []
    replaced: set[str] = set()
    for source in sources:
        if isinstance(source, pd.DataFrame):
            # Frames from `frame_source`/`prompts_frame` are already checked.
            checked = "replaced_columns" in source.attrs
            frame = source if checked else frame_source(source)
        else:
            frame = read_prompt_source(source, max_line_chars)
        replaced.update(frame.attrs.get("replaced_columns", []))
        summary.append({"source": str(frame["source"].iloc[0]), "rows": len(frame)})
        frames.append(frame)
    combined = pd.concat(frames, ignore_index=True, sort=False)
    return combined, summary, sorted(replaced)


def curate_prompts(
    sources: Sequence[str | Path | pd.DataFrame],
    out_dir: str | Path,
    config: CurateConfig,
    seed: int,
    embed: Embedder | None,
    parser: SceneGraphParser | None = None,
    show_progress: bool = True,
) -> CurationReport:
    """Curate prompt files into `out_dir/prompts.parquet` and `out_dir/curation_report.json`.

    Steps: read and combine the sources, normalise and filter, drop exact
    duplicates, score scene graphs (drop below `tau1` when `active_selection`),
    embed with `embed`, drop near-duplicates (cosine above
    `near_duplicate_threshold`, first occurrence kept), then, when
    `active_selection`, compress at `tau2` and sample `num_prompts` with
    `seed`. The directory is written whole or not at all.
    """
    raw, summary, replaced = load_prompt_sources(sources, config.max_line_chars)
    frame, dropped = clean_prompts(raw, config)
    frame["semantic_score"] = semantic_scores(frame[PROMPT_COLUMN].tolist(), parser)
    if config.active_selection:
        passing = frame["semantic_score"] >= config.tau1
        dropped["semantic_filter"] = int((~passing).sum())
        frame = frame.loc[passing].reset_index(drop=True)
    selection: dict[str, Any] | None = None
    if len(frame) > 0:
        if embed is None:
            raise CurationError("curation needs an embedder for near-duplicate removal")
        embeddings = normalize_embeddings(embed(frame[PROMPT_COLUMN].tolist()), "embed(prompts)")
        if embeddings.shape[0] != len(frame):
            raise CurationError(
                f"embed returned {embeddings.shape[0]} rows for {len(frame)} prompts"
            )
        unique = remove_near_duplicates(
            embeddings, config.near_duplicate_threshold, config.block_size
        )
        dropped["near_duplicate"] = len(frame) - int(unique.shape[0])
        frame = frame.iloc[unique.numpy()].reset_index(drop=True)
        embeddings = embeddings[unique]
        if config.active_selection:
            chosen, stats = compress_and_sample(embeddings, config, seed, show_progress)
            dropped["similarity_compression"] = stats["compressed_dropped"]
            dropped["not_sampled"] = stats["kept_after_compression"] - int(chosen.shape[0])
            frame = frame.iloc[chosen.numpy()].reset_index(drop=True)
            selection = SelectionReport(
                input_prompts=int(embeddings.shape[0]) + dropped["semantic_filter"],
                semantic_dropped=dropped["semantic_filter"],
                **stats,
            ).to_dict()
    if frame.empty:
        raise CurationError(
            f"no prompts left after curation of {len(raw)} rows; dropped per reason: "
            + ", ".join(f"{k}={v}" for k, v in dropped.items() if v)
        )
    ordered = ["prompt_id", PROMPT_COLUMN, "semantic_score", "source", "source_row"]
    frame = frame[ordered + [c for c in frame.columns if c not in ordered]]
    frame = _arrow_safe(frame)
    report = CurationReport(
        sources=summary,
        input_rows=len(raw),
        output_rows=len(frame),
        dropped=dropped,
        near_duplicate_threshold=config.near_duplicate_threshold,
        active_selection=config.active_selection,
        selection=selection,
        replaced_columns=replaced,
    )
    with atomic_directory(out_dir) as tmp:
        frame.to_parquet(tmp / PROMPTS_FILE, index=False)
        write_json(tmp / REPORT_FILE, report.to_dict())
    return report


def read_prompts(path: str | Path) -> pd.DataFrame:
    """Read a curated prompt table (the file or its directory); checks the key columns."""
    path = Path(path)
    if path.is_dir():
        path = path / PROMPTS_FILE
    if not path.is_file():
        raise PromptSourceError(f"{path}: curated prompt table not found")
    frame = pd.read_parquet(path)
    missing = [name for name in ("prompt_id", PROMPT_COLUMN) if name not in frame.columns]
    if missing:
        raise PromptSourceError(f"{path}: missing columns {missing}")
    return frame


def run_curate_stage(
    params: Any,
    sources: Sequence[str | Path],
    model_source: str | Path,
    out_dir: str | Path,
    show_progress: bool = True,
) -> CurationReport:
    """The `curate` stage: load the base model's text encoder, then `curate_prompts`.

    Without `sources` the embedded default is used: `curate.toy_prompts`
    synthetic toy-world captions drawn with `project.seed`. Device and
    precision follow `params.project`.
    """
    from unifl.data.selection import base_model_embedder
    from unifl.data.toy_prompts import toy_prompts
    from unifl.models.base import load_base_model
    from unifl.models.precision import precision_from_config

    check_output_apart(out_dir, [*sources, model_source])
    config: CurateConfig = params.curate
    seed = int(params.project.seed)
    inputs: list[str | Path | pd.DataFrame] = list(sources)
    if not inputs:
        captions = toy_prompts(config.toy_prompts, seed, bare_fraction=0.1)
        inputs = [prompts_frame(captions, source=f"<toy prompts seed={seed}>")]
    device, dtype, vae_dtype = precision_from_config(params.project)
    model = load_base_model(
        model_source, params.model.family, device=device, dtype=dtype, vae_dtype=vae_dtype
    )
    embed = base_model_embedder(model, config.embed_batch_size, show_progress)
    return curate_prompts(inputs, out_dir, config, seed, embed, show_progress=show_progress)
