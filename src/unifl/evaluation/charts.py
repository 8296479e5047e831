"""Charts of metrics across the stages of a run, the picture of a table's numbers.

`save_stage_chart` draws one panel per metric: the stages along the x axis,
one line per step count, each point the mean over seeds with the standard
deviation as its error bar. The toy table writes one beside its Markdown.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from unifl.io import atomic_path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def save_stage_chart(
    results: Mapping[str, Sequence[Mapping[str, float]]],
    metrics: Sequence[str],
    step_counts: Sequence[int],
    path: str | Path,
    title: str | None = None,
    lower_is_better: Sequence[str] = (),
    columns: int = 4,
) -> Path:
    """Write a PNG with one panel per metric of `metrics`.

    `results` maps each stage, in order, to its summaries (one per seed), whose
    keys are `metric_name(metric, steps)` (`caption_match_20steps`); a point is the
    mean over the summaries that have its key, and a stage where none has it is left
    out of that line. Written atomically; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from unifl.evaluation.evaluate import metric_name

    if not results:
        raise ValueError("a stage chart needs at least one stage")
    if not metrics or not step_counts:
        raise ValueError("a stage chart needs at least one metric and one step count")
    stages = list(results)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(3.2 * min(columns, len(metrics)), 2.6 * rows + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, min(columns, len(metrics)), index + 1)
        for steps in step_counts:
            key = metric_name(metric, steps)
            values = [[run[key] for run in results[stage] if key in run] for stage in stages]
            points = [(position, *mean_std(v)) for position, v in enumerate(values) if v]
            if points:
                x, mean, std = zip(*points, strict=True)
                axes.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"{steps} steps")
        axes.set_title(
            metric + (" (lower is better)" if metric in lower_is_better else ""), fontsize=9
        )
        axes.set_xticks(range(len(stages)), stages, fontsize=8, rotation=20)
        axes.tick_params(axis="y", labelsize=8)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png")
    return target
