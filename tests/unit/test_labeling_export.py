"""Label Studio export -> votes and majority pairs, with the documented rules."""

import json

import pytest

from unifl.data.preferences import read_pairs, read_votes, write_pairs, write_votes
from unifl.labeling.export import (
    ExportError,
    convert_export,
    export_to_votes,
    majority_outcome,
    read_export,
)

# One task as Label Studio 1.23 Community exports it (trimmed timestamps), used to
# check that the converter reads the real layout.
REAL_TASK = {
    "id": 1,
    "annotations": [
        {
            "id": 1,
            "completed_by": 2,
            "result": [
                {
                    "from_name": "color",
                    "to_name": "prompt",
                    "type": "choices",
                    "value": {"choices": ["A"]},
                },
                {
                    "from_name": "overall",
                    "to_name": "prompt",
                    "type": "choices",
                    "value": {"choices": ["B"]},
                },
            ],
            "was_cancelled": False,
            "ground_truth": False,
            "created_at": "2026-11-25T19:53:15.516609Z",
            "lead_time": 1.5,
            "task": 1,
            "project": 1,
        },
        {
            "id": 2,
            "completed_by": 1,
            "result": [],
            "was_cancelled": True,
            "ground_truth": False,
            "task": 1,
            "project": 1,
        },
    ],
    "drafts": [],
    "predictions": [],
    "data": {
        "prompt": "a red square",
        "image_a": "/data/local-files/?d=pairs/img/0.png",
        "image_b": "/data/local-files/?d=pairs/img/1.png",
        "pair_id": "p0",
        "image_a_path": "img/0.png",
        "image_b_path": "img/1.png",
    },
    "meta": {"seed_a": 1, "seed_b": 2},
    "inner_id": 1,
    "total_annotations": 1,
    "cancelled_annotations": 1,
    "project": 1,
}


def result_item(dimension: str, choice: str) -> dict:
    return {
        "from_name": dimension,
        "to_name": "prompt",
        "type": "choices",
        "value": {"choices": [choice]},
    }


def task(task_id: int, votes: list[dict[str, str]], cancelled: tuple[int, ...] = ()) -> dict:
    """A task whose k-th annotation (by user 10+k) holds votes[k]; `cancelled` marks skips."""
    annotations = []
    for k, choices in enumerate(votes):
        annotations.append(
            {
                "id": task_id * 100 + k,
                "completed_by": 10 + k,
                "was_cancelled": k in cancelled,
                "result": [result_item(d, c) for d, c in choices.items()],
            }
        )
    return {
        "id": task_id,
        "annotations": annotations,
        "data": {
            "prompt": f"prompt {task_id}",
            "image_a": f"/data/local-files/?d=pairs/{task_id}_a.png",
            "image_b": f"/data/local-files/?d=pairs/{task_id}_b.png",
            "image_a_path": f"images/{task_id}_a.png",
            "image_b_path": f"images/{task_id}_b.png",
        },
    }


def pair(result, task_id: int, dimension: str) -> dict:
    rows = result.pairs[
        (result.pairs["task_id"] == str(task_id)) & (result.pairs["dimension"] == dimension)
    ]
    assert len(rows) == 1
    return rows.iloc[0].to_dict()


def test_real_export_layout_converts():
    result = convert_export([REAL_TASK])
    assert result.summary.annotations == 2
    assert result.summary.annotations_cancelled == 1
    assert list(result.votes["dimension"]) == ["color", "overall"]
    assert list(result.votes["annotator"]) == ["2", "2"]
    color = pair(result, 1, "color")
    assert (color["image_w"], color["image_l"], color["tie"]) == ("img/0.png", "img/1.png", False)
    overall = pair(result, 1, "overall")
    assert (overall["image_w"], overall["image_l"]) == ("img/1.png", "img/0.png")
    assert overall["weight"] == 1.0 and overall["num_votes"] == 1


