"""Label Studio JSON export -> the votes table and the majority pair table.

The tables are defined once in `unifl.data.preferences` (`VOTE_COLUMNS`,
`PAIR_COLUMNS`); this module only fills them. Rules, applied in this order:

1. A task needs `id` and `data` with the prompt and both images (the relative
   paths `image_a_path` / `image_b_path` when present, else the image URLs).
   A task without annotations contributes nothing (counted: `tasks_unannotated`).
2. An annotation needs `id`, `completed_by` and a `result` list. Cancelled
   (skipped) annotations, `was_cancelled: true`, are dropped and counted
   (`annotations_cancelled`); a missing `was_cancelled` means not cancelled.
3. Every `result` item must be `type: "choices"` with a `from_name` in the
   labeled dimensions (the four aesthetic dimensions and `overall`) and exactly
   one value in `A` / `B` / `Tie`; anything else is an error naming the task id
   and annotation id. A dimension the annotator left empty is no vote.
   An annotation with no vote at all is counted (`annotations_empty`).
4. One vote per (task, annotator, dimension): when one annotator has several
   non-cancelled annotations on a task, the latest (highest annotation id) wins
   and the others are counted (`annotations_superseded`).
5. Majority per (task, dimension) over the A / B / Tie votes. A side wins only
   with strictly more votes than both the other side and Tie; otherwise the
   pair is a tie (`tie=True`, images in A, B order). A Tie vote therefore never
   counts for a side.
6. `weight` is the share of the votes that agree with the outcome: the winning
   side's votes, or for a tie the Tie votes (so a tie that only comes from an
   even A/B split has weight 0: nobody said "tie", the annotators disagreed).
7. A (task, dimension) with fewer than `min_annotators` votes is dropped
   (`pairs_dropped_few_votes`); a task whose every dimension is dropped is
   counted in `tasks_dropped_few_votes`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unifl.data.preferences import (
    CHOICES,
    PAIR_COLUMNS,
    VALID_DIMENSIONS,
    VOTE_COLUMNS,
    check_table,
    empty_table,
)
from unifl.labeling.label_config import IMAGE_A_FIELD, IMAGE_B_FIELD, PROMPT_FIELD
from unifl.labeling.tasks import IMAGE_A_PATH_FIELD, IMAGE_B_PATH_FIELD, url_to_relative_path


class ExportError(ValueError):
    """A Label Studio export is malformed; the message names the task and annotation."""


@dataclass
class ConversionSummary:
    """Counts of what the conversion kept, dropped and why (written as summary.json)."""

    tasks: int = 0
    tasks_unannotated: int = 0
    tasks_dropped_few_votes: int = 0
    annotations: int = 0
    annotations_cancelled: int = 0
    annotations_empty: int = 0
    annotations_superseded: int = 0
    votes: int = 0
    tie_votes: int = 0
    pairs: int = 0
    tie_pairs: int = 0
    tie_pairs_per_dimension: dict[str, int] = field(default_factory=dict)
    pairs_dropped_few_votes: int = 0
    min_annotators: int = 1
    votes_per_dimension: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConversionResult:
    votes: pd.DataFrame
    pairs: pd.DataFrame
    summary: ConversionSummary


def read_export(path: str | Path) -> list[dict[str, Any]]:
    """Read a Label Studio JSON export file (a list of tasks); errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: export file not found") from None
    except UnicodeDecodeError as exc:
        raise ExportError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ExportError(
            f"{path}: expected a JSON list of tasks (Label Studio JSON export), "
            f"got {type(data).__name__}"
        )
    return data


def _annotator_name(completed_by: Any, where: str) -> str:
    # The plain export gives the user id; an expanded export gives {id, email, ...}.
    if isinstance(completed_by, bool):
        raise ExportError(f"{where}: 'completed_by' must be a user id, got {completed_by!r}")
    if isinstance(completed_by, int | str) and str(completed_by).strip():
        return str(completed_by)
    if isinstance(completed_by, dict) and completed_by.get("id") is not None:
        return str(completed_by["id"])
    raise ExportError(f"{where}: 'completed_by' must be a user id, got {completed_by!r}")


def _task_images(task: dict[str, Any], where: str) -> tuple[str, str, str]:
    data = task.get("data")
    if not isinstance(data, dict):
        raise ExportError(f"{where}: missing field 'data'")
    prompt = data.get(PROMPT_FIELD)
    if not isinstance(prompt, str):
        raise ExportError(f"{where}: missing field 'data.{PROMPT_FIELD}'")
    images = []
    for path_field, url_field in (
        (IMAGE_A_PATH_FIELD, IMAGE_A_FIELD),
        (IMAGE_B_PATH_FIELD, IMAGE_B_FIELD),
    ):
        if isinstance(data.get(path_field), str):
            images.append(data[path_field])
        elif isinstance(data.get(url_field), str):
            path = url_to_relative_path(data[url_field])
            if path is None:
                raise ExportError(
                    f"{where}: 'data.{url_field}' is {data[url_field]!r}, a URL that names no "
                    f"file of the pairs directory, and 'data.{path_field}' is missing (tasks "
                    "pushed by unifl carry it)"
                )
            images.append(path)
        else:
            raise ExportError(f"{where}: missing field 'data.{url_field}'")
    return prompt, images[0], images[1]


