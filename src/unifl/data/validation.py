"""Great Expectations suites for the datasets the pipeline trusts: prompts, preferences, evaluations.

A stage that hands data on validates it first: `validate(kind, table, out_dir)`
runs the suite of `kind` on an ephemeral GX context (pandas data source, whole
dataframe as one batch), writes the GX Data Docs site, a self-contained HTML
summary and a JSON result into `out_dir` (always, pass or fail, so the report
is an artifact either way), and raises `DataValidationError` on failure with a
message naming each failing expectation, its column and example rows.

Suites (kinds):

* ``prompts`` (a curated prompt table): at least one row; `prompt_id` and
  `prompt` present and non-null; prompt lengths within bounds; unique
  `prompt_id`; no control characters in `prompt`.
* ``pairs`` (`unifl.data.preferences.PAIR_COLUMNS`): every column present;
  `dimension` in the known dimensions; `weight` in [0, 1]; `num_votes` at
  least `min_annotators`; no self-pairs; both images exist and decode.
* ``votes`` (`VOTE_COLUMNS`): `dimension` and `choice` in their sets; at least
  `min_annotators` distinct annotators per task; no self-pairs; images decode.
* ``evaluation``: the expected columns are present; every numeric column is
  non-null and finite.

GX checks columns, not files, so the file checks become helper columns that
are computed before validation (`image_w_readable`, `is_self_pair`,
`task_annotators`, ...) and validated like any other column; the report lists
them under their own names.

Great Expectations is imported inside `validate` (it takes seconds to import)
with its usage statistics switched off.
"""

from __future__ import annotations

import html
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tqdm.auto import tqdm

from unifl.data.preferences import CHOICES, PAIR_COLUMNS, VALID_DIMENSIONS, VOTE_COLUMNS
from unifl.io import atomic_directory, check_output_apart, write_json, write_text

ValidationKind = Literal["prompts", "pairs", "votes", "evaluation"]
VALIDATION_KINDS: tuple[str, ...] = ("prompts", "pairs", "votes", "evaluation")
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
"""C0 and C1 control characters, as a regular expression."""
LARGEST_FLOAT = 1.7976931348623157e308
SUMMARY_FILE = "validation_report.html"
RESULT_FILE = "validation_result.json"
DATA_DOCS_DIR = "data_docs"
MAX_EXAMPLES = 5


class DataValidationError(ValueError):
    """A table failed its expectation suite; `result` holds every expectation's outcome."""

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


class TableReadError(ValueError):
    """The table to validate cannot be read; the message names the file."""


@dataclass
class ValidationOptions:
    """Thresholds of the suites (see `options_from_params` for the configured values)."""

    min_prompt_chars: int = 1
    max_prompt_chars: int = 1000
    min_annotators: int = 1
    image_root: str | Path | None = None
    expected_columns: Sequence[str] | None = None


@dataclass
class ExpectationOutcome:
    """One expectation's verdict with up to `MAX_EXAMPLES` offending rows."""

    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    element_count: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def describe(self) -> str:
        where = f" on column {self.column!r}" if self.column else ""
        if self.error:
            return f"{self.expectation}{where}: could not be evaluated: {self.error}"
        if self.expectation == "expect_column_to_exist":
            return f"{self.expectation}: column {self.column!r} is missing"
        if self.expectation == "expect_table_row_count_to_be_between":
            return f"{self.expectation}: the table has {self.element_count} rows"
        text = (
            f"{self.expectation}{where}: {self.unexpected_count} of {self.element_count} rows fail"
        )
        if self.examples:
            text += "; e.g. " + "; ".join(
                json.dumps(example, default=str, ensure_ascii=False) for example in self.examples
            )
        return text