def test_majority_weight_and_winner_side():
    export = [
        task(1, [{"color": "A"}, {"color": "A"}, {"color": "B"}]),
        task(2, [{"color": "B"}, {"color": "B"}, {"color": "Tie"}, {"color": "A"}]),
    ]
    result = convert_export(export)
    first = pair(result, 1, "color")
    # 2 of 3 votes say A: A wins with weight 2/3.
    assert first["image_w"] == "images/1_a.png" and first["image_l"] == "images/1_b.png"
    assert not first["tie"] and first["weight"] == pytest.approx(2 / 3)
    assert first["num_votes"] == 3
    assert first["annotators"] == "10,11,12"
    assert first["annotation_ids"] == "100,101,102"
    second = pair(result, 2, "color")
    # B=2, Tie=1, A=1: B has a strict plurality, 2 of 4 votes agree.
    assert second["image_w"] == "images/2_b.png" and second["weight"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("votes", "weight"),
    [
        (["Tie", "Tie", "A"], 2 / 3),  # Tie is the plurality
        (["A", "B"], 0.0),  # even split, nobody said tie
        (["A", "A", "Tie", "Tie"], 0.5),  # A and Tie level: no strict plurality for a side
        (["A", "B", "Tie"], 1 / 3),
    ],
)
def test_ties(votes, weight):
    result = convert_export([task(1, [{"layout": v} for v in votes])])
    row = pair(result, 1, "layout")
    assert row["tie"]
    assert (row["image_w"], row["image_l"]) == ("images/1_a.png", "images/1_b.png")
    assert row["weight"] == pytest.approx(weight)
    assert result.summary.tie_pairs == 1
    assert result.summary.tie_pairs_per_dimension == {
        "color": 0,
        "layout": 1,
        "detail": 0,
        "lighting": 0,
        "overall": 0,
    }
    assert result.summary.tie_votes == votes.count("Tie")
    assert majority_outcome(votes) == ("Tie", pytest.approx(weight))


def test_cancelled_dropped_and_counted_even_with_garbage_result():
    export = [task(1, [{"detail": "A"}, {"detail": "B"}, {"detail": "B"}], cancelled=(1, 2))]
    export[0]["annotations"][2]["result"] = [result_item("not-a-dimension", "?")]
    result = convert_export(export)
    assert result.summary.annotations == 3
    assert result.summary.annotations_cancelled == 2
    row = pair(result, 1, "detail")
    assert row["image_w"] == "images/1_a.png" and row["num_votes"] == 1


def test_unanswered_dimension_is_no_vote_and_empty_annotation_counted():
    export = [task(1, [{"color": "A", "overall": "A"}, {"overall": "B"}, {}])]
    result = convert_export(export)
    assert result.summary.annotations_empty == 1
    assert pair(result, 1, "color")["num_votes"] == 1
    assert pair(result, 1, "overall")["num_votes"] == 2
    assert set(result.pairs["dimension"]) == {"color", "overall"}
    # An empty choices list (a cleared radio) is no vote either.
    export[0]["annotations"][0]["result"][0]["value"]["choices"] = []
    assert "color" not in set(convert_export(export).pairs["dimension"])


def test_min_annotators_drops_and_counts():
    export = [
        task(1, [{"color": "A", "lighting": "B"}, {"color": "A"}]),
        task(2, [{"color": "B"}]),
        {"id": 3, "annotations": [], "data": {}},
    ]
    result = convert_export(export, min_annotators=2)
    assert list(result.pairs["task_id"]) == ["1"]
    assert list(result.pairs["dimension"]) == ["color"]
    assert result.summary.pairs_dropped_few_votes == 2  # task 1 lighting, task 2 color
    assert result.summary.tasks_dropped_few_votes == 1  # task 2
    assert result.summary.tasks_unannotated == 1  # task 3
    assert result.summary.tasks == 3


def test_latest_annotation_of_an_annotator_wins():
    export = [task(1, [{"color": "A"}, {"color": "B"}])]
    export[0]["annotations"][1]["completed_by"] = 10  # same user re-annotated, id 101 > 100
    result = convert_export(export)
    assert result.summary.annotations_superseded == 1
    row = pair(result, 1, "color")
    assert row["num_votes"] == 1 and row["image_w"] == "images/1_b.png"


def test_expanded_completed_by_and_url_only_tasks():
    export = [task(1, [{"color": "B"}])]
    export[0]["annotations"][0]["completed_by"] = {"id": 7, "email": "a@b.c"}
    del export[0]["data"]["image_a_path"], export[0]["data"]["image_b_path"]
    result = convert_export(export)
    assert list(result.votes["annotator"]) == ["7"]
    assert pair(result, 1, "color")["image_w"] == "pairs/1_b.png"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("id"), "task at position 0: missing field 'id'"),
        (lambda t: t.pop("annotations"), "task 1: missing field 'annotations'"),
        (lambda t: t.pop("data"), "task 1: missing field 'data'"),
        (lambda t: t["data"].pop("prompt"), "task 1: missing field 'data.prompt'"),
        (lambda t: t["annotations"][0].pop("id"), "task 1, annotation at position 0: missing"),
        (
            lambda t: t["annotations"][0].pop("result"),
            "task 1, annotation 100: missing field 'result'",
        ),
        (
            lambda t: t["annotations"][0].pop("completed_by"),
            "task 1, annotation 100: missing field 'completed_by'",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].pop("from_name"),
            "task 1, annotation 100, result[0]: missing field 'from_name'",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].update(from_name="colour"),
            "task 1, annotation 100, result[0]: unknown dimension 'colour'",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].update(value={"choices": ["C"]}),
            "task 1, annotation 100, result[0]: unknown choice 'C' for dimension 'color'",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].update(value={"choices": ["A", "B"]}),
            "several choices",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].update(type="rating"),
            "has type 'rating', expected 'choices'",
        ),
        (
            lambda t: t["annotations"][0]["result"][0].update(value={}),
            "missing field 'value.choices'",
        ),
        (
            lambda t: (t["data"].pop("image_a_path"), t["data"].update(image_a="https://x/a.png")),
            "task 1: 'data.image_a' is 'https://x/a.png', a URL that names no file",
        ),
    ],
)
def test_bad_exports_name_task_and_annotation(mutate, message):
    export = [task(1, [{"color": "A"}])]
    mutate(export[0])
    with pytest.raises(ExportError) as info:
        convert_export(export)
    assert message in str(info.value)