def _annotation_votes(annotation: dict[str, Any], where: str) -> dict[str, str]:
    result = annotation.get("result")
    if not isinstance(result, list):
        raise ExportError(f"{where}: missing field 'result' (expected a list)")
    votes: dict[str, str] = {}
    for index, item in enumerate(result):
        item_where = f"{where}, result[{index}]"
        if not isinstance(item, dict):
            raise ExportError(f"{item_where}: expected an object, got {type(item).__name__}")
        for key in ("from_name", "type", "value"):
            if key not in item:
                raise ExportError(f"{item_where}: missing field {key!r}")
        dimension = item["from_name"]
        if dimension not in VALID_DIMENSIONS:
            raise ExportError(
                f"{item_where}: unknown dimension {dimension!r} (expected one of {list(VALID_DIMENSIONS)})"
            )
        if item["type"] != "choices":
            raise ExportError(
                f"{item_where}: dimension {dimension!r} has type {item['type']!r}, expected 'choices'"
            )
        value = item["value"]
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list):
            raise ExportError(f"{item_where}: missing field 'value.choices'")
        if len(choices) == 0:
            continue
        if len(choices) > 1:
            raise ExportError(
                f"{item_where}: dimension {dimension!r} has several choices {choices}, expected one"
            )
        choice = choices[0]
        if choice not in CHOICES:
            raise ExportError(
                f"{item_where}: unknown choice {choice!r} for dimension {dimension!r} "
                f"(expected one of {list(CHOICES)})"
            )
        if dimension in votes and votes[dimension] != choice:
            raise ExportError(f"{item_where}: dimension {dimension!r} answered twice")
        votes[dimension] = choice
    return votes


def export_to_votes(
    export: Sequence[dict[str, Any]], summary: ConversionSummary | None = None
) -> tuple[pd.DataFrame, ConversionSummary]:
    """The votes table (one row per task, annotator and dimension) of an export."""
    summary = summary or ConversionSummary()
    rows: list[dict[str, str]] = []
    seen_task_ids: set[str] = set()
    for position, task in enumerate(export):
        if not isinstance(task, dict):
            raise ExportError(f"task at position {position}: expected an object")
        if "id" not in task:
            raise ExportError(f"task at position {position}: missing field 'id'")
        task_id = str(task["id"])
        where = f"task {task_id}"
        if task_id in seen_task_ids:
            raise ExportError(f"{where}: duplicate task id")
        seen_task_ids.add(task_id)
        summary.tasks += 1
        annotations = task.get("annotations")
        if annotations is None:
            raise ExportError(f"{where}: missing field 'annotations'")
        if not isinstance(annotations, list):
            raise ExportError(f"{where}: 'annotations' must be a list")
        if not annotations:
            summary.tasks_unannotated += 1
            continue
        prompt, image_a, image_b = _task_images(task, where)

        latest: dict[str, tuple[int | str, str, dict[str, str]]] = {}
        for index, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                raise ExportError(f"{where}, annotation at position {index}: expected an object")
            if "id" not in annotation:
                raise ExportError(f"{where}, annotation at position {index}: missing field 'id'")
            annotation_id = annotation["id"]
            ann_where = f"{where}, annotation {annotation_id}"
            summary.annotations += 1
            if "completed_by" not in annotation:
                raise ExportError(f"{ann_where}: missing field 'completed_by'")
            annotator = _annotator_name(annotation["completed_by"], ann_where)
            if annotation.get("was_cancelled", False):
                summary.annotations_cancelled += 1
                continue
            votes = _annotation_votes(annotation, ann_where)
            if not votes:
                summary.annotations_empty += 1
                continue
            previous = latest.get(annotator)
            if previous is not None:
                summary.annotations_superseded += 1
                if _order_key(previous[0]) > _order_key(annotation_id):
                    continue
            latest[annotator] = (annotation_id, annotator, votes)

        for annotation_id, annotator, votes in latest.values():
            for dimension in VALID_DIMENSIONS:
                if dimension not in votes:
                    continue
                rows.append(
                    {
                        "task_id": task_id,
                        "annotation_id": str(annotation_id),
                        "annotator": annotator,
                        "prompt": prompt,
                        "image_a": image_a,
                        "image_b": image_b,
                        "dimension": dimension,
                        "choice": votes[dimension],
                    }
                )
    frame = pd.DataFrame(rows) if rows else empty_table(VOTE_COLUMNS)
    frame = check_table(frame, VOTE_COLUMNS, "votes")
    summary.votes = len(frame)
    summary.tie_votes = int((frame["choice"] == "Tie").sum())
    summary.votes_per_dimension = {
        d: int((frame["dimension"] == d).sum()) for d in VALID_DIMENSIONS
    }
    return frame, summary


