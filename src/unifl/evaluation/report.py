"""The evaluation report: one table (metrics x step counts) and the sample grids.

Written twice, as Markdown (read in a repository, MLflow's artifact view or a
KFP Markdown output) and as standalone HTML (images linked by relative path,
so the report opens from the evaluation directory in any browser).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unifl.io import write_text

if TYPE_CHECKING:
    from unifl.evaluation.evaluate import EvaluationResult

METRIC_NOTES: dict[str, str] = {
    "caption_match": "share of caption objects whose class and colour the toy segmenter finds",
    "frechet": "Fréchet distance to real-image features (lower is better)",
    "clip_score": "100 * max(cos(image, text), 0) of the CLIP model",
    "images_per_second": "generation only, warm-up excluded",
}


def _format(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}"


def summary_rows(result: EvaluationResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table: one row per metric, one column per step count."""
    steps = list(result.by_steps)
    metrics: list[str] = []
    for summary in result.by_steps.values():
        metrics.extend(name for name in summary if name not in metrics)
    header = ["metric", *[f"{s} steps" for s in steps]]
    rows = [
        [metric, *[_format(result.by_steps[s].get(metric)) for s in steps]] for metric in metrics
    ]
    return header, rows


def _markdown(result: EvaluationResult, files: Mapping[str, str], grids: Mapping[str, str]) -> str:
    settings = result.settings
    header, rows = summary_rows(result)
    lines = [
        "# Evaluation",
        "",
        f"- model: `{settings.get('model') or 'in memory'}`",
        f"- prompts: {settings.get('num_prompts')}, seeds: {settings.get('seeds')}, "
        f"guidance scale: {settings.get('guidance_scale')}",
        f"- timestep spacing: {settings.get('timestep_spacing')}",
    ]
    if settings.get("frechet_features"):
        lines.append(f"- Fréchet features: {settings['frechet_features']}")
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
    ]
    notes = [
        f"- `{name}`: {note}"
        for name, note in METRIC_NOTES.items()
        if any(r[0] == name for r in rows)
    ]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines += [
        f"Per-prompt values: `{files.get('per_prompt', 'per_prompt.csv')}` "
        "(columns `<metric>_<steps>steps`).",
        "",
    ]
    for name, caption in grids.items():
        lines += [f"## Samples: {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(lines)


def _html(result: EvaluationResult, grids: Mapping[str, str]) -> str:
    header, rows = summary_rows(result)
    settings = result.settings
    escape = html.escape
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>Evaluation</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        "</head><body>",
        "<h1>Evaluation</h1>",
        f"<p>model: <code>{escape(str(settings.get('model') or 'in memory'))}</code>; "
        f"prompts: {escape(str(settings.get('num_prompts')))}; "
        f"seeds: {escape(str(settings.get('seeds')))}; "
        f"timestep spacing: {escape(str(settings.get('timestep_spacing')))}</p>",
        "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>",
        *["<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows],
        "</table>",
    ]
    for name, caption in grids.items():
        parts += [
            f"<h2>Samples: {escape(caption)}</h2>",
            f'<img src="{escape(name)}" alt="{escape(caption)}">',
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    result: EvaluationResult,
    directory: str | Path,
    files: Mapping[str, str],
    grids: Mapping[str, str],
) -> dict[str, str]:
    """Write report.md and report.html into `directory`. `files` maps keys to names of
    files already written there; `grids` maps grid image names to their captions.
    Returns the report names."""
    root = Path(directory)
    write_text(root / "report.md", _markdown(result, files, grids))
    write_text(root / "report.html", _html(result, grids))
    return {"report_md": "report.md", "report_html": "report.html"}