def test_duplicate_task_ids_are_an_error():
    with pytest.raises(ExportError, match="task 1: duplicate task id"):
        export_to_votes([task(1, [{"color": "A"}]), task(1, [{"color": "B"}])])


def test_read_export_errors_name_the_file(tmp_path):
    path = tmp_path / "export.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(ExportError, match=rf"{path}: not valid JSON"):
        read_export(path)
    path.write_text(json.dumps({"tasks": []}), encoding="utf-8")
    with pytest.raises(ExportError, match="expected a JSON list of tasks"):
        read_export(path)
    with pytest.raises(ExportError, match="not found"):
        read_export(tmp_path / "missing.json")
    path.write_text(json.dumps([REAL_TASK]), encoding="utf-8")
    assert read_export(path)[0]["id"] == 1


def test_tables_roundtrip_through_the_shared_schema(tmp_path):
    export = [
        task(i, [{"color": "A", "overall": "B"}, {"color": "A", "overall": "Tie"}]) for i in (1, 2)
    ]
    result = convert_export(export)
    write_votes(result.votes, tmp_path / "votes.parquet")
    write_pairs(result.pairs, tmp_path / "pairs.parquet")
    assert read_votes(tmp_path / "votes.parquet").equals(result.votes)
    pairs = read_pairs(tmp_path / "pairs.parquet")
    assert list(pairs["dimension"]) == ["color", "overall", "color", "overall"]
    assert list(pairs["tie"]) == [False, True, False, True]


def test_empty_export_gives_empty_tables():
    result = convert_export([])
    assert result.votes.empty and result.pairs.empty
    assert result.summary.pairs == 0


def test_an_export_without_votes_never_replaces_the_labels(tmp_path):
    from unifl.labeling.pipeline import LabelingError, write_labels

    labels = tmp_path / "labels"
    write_labels([task(1, [{"color": "A"}])], labels, 1, source="project 1")
    before = {path.name: path.read_bytes() for path in labels.iterdir()}

    unannotated = [task(1, []), task(2, [{"color": "A"}], cancelled=(0,)), task(3, [{}])]
    with pytest.raises(LabelingError) as info:
        write_labels(unannotated, labels, 1, source="label-studio http://ls project 9")
    message = str(info.value)
    assert message.startswith("label-studio http://ls project 9: 0 annotated tasks of 3 ")
    assert "(2 annotations, 1 cancelled, 1 without a choice)" in message
    assert f"{labels} is left as it was" in message
    assert {path.name: path.read_bytes() for path in labels.iterdir()} == before

    fresh = tmp_path / "fresh"
    with pytest.raises(LabelingError, match=f"nothing was written to {fresh}"):
        write_labels([], fresh, 1, source="an empty export")
    assert not fresh.exists()


def test_an_export_whose_pairs_all_lack_votes_never_replaces_the_labels(tmp_path):
    from unifl.labeling.pipeline import LabelingError, write_labels

    labels = tmp_path / "labels"
    write_labels([task(1, [{"color": "A"}, {"color": "B"}])], labels, 2, source="project 1")
    before = (labels / "pairs.parquet").read_bytes()
    with pytest.raises(LabelingError) as info:
        write_labels([task(1, [{"color": "A"}]), task(2, [])], labels, 2, source="project 1")
    assert str(info.value) == (
        "project 1: 1 annotated tasks of 2, but no pair has 2 votes "
        f"(labeling.min_annotators), so there are no labels; {labels} is left as it was."
    )
    assert (labels / "pairs.parquet").read_bytes() == before