@dataclass
class ValidationResult:
    """The outcome of one suite run and where its reports were written."""

    kind: str
    source: str
    success: bool
    rows: int
    evaluated: int
    failed: int
    outcomes: list[ExpectationOutcome]
    report_html: str
    data_docs_index: str | None

    def failures(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]

    def message(self) -> str:
        lines = [
            f"validation of {self.kind} table {self.source} failed: "
            f"{self.failed} of {self.evaluated} expectations ({self.rows} rows)"
        ]
        lines += [f"  - {outcome.describe()}" for outcome in self.failures()]
        lines.append(f"  report: {self.report_html}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def options_from_params(params: Any, image_root: str | Path | None = None) -> ValidationOptions:
    """Suite thresholds from the configuration (`curate` and `labeling` sections)."""
    return ValidationOptions(
        min_prompt_chars=1,
        max_prompt_chars=params.curate.max_chars,
        min_annotators=params.labeling.min_annotators,
        image_root=image_root,
    )


# --------------------------------------------------------------------------- helper columns


def image_decodes(path: Path) -> bool:
    """True when `path` is a file that PIL can fully decode (truncated files fail)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False
    return True


def _image_readable_columns(
    frame: pd.DataFrame, columns: Iterable[str], image_root: Path
) -> pd.DataFrame:
    present = [column for column in columns if column in frame.columns]
    paths = {value for column in present for value in frame[column].dropna().astype(str)}
    readable: dict[str, bool] = {}
    for value in tqdm(sorted(paths), desc="check images", unit="image", leave=False):
        path = Path(value)
        readable[value] = image_decodes(path if path.is_absolute() else image_root / path)
    for column in present:
        frame[f"{column}_readable"] = [
            readable.get(str(value), False) if pd.notna(value) else False for value in frame[column]
        ]
    return frame


def _self_pair_column(frame: pd.DataFrame, first: str, second: str) -> pd.DataFrame:
    if first in frame.columns and second in frame.columns:
        frame["is_self_pair"] = (frame[first].astype(str) == frame[second].astype(str)).tolist()
    return frame


# --------------------------------------------------------------------------- suites


@dataclass
class _Suite:
    """The expectations of one kind, as (GX class name, kwargs) pairs, plus helper columns."""

    required_columns: list[str]
    expectations: list[tuple[str, dict[str, Any]]]
    key_columns: list[str]


def _prompt_suite(frame: pd.DataFrame, options: ValidationOptions) -> _Suite:
    expectations: list[tuple[str, dict[str, Any]]] = [
        ("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        ("ExpectColumnValuesToNotBeNull", {"column": "prompt_id"}),
        ("ExpectColumnValuesToNotBeNull", {"column": "prompt"}),
        ("ExpectColumnValuesToBeUnique", {"column": "prompt_id"}),
        (
            "ExpectColumnValueLengthsToBeBetween",
            {
                "column": "prompt",
                "min_value": options.min_prompt_chars,
                "max_value": options.max_prompt_chars,
            },
        ),
        ("ExpectColumnValuesToNotMatchRegex", {"column": "prompt", "regex": CONTROL_CHARACTERS}),
    ]
    return _Suite(["prompt_id", "prompt"], expectations, ["prompt_id", "prompt"])


def _pair_suite(frame: pd.DataFrame, options: ValidationOptions, root: Path) -> _Suite:
    _image_readable_columns(frame, ("image_w", "image_l"), root)
    _self_pair_column(frame, "image_w", "image_l")
    expectations: list[tuple[str, dict[str, Any]]] = [
        ("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        *[
            ("ExpectColumnValuesToNotBeNull", {"column": column})
            for column in ("task_id", "prompt", "image_w", "image_l", "dimension")
        ],
        (
            "ExpectColumnValuesToBeInSet",
            {"column": "dimension", "value_set": list(VALID_DIMENSIONS)},
        ),
        ("ExpectColumnValuesToBeBetween", {"column": "weight", "min_value": 0, "max_value": 1}),
        (
            "ExpectColumnValuesToBeBetween",
            {"column": "num_votes", "min_value": options.min_annotators},
        ),
        ("ExpectColumnValuesToBeInSet", {"column": "is_self_pair", "value_set": [False]}),
        ("ExpectColumnValuesToBeInSet", {"column": "image_w_readable", "value_set": [True]}),
        ("ExpectColumnValuesToBeInSet", {"column": "image_l_readable", "value_set": [True]}),
    ]
    return _Suite(list(PAIR_COLUMNS), expectations, ["task_id", "dimension"])


def _vote_suite(frame: pd.DataFrame, options: ValidationOptions, root: Path) -> _Suite:
    _image_readable_columns(frame, ("image_a", "image_b"), root)
    _self_pair_column(frame, "image_a", "image_b")
    if "task_id" in frame.columns and "annotator" in frame.columns:
        frame["task_annotators"] = frame.groupby("task_id")["annotator"].transform("nunique")
    expectations: list[tuple[str, dict[str, Any]]] = [
        ("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        *[
            ("ExpectColumnValuesToNotBeNull", {"column": column})
            for column in ("task_id", "annotator", "image_a", "image_b", "dimension", "choice")
        ],
        (
            "ExpectColumnValuesToBeInSet",
            {"column": "dimension", "value_set": list(VALID_DIMENSIONS)},
        ),
        ("ExpectColumnValuesToBeInSet", {"column": "choice", "value_set": list(CHOICES)}),
        (
            "ExpectColumnValuesToBeBetween",
            {"column": "task_annotators", "min_value": options.min_annotators},
        ),
        ("ExpectColumnValuesToBeInSet", {"column": "is_self_pair", "value_set": [False]}),
        ("ExpectColumnValuesToBeInSet", {"column": "image_a_readable", "value_set": [True]}),
        ("ExpectColumnValuesToBeInSet", {"column": "image_b_readable", "value_set": [True]}),
    ]
    return _Suite(list(VOTE_COLUMNS), expectations, ["task_id", "annotator", "dimension"])


def _evaluation_suite(frame: pd.DataFrame, options: ValidationOptions) -> _Suite:
    expected = list(options.expected_columns or [])
    numeric = [
        column
        for column in frame.columns
        if pd.api.types.is_numeric_dtype(frame[column])
        and not pd.api.types.is_bool_dtype(frame[column])
    ]
    expectations: list[tuple[str, dict[str, Any]]] = [
        ("ExpectTableRowCountToBeBetween", {"min_value": 1})
    ]
    for column in numeric:
        expectations.append(("ExpectColumnValuesToNotBeNull", {"column": column}))
        expectations.append(
            (
                "ExpectColumnValuesToBeBetween",
                {"column": column, "min_value": -LARGEST_FLOAT, "max_value": LARGEST_FLOAT},
            )
        )
    keys = [c for c in ("prompt_id", "prompt", "model", "steps") if c in frame.columns]
    return _Suite(expected, expectations, keys)


# --------------------------------------------------------------------------- running


def _load_table(table: pd.DataFrame | str | Path) -> tuple[pd.DataFrame, str, Path | None]:
    if isinstance(table, pd.DataFrame):
        return table.reset_index(drop=True).copy(), "<dataframe>", None
    path = Path(table)
    if path.is_dir():
        candidates = sorted(path.glob("*.parquet"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"{path}: expected exactly one .parquet table in the directory, "
                f"found {[c.name for c in candidates]}"
            )
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table to validate not found")
    try:
        frame = _read_table_file(path)
    except pd.errors.ParserWarning:
        raise TableReadError(f"{path}: a row has more fields than the header names") from None
    except (ValueError, OSError) as exc:  # parse, decoding and Arrow errors
        raise TableReadError(f"{path}: cannot be read as a table: {str(exc).strip()}") from None
    return frame.reset_index(drop=True), str(path), path.parent


def _read_table_file(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # index_col=False: a trailing comma on every row (as spreadsheets write) is not
        # read as an index column that shifts the others; a row with more values than
        # the header is an error instead of data dropped without a word.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, index_col=False)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def _examples(
    frame: pd.DataFrame, rows: Sequence[Any], column: str | None, keys: Sequence[str]
) -> list[dict[str, Any]]:
    shown = [c for c in dict.fromkeys([*keys, *([column] if column else [])]) if c in frame]
    examples = []
    for row in list(rows)[:MAX_EXAMPLES]:
        values = {"row": int(row)}
        for name in shown:
            value = frame.at[row, name]
            value = value.item() if hasattr(value, "item") else value
            plain = isinstance(value, str | int | float | bool) or value is None
            values[name] = value if plain else str(value)
        examples.append(values)
    return examples


def _outcome(result: Any, frame: pd.DataFrame, keys: Sequence[str]) -> ExpectationOutcome:
    config = result.expectation_config
    column = config.kwargs.get("column")
    details = result.result or {}
    error = None
    info = result.exception_info or {}
    if info.get("raised_exception"):
        error = info.get("exception_message")
    else:
        for value in info.values():
            if isinstance(value, dict) and value.get("raised_exception"):
                error = value.get("exception_message")
                break
    unexpected = details.get("unexpected_index_list") or []
    if config.type == "expect_table_row_count_to_be_between":
        count = int(details.get("observed_value", len(frame)) or 0)
        return ExpectationOutcome(
            config.type, None, bool(result.success), 0 if result.success else 1, count, [], error
        )
    return ExpectationOutcome(
        expectation=config.type,
        column=column,
        success=bool(result.success),
        unexpected_count=int(details.get("unexpected_count", 0) or 0),
        element_count=int(details.get("element_count", len(frame)) or 0),
        examples=_examples(frame, unexpected, column, keys) if not result.success else [],
        error=error,
    )


def _run_suite(
    kind: str, frame: pd.DataFrame, suite: _Suite, docs_dir: Path
) -> tuple[list[ExpectationOutcome], str | None]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        site_name="unifl",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    asset = context.data_sources.add_pandas(f"{kind}_source").add_dataframe_asset(kind)
    batch = asset.add_batch_definition_whole_dataframe("whole table")
    gx_suite = context.suites.add(gx.ExpectationSuite(name=f"unifl_{kind}"))

    outcomes: list[ExpectationOutcome] = []
    present: set[str] = set(frame.columns)
    for column in suite.required_columns:
        gx_suite.add_expectation(gx.expectations.ExpectColumnToExist(column=column))
    for name, kwargs in suite.expectations:
        column = kwargs.get("column")
        if column is not None and column not in present:
            continue  # ExpectColumnToExist reports the missing column once
        gx_suite.add_expectation(getattr(gx.expectations, name)(**kwargs))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"validate_{kind}", data=batch, suite=gx_suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"unifl_{kind}_checkpoint",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["unifl"])],
            result_format={"result_format": "COMPLETE"},
        )
    )
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame})
    for run_result in checkpoint_result.run_results.values():
        for result in run_result.results:
            outcomes.append(_outcome(result, frame, suite.key_columns))
    index = docs_dir / "index.html"
    return outcomes, str(index) if index.is_file() else None


def _summary_html(result: ValidationResult, docs_link: str | None) -> str:
    verdict = "passed" if result.success else "FAILED"
    rows = []
    for outcome in result.outcomes:
        status = "pass" if outcome.success else "FAIL"
        examples = "<br>".join(
            html.escape(json.dumps(example, default=str, ensure_ascii=False))
            for example in outcome.examples
        )
        rows.append(
            f"<tr class='{status.lower()}'><td>{status}</td>"
            f"<td>{html.escape(outcome.expectation)}</td>"
            f"<td>{html.escape(outcome.column or '')}</td>"
            f"<td>{outcome.unexpected_count} / {outcome.element_count}</td>"
            f"<td>{html.escape(outcome.error or '')}{examples}</td></tr>"
        )
    link = (
        f"<p>Full Great Expectations Data Docs: <a href='{html.escape(docs_link)}'>"
        f"{html.escape(docs_link)}</a></p>"
        if docs_link
        else ""
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>unifl validation: {html.escape(result.kind)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "tr.fail{background:#fdd}tr.pass{background:#efe}</style></head><body>"
        f"<h1>Validation of {html.escape(result.kind)}: {verdict}</h1>"
        f"<p>Table: {html.escape(result.source)} &mdash; {result.rows} rows, "
        f"{result.evaluated - result.failed} of {result.evaluated} expectations met.</p>"
        f"{link}<table><tr><th>Result</th><th>Expectation</th><th>Column</th>"
        "<th>Failing rows</th><th>Examples</th></tr>" + "".join(rows) + "</table></body></html>"
    )


_SUITES: dict[str, Callable[[pd.DataFrame, ValidationOptions, Path], _Suite]] = {
    "prompts": lambda frame, options, root: _prompt_suite(frame, options),
    "pairs": _pair_suite,
    "votes": _vote_suite,
    "evaluation": lambda frame, options, root: _evaluation_suite(frame, options),
}


def validate(
    kind: ValidationKind,
    table_or_path: pd.DataFrame | str | Path,
    out_dir: str | Path,
    options: ValidationOptions | None = None,
    raise_on_failure: bool = True,
) -> ValidationResult:
    """Run the suite of `kind`; write the reports to `out_dir`; raise on failure.

    `table_or_path` is a dataframe or a Parquet/CSV/JSONL file (or a directory
    with exactly one Parquet table). Relative image paths are resolved against
    `options.image_root`, else the table's directory, else the working
    directory. `out_dir` receives `validation_report.html` (a self-contained
    summary), `validation_result.json` and `data_docs/` (GX Data Docs; its
    pages load their style sheets from a CDN and read plainly offline).
    """
    if kind not in _SUITES:
        raise ValueError(f"unknown validation kind {kind!r}; expected one of {VALIDATION_KINDS}")
    options = options or ValidationOptions()
    table_path = None if isinstance(table_or_path, pd.DataFrame) else table_or_path
    check_output_apart(out_dir, [table_path, options.image_root])
    frame, source, table_dir = _load_table(table_or_path)
    root = Path(options.image_root) if options.image_root else (table_dir or Path.cwd())
    suite = _SUITES[kind](frame, options, root)
    out_dir = Path(out_dir).resolve()  # Great Expectations rejects relative Data Docs paths
    with atomic_directory(out_dir) as tmp:
        outcomes, docs_index = _run_suite(kind, frame, suite, tmp / DATA_DOCS_DIR)
        failed = sum(not outcome.success for outcome in outcomes)
        final_docs = (
            str(out_dir / Path(docs_index).relative_to(tmp)) if docs_index is not None else None
        )
        result = ValidationResult(
            kind=kind,
            source=source,
            success=failed == 0,
            rows=len(frame),
            evaluated=len(outcomes),
            failed=failed,
            outcomes=outcomes,
            report_html=str(out_dir / SUMMARY_FILE),
            data_docs_index=final_docs,
        )
        docs_link = f"{DATA_DOCS_DIR}/index.html" if docs_index is not None else None
        write_text(tmp / SUMMARY_FILE, _summary_html(result, docs_link))
        write_json(tmp / RESULT_FILE, result.to_dict())
    if not result.success and raise_on_failure:
        raise DataValidationError(result.message(), result)
    return result
