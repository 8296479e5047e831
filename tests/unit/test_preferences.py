"""The preference tables' schema: a value the schema's cast would change is an error."""

from __future__ import annotations

import pandas as pd
import pytest

from unifl.data.preferences import (
    PAIR_COLUMNS,
    PreferenceTableError,
    read_pairs,
    write_pairs,
)

GOOD = {
    "task_id": "7",
    "prompt": "a red circle on a dark background",
    "image_w": "images/a.png",
    "image_l": "images/b.png",
    "dimension": "color",
    "tie": False,
    "weight": 0.8,
    "num_votes": 5,
    "annotators": "a1,a2,a3,a4,a5",
    "annotation_ids": "1,2,3,4,5",
}


def table(**columns: list[object]) -> pd.DataFrame:
    """Two rows of `GOOD`, with `columns` replaced (a Parquet column holds one type)."""
    return pd.DataFrame({**{name: [value] * 2 for name, value in GOOD.items()}, **columns})


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"tie": ["True", "False"]}, r"row 0: 'tie' must be True or False, got 'True'"),
        ({"tie": [True, None]}, r"row 1: 'tie' is missing"),
        ({"num_votes": [5.0, 2.7]}, r"row 1: 'num_votes' must be a whole number, got 2.7"),
        ({"num_votes": [5, None]}, r"row 1: 'num_votes' is missing"),
        ({"weight": ["0.8", "high"]}, r"row 1: 'weight' must be a number, got 'high'"),
        ({"image_w": ["images/a.png", None]}, r"row 1: 'image_w' is missing"),
    ],
)
def test_bad_values_name_the_file_row_and_column(tmp_path, columns, message) -> None:
    path = tmp_path / "pairs.parquet"
    table(**columns).to_parquet(path)
    with pytest.raises(PreferenceTableError, match=f"{path}: {message}"):
        read_pairs(path)


def test_a_frame_with_mixed_values_is_checked_row_by_row() -> None:
    frame = pd.DataFrame([GOOD, {**GOOD, "num_votes": True}, {**GOOD, "tie": "False"}])
    with pytest.raises(PreferenceTableError, match="row 2: 'tie' must be True or False"):
        write_pairs(frame, "unused.parquet")
    with pytest.raises(PreferenceTableError, match="row 1: 'num_votes' must be a whole number"):
        write_pairs(frame.drop(index=2), "unused.parquet")


def test_values_the_cast_keeps_are_read_with_the_schema_types(tmp_path) -> None:
    path = tmp_path / "pairs.parquet"
    table(task_id=[7, 8], num_votes=[5.0, 3.0], weight=[1, 0]).to_parquet(path)
    pairs = read_pairs(path)
    assert pairs["task_id"].tolist() == ["7", "8"]
    assert pairs["num_votes"].tolist() == [5, 3]
    assert pairs["weight"].tolist() == [1.0, 0.0]
    assert pairs.dtypes.astype(str).to_dict() == {
        **{name: "string" for name in PAIR_COLUMNS},
        "tie": "bool",
        "weight": "float64",
        "num_votes": "int64",
    }


def test_a_bad_table_is_never_written(tmp_path) -> None:
    path = tmp_path / "pairs.parquet"
    write_pairs(pd.DataFrame([GOOD]), path)
    with pytest.raises(PreferenceTableError, match="'tie' must be True or False"):
        write_pairs(pd.DataFrame([{**GOOD, "tie": "yes"}]), path)
    assert read_pairs(path)["tie"].tolist() == [False]
