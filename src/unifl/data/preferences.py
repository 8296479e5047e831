"""The preference-pair tables: one definition shared by labeling and reward training.

Two tables, both Parquet:

* votes (`VOTE_COLUMNS`): one row per annotator, task and dimension, as read from a
  Label Studio export. `choice` is "A", "B" or "Tie".
* pairs (`PAIR_COLUMNS`): one row per task and dimension after the majority vote,
  the table reward training consumes. `image_w` is the preferred image and
  `image_l` the other; for a tie (`tie=True`) the order is A, B and both count
  as equally good. `weight` is the share of votes that agree with the majority
  (the confidence weight), `num_votes` how many votes were cast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unifl.config import DIMENSIONS
from unifl.io import atomic_path

OVERALL = "overall"
"""The overall preference collected beside the aesthetic dimensions."""

CHOICES: tuple[str, ...] = ("A", "B", "Tie")

VOTE_COLUMNS: dict[str, str] = {
    "task_id": "string",
    "annotation_id": "string",
    "annotator": "string",
    "prompt": "string",
    "image_a": "string",
    "image_b": "string",
    "dimension": "string",
    "choice": "string",
}

PAIR_COLUMNS: dict[str, str] = {
    "task_id": "string",
    "prompt": "string",
    "image_w": "string",
    "image_l": "string",
    "dimension": "string",
    "tie": "bool",
    "weight": "float64",
    "num_votes": "int64",
    "annotators": "string",
    "annotation_ids": "string",
}

VALID_DIMENSIONS: tuple[str, ...] = (*DIMENSIONS, OVERALL)


class PreferenceTableError(ValueError):
    """A preference table is missing columns or holds invalid values."""


def check_table(frame: pd.DataFrame, columns: dict[str, str], source: str) -> pd.DataFrame:
    """Check columns and values; return the frame with the schema's dtypes."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PreferenceTableError(f"{source}: missing columns {missing}")
    frame = frame[list(columns)].reset_index(drop=True)
    for column, dtype in columns.items():
        _check_column(frame[column], dtype, source)
    frame = frame.astype(columns)
    bad_dim = ~frame["dimension"].isin(VALID_DIMENSIONS)
    if bad_dim.any():
        row = _first(bad_dim)
        raise PreferenceTableError(
            f"{source}: row {row}: unknown dimension {frame['dimension'].iloc[row]!r} "
            f"(expected one of {VALID_DIMENSIONS})"
        )
    if "choice" in columns:
        bad = ~frame["choice"].isin(CHOICES)
        if bad.any():
            row = _first(bad)
            raise PreferenceTableError(
                f"{source}: row {row}: unknown choice {frame['choice'].iloc[row]!r} "
                f"(expected one of {CHOICES})"
            )
    return frame.reset_index(drop=True)


def _check_column(values: pd.Series, dtype: str, source: str) -> None:
    """No missing values, and values that `astype(dtype)` keeps as they are.

    A plain cast would turn the string "False" into True and 2.7 votes into 2.
    """
    missing = values.isna()
    if missing.any():
        raise PreferenceTableError(f"{source}: row {_first(missing)}: {values.name!r} is missing")
    if dtype == "string" or (dtype == "bool" and pd.api.types.is_bool_dtype(values.dtype)):
        return
    is_bool = values.map(lambda value: isinstance(value, bool | np.bool_))
    if dtype == "bool":
        bad, expected = ~is_bool, "True or False"
    else:
        numbers = pd.to_numeric(values, errors="coerce")
        bad, expected = numbers.isna() | is_bool, "a number"
        if dtype == "int64":
            bad, expected = bad | (numbers != numbers.round()), "a whole number"
    if bad.any():
        row = _first(bad)
        value = values.iloc[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise PreferenceTableError(
            f"{source}: row {row}: {values.name!r} must be {expected}, got {value!r}"
        )


def _first(mask: pd.Series) -> int:
    return int(mask.to_numpy().nonzero()[0][0])


def empty_table(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def write_table(frame: pd.DataFrame, columns: dict[str, str], path: str | Path) -> None:
    frame = check_table(frame, columns, str(path))
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_table(path: str | Path, columns: dict[str, str]) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise PreferenceTableError(f"{path}: file not found") from None
    return check_table(frame, columns, str(path))


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read the majority pair table that reward training consumes."""
    return read_table(path, PAIR_COLUMNS)


def write_pairs(frame: pd.DataFrame, path: str | Path) -> None:
    write_table(frame, PAIR_COLUMNS, path)


def read_votes(path: str | Path) -> pd.DataFrame:
    return read_table(path, VOTE_COLUMNS)


def write_votes(frame: pd.DataFrame, path: str | Path) -> None:
    write_table(frame, VOTE_COLUMNS, path)
