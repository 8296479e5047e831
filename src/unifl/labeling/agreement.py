"""Inter-annotator agreement computed from the votes table.

Label Studio Community has no agreement features, so they are computed here
from the export:

* Krippendorff's alpha per dimension, nominal metric (A, B and Tie are three
  unordered categories), any number of annotators per task, missing votes
  allowed. A task with fewer than two votes on a dimension is not pairable and
  does not enter alpha. alpha is undefined (reported as None) when all
  pairable votes fall in one category (expected disagreement is zero).
* Per-annotator agreement with the majority, leave-one-out: each vote is
  compared with the strict plurality (A, B or Tie) of the *other* annotators'
  votes on the same task and dimension, so an annotator does not vote on the
  reference they are scored against. Votes whose others have no strict
  plurality (an even split, or no other vote) are not compared; they are
  counted as `undecided`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from unifl.data.preferences import CHOICES, VALID_DIMENSIONS, VOTE_COLUMNS, check_table


def krippendorff_alpha_nominal(units: Sequence[Sequence[Any]]) -> float:
    """Krippendorff's alpha (nominal) of units, each the list of values it received.

    alpha = 1 - D_o / D_e with, over pairable units u (m_u >= 2 values),
    D_o proportional to sum_u (m_u^2 - sum_c n_uc^2) / (m_u - 1) and
    D_e proportional to (n^2 - sum_c n_c^2) / (n - 1), where n_uc counts value c
    in unit u, n_c = sum_u n_uc and n = sum_c n_c. Returns nan when undefined.
    """
    categories: dict[Any, int] = {}
    unit_counts: list[dict[int, int]] = []
    for values in units:
        if len(values) < 2:
            continue
        counts: dict[int, int] = {}
        for value in values:
            index = categories.setdefault(value, len(categories))
            counts[index] = counts.get(index, 0) + 1
        unit_counts.append(counts)
    if not unit_counts:
        return math.nan
    matrix = np.zeros((len(unit_counts), len(categories)), dtype=np.float64)
    for row, counts in enumerate(unit_counts):
        for index, count in counts.items():
            matrix[row, index] = count
    per_unit = matrix.sum(axis=1)
    observed = ((per_unit**2 - (matrix**2).sum(axis=1)) / (per_unit - 1)).sum()
    totals = matrix.sum(axis=0)
    n = totals.sum()
    expected = n**2 - (totals**2).sum()
    if expected == 0:
        return math.nan
    return float(1.0 - (n - 1) * observed / expected)


def _strict_plurality(counts: dict[str, int]) -> str | None:
    if not counts:
        return None
    best = max(counts.values())
    winners = [c for c, k in counts.items() if k == best]
    return winners[0] if len(winners) == 1 else None


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def agreement_report(votes: pd.DataFrame) -> dict[str, Any]:
    """Alpha per dimension and leave-one-out agreement per annotator (JSON-ready)."""
    votes = check_table(votes, VOTE_COLUMNS, "votes")
    dimensions: dict[str, Any] = {}
    per_annotator: dict[str, dict[str, Any]] = {}

    for dimension in VALID_DIMENSIONS:
        subset = votes[votes["dimension"] == dimension]
        units = [list(group["choice"]) for _, group in subset.groupby("task_id", sort=False)]
        alpha = krippendorff_alpha_nominal(units)
        dimensions[dimension] = {
            "alpha": _none_if_nan(alpha),
            "pairable_tasks": sum(1 for u in units if len(u) >= 2),
            "votes": len(subset),
            "choice_shares": {
                c: (float((subset["choice"] == c).mean()) if len(subset) else None) for c in CHOICES
            },
        }
        for _, group in subset.groupby("task_id", sort=False):
            choices = list(group["choice"])
            annotators = list(group["annotator"])
            totals = {c: choices.count(c) for c in CHOICES}
            for annotator, choice in zip(annotators, choices, strict=True):
                others = dict(totals)
                others[choice] -= 1
                reference = _strict_plurality({c: k for c, k in others.items() if k > 0})
                record = per_annotator.setdefault(
                    annotator, {"compared": 0, "agreed": 0, "undecided": 0, "by_dimension": {}}
                )
                by_dim = record["by_dimension"].setdefault(dimension, [0, 0])
                if reference is None:
                    record["undecided"] += 1
                    continue
                agreed = int(choice == reference)
                record["compared"] += 1
                record["agreed"] += agreed
                by_dim[0] += 1
                by_dim[1] += agreed

    annotators: dict[str, Any] = {}
    for name in sorted(per_annotator, key=_natural_key):
        record = per_annotator[name]
        annotators[name] = {
            "agreement": record["agreed"] / record["compared"] if record["compared"] else None,
            "compared": record["compared"],
            "undecided": record["undecided"],
            "by_dimension": {
                d: (agreed / compared if compared else None)
                for d, (compared, agreed) in record["by_dimension"].items()
            },
        }
    return {
        "metric": "krippendorff_alpha_nominal",
        "dimensions": dimensions,
        "annotators": annotators,
    }


def _natural_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)
