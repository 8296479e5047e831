"""Numbers and short reports read back from the data steps' output directories.

The data steps are cached (their outputs depend on the data configuration only), so they
do not log to MLflow themselves: a cached step never runs again, and a run id would break
the cache key. What they measured is written inside their outputs (curation report, pair
report, label summary and agreement, validation result); the functions here read it back
for the KFP UI (`Output[Metrics]`), for MLflow (the lineage step's nested runs) and for the
summary `unifl run` prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: expected output file is missing") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a flat mapping (booleans and None left out)."""
    result: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
            result[f"{prefix}{key}"] = float(value)
    return result


def curation_metrics(prompts_dir: str | Path) -> dict[str, float]:
    """Rows in and out, drops per reason, nearest-neighbour similarity before and after."""
    from unifl.data.prompts import REPORT_FILE

    report = _read_json(Path(prompts_dir) / REPORT_FILE)
    metrics = _numbers(
        {"input_rows": report.get("input_rows"), "output_rows": report.get("output_rows")}
    )
    metrics.update(_numbers(report.get("dropped") or {}, prefix="dropped_"))
    selection = report.get("selection") or {}
    metrics.update(
        _numbers(
            {
                key: selection.get(key)
                for key in (
                    "mean_nn_similarity_before",
                    "mean_nn_similarity_selected",
                    "semantic_dropped",
                    "compressed_dropped",
                )
            }
        )
    )
    return metrics


def pairs_metrics(pairs_dir: str | Path) -> dict[str, float]:
    """Pairs, images, and generation time of a pairs directory."""
    from unifl.data.pairs import REPORT_FILE

    report = _read_json(Path(pairs_dir) / REPORT_FILE)
    return _numbers({key: report.get(key) for key in ("pairs", "images", "steps", "seconds")})


def labels_metrics(labels_dir: str | Path) -> dict[str, float]:
    """Conversion counts and Krippendorff's alpha per dimension of a labels directory."""
    from unifl.labeling.pipeline import AGREEMENT_FILE, SUMMARY_FILE

    summary = _read_json(Path(labels_dir) / SUMMARY_FILE)
    agreement = _read_json(Path(labels_dir) / AGREEMENT_FILE)
    metrics = _numbers(
        {
            key: summary.get(key)
            for key in (
                "tasks",
                "annotations",
                "votes",
                "pairs",
                "tie_pairs",
                "pairs_dropped_few_votes",
            )
        }
    )
    for dimension, values in (agreement.get("dimensions") or {}).items():
        alpha = (values or {}).get("alpha")
        if isinstance(alpha, int | float):
            metrics[f"alpha_{dimension}"] = float(alpha)
    return metrics


def labels_lineage(labels_dir: str | Path) -> dict[str, str]:
    """Label Studio project id (when the labels came from a server) and the export's digest.

    Label Studio's JSON export has no id of its own, so the export file's content digest
    stands for it: the same digest means the same annotations.
    """
    from unifl.labeling.pipeline import EXPORT_FILE, SUMMARY_FILE
    from unifl.tracking.lineage import content_digest

    directory = Path(labels_dir)
    summary = _read_json(directory / SUMMARY_FILE)
    lineage = {"export_id": content_digest(directory / EXPORT_FILE)[:16]}
    if summary.get("project_id") is not None:
        lineage["project_id"] = str(summary["project_id"])
    return lineage


def validation_metrics(report_dir: str | Path) -> dict[str, float]:
    """Rows, expectations evaluated and failed, from a validation report directory."""
    from unifl.data.validation import RESULT_FILE

    result = _read_json(Path(report_dir) / RESULT_FILE)
    return _numbers({key: result.get(key) for key in ("rows", "evaluated", "failed")})


def markdown_table(metrics: dict[str, float], title: str) -> str:
    """A small Markdown table of metrics, for `Output[Markdown]` in the KFP UI."""
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
