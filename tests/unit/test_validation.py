"""Great Expectations suites: good tables pass, each bad row fails the expectation named for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unifl.data.preferences import PAIR_COLUMNS, VOTE_COLUMNS
from unifl.data.validation import (
    DATA_DOCS_DIR,
    RESULT_FILE,
    SUMMARY_FILE,
    DataValidationError,
    TableReadError,
    ValidationOptions,
    validate,
)


def failures_by_expectation(error: DataValidationError) -> dict[tuple[str, str | None], list[int]]:
    return {
        (outcome.expectation, outcome.column): [example["row"] for example in outcome.examples]
        for outcome in error.result.failures()
    }


def assert_reports_written(out_dir: Path, success: bool) -> None:
    saved = json.loads((out_dir / RESULT_FILE).read_text())
    assert saved["success"] is success
    summary = (out_dir / SUMMARY_FILE).read_text()
    assert ("passed" if success else "FAILED") in summary
    assert (out_dir / DATA_DOCS_DIR / "index.html").is_file()


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pairs" / "images"
    folder.mkdir(parents=True)
    for index in range(4):
        pixels = np.full((8, 8, 3), 60 * index, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    data = (folder / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp_path / "pairs"


def pair_row(task: str, image_w: str, image_l: str, **changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "task_id": task,
        "prompt": "a red circle on a dark background",
        "image_w": image_w,
        "image_l": image_l,
        "dimension": "color",
        "tie": False,
        "weight": 0.8,
        "num_votes": 5,
        "annotators": "a1,a2,a3,a4,a5",
        "annotation_ids": "1,2,3,4,5",
    }
    row.update(changes)
    return row


def test_prompt_suite_passes_and_fails_with_named_expectations(tmp_path: Path) -> None:
    good = pd.DataFrame({"prompt_id": ["p1", "p2"], "prompt": ["a red circle", "a blue square"]})
    result = validate("prompts", good, tmp_path / "good")
    assert result.success and result.failed == 0 and result.evaluated == 8
    assert_reports_written(tmp_path / "good", success=True)

    bad = pd.DataFrame(
        {
            "prompt_id": ["p1", "p2", "p2", "p4", "p5"],
            "prompt": ["a red circle", "a blue square", "a green one", "x\x1b[0m", "a" * 30],
        }
    )
    with pytest.raises(DataValidationError) as info:
        validate("prompts", bad, tmp_path / "bad", ValidationOptions(max_prompt_chars=20))
    failed = failures_by_expectation(info.value)
    assert failed == {
        ("expect_column_values_to_be_unique", "prompt_id"): [1, 2],
        ("expect_column_values_to_not_match_regex", "prompt"): [3],
        ("expect_column_value_lengths_to_be_between", "prompt"): [4],
    }
    message = str(info.value)
    assert "expect_column_values_to_be_unique on column 'prompt_id': 2 of 5 rows fail" in message
    assert '"row": 3' in message and str(tmp_path / "bad" / SUMMARY_FILE) in message
    assert_reports_written(tmp_path / "bad", success=False)


def test_prompt_suite_names_missing_columns_and_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"text": ["a red circle"]}).to_parquet(path)
    with pytest.raises(DataValidationError, match="column 'prompt_id' is missing") as info:
        validate("prompts", path, tmp_path / "report")
    assert info.value.result.source == str(path)


def test_pair_suite_checks_sets_images_self_pairs_and_annotators(
    tmp_path: Path, image_dir: Path
) -> None:
    good = pd.DataFrame(
        [
            pair_row("t1", "images/0.png", "images/1.png"),
            pair_row(
                "t2", "images/2.png", str(image_dir / "images" / "3.png"), dimension="overall"
            ),
        ]
    )
    good = good.astype(PAIR_COLUMNS)
    table = image_dir / "pairs.parquet"
    good.to_parquet(table)
    result = validate("pairs", table, tmp_path / "good", ValidationOptions(min_annotators=3))
    assert result.success  # relative image paths resolve against the table's directory

    bad = pd.DataFrame(
        [
            pair_row("t1", "images/0.png", "images/1.png"),
            pair_row("t2", "images/0.png", "images/1.png", dimension="colour"),
            pair_row("t3", "images/2.png", "images/2.png"),
            pair_row("t4", "images/missing.png", "images/1.png"),
            pair_row("t5", "images/0.png", "images/truncated.png"),
            pair_row("t6", "images/0.png", "images/1.png", num_votes=2),
            pair_row("t7", "images/0.png", "images/1.png", weight=1.5),
        ]
    ).astype(PAIR_COLUMNS)
    options = ValidationOptions(min_annotators=3, image_root=image_dir)
    with pytest.raises(DataValidationError) as info:
        validate("pairs", bad, tmp_path / "bad", options)
    assert failures_by_expectation(info.value) == {
        ("expect_column_values_to_be_in_set", "dimension"): [1],
        ("expect_column_values_to_be_in_set", "is_self_pair"): [2],
        ("expect_column_values_to_be_in_set", "image_w_readable"): [3],
        ("expect_column_values_to_be_in_set", "image_l_readable"): [4],
        ("expect_column_values_to_be_between", "num_votes"): [5],
        ("expect_column_values_to_be_between", "weight"): [6],
    }
    example = info.value.result.failures()[0].examples[0]
    assert example["task_id"] == "t2" and example["dimension"] == "colour"


def test_vote_suite_checks_choices_and_minimum_annotators(tmp_path: Path, image_dir: Path) -> None:
    rows = []
    for task, annotators in (("t1", ["a1", "a2"]), ("t2", ["a1"])):
        for annotator in annotators:
            rows.append(
                {
                    "task_id": task,
                    "annotation_id": f"{task}-{annotator}",
                    "annotator": annotator,
                    "prompt": "a red circle",
                    "image_a": "images/0.png",
                    "image_b": "images/1.png",
                    "dimension": "lighting",
                    "choice": "A",
                }
            )
    rows[1]["choice"] = "maybe"
    votes = pd.DataFrame(rows).astype(VOTE_COLUMNS)
    options = ValidationOptions(min_annotators=2, image_root=image_dir)
    with pytest.raises(DataValidationError) as info:
        validate("votes", votes, tmp_path / "votes", options)
    assert failures_by_expectation(info.value) == {
        ("expect_column_values_to_be_in_set", "choice"): [1],
        ("expect_column_values_to_be_between", "task_annotators"): [2],
    }


def test_evaluation_suite_requires_columns_and_finite_numbers(tmp_path: Path) -> None:
    options = ValidationOptions(expected_columns=["prompt_id", "clip_score", "aesthetic"])
    good = pd.DataFrame(
        {"prompt_id": ["p1", "p2"], "clip_score": [0.3, 0.31], "aesthetic": [5.1, 5.4]}
    )
    assert validate("evaluation", good, tmp_path / "good", options).success

    bad = pd.DataFrame(
        {
            "prompt_id": ["p1", "p2", "p3"],
            "clip_score": [0.3, float("inf"), np.nan],
            "steps": [20, 4, 4],
        }
    )
    with pytest.raises(DataValidationError) as info:
        validate("evaluation", bad, tmp_path / "bad", options)
    assert failures_by_expectation(info.value) == {
        ("expect_column_to_exist", "aesthetic"): [],
        ("expect_column_values_to_be_between", "clip_score"): [1],
        ("expect_column_values_to_not_be_null", "clip_score"): [2],
    }
    assert_reports_written(tmp_path / "bad", success=False)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("extra.csv", b"prompt_id,prompt\np1,a cat,x\n", "a row has more fields than the header"),
        ("ragged.csv", b"prompt_id,prompt\np1,a cat\np2,a dog,x\n", "Expected 2 fields in line 3"),
        ("latin1.csv", b"prompt_id,prompt\np1,a caf\xe9\n", "'utf-8' codec can't decode"),
        ("empty.csv", b"", "No columns to parse"),
        ("bad.jsonl", b'{"prompt_id": "p1"}\n{bad\n', "cannot be read as a table"),
        ("bad.parquet", b"not parquet", "cannot be read as a table"),
    ],
)
def test_unreadable_tables_are_errors_naming_the_file(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TableReadError, match=message) as info:
        validate("prompts", path, tmp_path / "report")
    assert str(info.value).startswith(f"{path}: ")
    assert not (tmp_path / "report").exists()


def test_a_trailing_comma_on_every_row_keeps_the_columns_in_place(tmp_path: Path) -> None:
    path = tmp_path / "spreadsheet.csv"
    path.write_text("prompt_id,prompt\np1,a red circle,\np2,a blue square,\n")
    result = validate("prompts", path, tmp_path / "report")
    assert result.success and result.rows == 2


def test_unknown_kind_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown validation kind 'images'"):
        validate("images", pd.DataFrame(), tmp_path)  # type: ignore[arg-type]