def _order_key(annotation_id: int | str) -> tuple[int, int | str]:
    try:
        return (0, int(annotation_id))
    except (TypeError, ValueError):
        return (1, str(annotation_id))


def majority_outcome(choices: Iterable[str]) -> tuple[str, float]:
    """Outcome ("A", "B" or "Tie") of a list of votes and its weight (rules 5 and 6)."""
    counts = Counter(choices)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("majority of zero votes")
    a, b, tie = counts["A"], counts["B"], counts["Tie"]
    if a > b and a > tie:
        return "A", a / total
    if b > a and b > tie:
        return "B", b / total
    return "Tie", tie / total


def votes_to_pairs(
    votes: pd.DataFrame, min_annotators: int = 1, summary: ConversionSummary | None = None
) -> tuple[pd.DataFrame, ConversionSummary]:
    """The majority pair table of a votes table (rules 5 to 7), vectorised per group."""
    if min_annotators < 1:
        raise ValueError(f"min_annotators must be >= 1, got {min_annotators}")
    summary = summary or ConversionSummary()
    summary.min_annotators = min_annotators
    votes = check_table(votes, VOTE_COLUMNS, "votes")
    keys = ["task_id", "dimension"]
    if votes.empty:
        frame = check_table(empty_table(PAIR_COLUMNS), PAIR_COLUMNS, "pairs")
        summary.pairs = summary.tie_pairs = summary.tasks_dropped_few_votes = 0
        summary.tie_pairs_per_dimension = dict.fromkeys(VALID_DIMENSIONS, 0)
        return frame, summary

    grouped = votes.groupby(keys, sort=False)
    counts = (
        votes.groupby([*keys, "choice"], sort=False)
        .size()
        .unstack("choice", fill_value=0)
        .reindex(columns=list(CHOICES), fill_value=0)
    )
    groups = grouped[["prompt", "image_a", "image_b"]].first()
    groups["annotators"] = grouped["annotator"].agg(",".join)
    groups["annotation_ids"] = grouped["annotation_id"].agg(",".join)
    groups = groups.join(counts)
    groups["num_votes"] = groups[list(CHOICES)].sum(axis=1).astype("int64")

    enough = groups["num_votes"] >= min_annotators
    summary.pairs_dropped_few_votes = int((~enough).sum())
    all_tasks = list(dict.fromkeys(votes["task_id"]))
    groups = groups[enough].reset_index()

    a, b, tie = groups["A"], groups["B"], groups["Tie"]
    a_wins = (a > b) & (a > tie)
    b_wins = (b > a) & (b > tie)
    is_tie = ~(a_wins | b_wins)
    agreeing = a.where(a_wins, b.where(b_wins, tie))
    frame = pd.DataFrame(
        {
            "task_id": groups["task_id"],
            "prompt": groups["prompt"],
            "image_w": groups["image_b"].where(b_wins, groups["image_a"]),
            "image_l": groups["image_a"].where(b_wins, groups["image_b"]),
            "dimension": groups["dimension"],
            "tie": is_tie,
            "weight": agreeing / groups["num_votes"],
            "num_votes": groups["num_votes"],
            "annotators": groups["annotators"],
            "annotation_ids": groups["annotation_ids"],
        }
    )
    task_rank = {task_id: rank for rank, task_id in enumerate(all_tasks)}
    dimension_rank = {d: rank for rank, d in enumerate(VALID_DIMENSIONS)}
    order = np.lexsort(
        (
            frame["dimension"].map(dimension_rank).to_numpy(),
            frame["task_id"].map(task_rank).to_numpy(),
        )
    )
    frame = check_table(frame.iloc[order], PAIR_COLUMNS, "pairs")
    summary.tasks_dropped_few_votes = len(set(all_tasks) - set(frame["task_id"]))
    summary.pairs = len(frame)
    summary.tie_pairs = int(frame["tie"].sum())
    summary.tie_pairs_per_dimension = {
        d: int(frame.loc[frame["dimension"] == d, "tie"].sum()) for d in VALID_DIMENSIONS
    }
    return frame, summary


def convert_export(export: Sequence[dict[str, Any]], min_annotators: int = 1) -> ConversionResult:
    """Votes, majority pairs and the counts of one Label Studio JSON export."""
    votes, summary = export_to_votes(export)
    pairs, summary = votes_to_pairs(votes, min_annotators=min_annotators, summary=summary)
    return ConversionResult(votes=votes, pairs=pairs, summary=summary)
