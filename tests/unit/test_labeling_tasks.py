"""The pair manifest schema and its conversion to Label Studio tasks."""

import json

import pytest

from unifl.labeling.tasks import (
    PAIR_MANIFEST_FIELDS,
    PAIR_MANIFEST_NAME,
    PairManifestError,
    local_files_url,
    pair_rows_to_tasks,
    read_pair_manifest,
    s3_key,
    s3_url,
    url_to_relative_path,
    write_pair_manifest,
)


def pair_row(pair_id: str = "p0", **changes) -> dict:
    row = {
        "pair_id": pair_id,
        "prompt": "a red circle left of a blue square",
        "image_a": f"images/{pair_id}_a.png",
        "image_b": f"images/{pair_id}_b.png",
        "seed_a": 10,
        "seed_b": 11,
        "model_version": "toy-abc123",
        "steps": 20,
        "guidance_scale": 7.5,
        "timestep_spacing": "leading",
    }
    row.update(changes)
    return row


def write_lines(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_roundtrip_through_the_pairs_directory(tmp_path):
    rows = [pair_row("p0"), pair_row("p1", guidance_scale=5)]
    written = write_pair_manifest(tmp_path, rows)
    assert written == tmp_path / PAIR_MANIFEST_NAME
    back = read_pair_manifest(tmp_path)
    assert [r["pair_id"] for r in back] == ["p0", "p1"]
    assert back[1]["guidance_scale"] == 5.0 and isinstance(back[1]["guidance_scale"], float)
    assert set(back[0]) == set(PAIR_MANIFEST_FIELDS)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({k: v for k, v in pair_row().items() if k != "seed_b"}, "missing fields ['seed_b']"),
        (pair_row(extra=1), "unknown fields ['extra']"),
        (pair_row(steps="20"), "field 'steps' must be int"),
        (pair_row(steps=True), "field 'steps' must be int"),
        (pair_row(prompt="  "), "field 'prompt' is empty"),
        (pair_row(image_a="/abs/a.png"), "field 'image_a' must be a path relative"),
        (pair_row(image_b="../b.png"), "field 'image_b' must be a path relative"),
        (pair_row(image_b="images/p0_a.png"), "same file"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / PAIR_MANIFEST_NAME
    write_lines(path, [pair_row("ok"), row])
    with pytest.raises(PairManifestError) as info:
        read_pair_manifest(path)
    assert f"{path}:2" in str(info.value)
    assert message in str(info.value)


def test_bad_json_duplicates_empty_missing_and_encoding(tmp_path):
    path = tmp_path / PAIR_MANIFEST_NAME
    path.write_text(json.dumps(pair_row()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(PairManifestError, match=r":2: not valid JSON"):
        read_pair_manifest(path)
    write_lines(path, [pair_row("p0"), pair_row("p0")])
    with pytest.raises(PairManifestError, match=r":2: duplicate pair_id 'p0' \(first on line 1\)"):
        read_pair_manifest(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PairManifestError, match="has no rows"):
        read_pair_manifest(path)
    path.write_bytes(b"\xff\xfe" + b"x" * 10)
    with pytest.raises(PairManifestError, match="not UTF-8"):
        read_pair_manifest(path)
    with pytest.raises(PairManifestError, match="not found"):
        read_pair_manifest(tmp_path / "nowhere")


def test_writer_refuses_bad_rows_and_leaves_old_file(tmp_path):
    write_pair_manifest(tmp_path, [pair_row("p0")])
    before = (tmp_path / PAIR_MANIFEST_NAME).read_text()
    with pytest.raises(PairManifestError, match="row 1: missing fields"):
        write_pair_manifest(tmp_path, [pair_row("p1"), {"pair_id": "x"}])
    assert (tmp_path / PAIR_MANIFEST_NAME).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [PAIR_MANIFEST_NAME]


def test_local_files_urls_are_relative_to_the_document_root(tmp_path):
    pairs = tmp_path / "runs" / "pairs dir"
    url = local_files_url(pairs / "images/p0_a.png", tmp_path)
    assert url == "/data/local-files/?d=runs/pairs%20dir/images/p0_a.png"
    assert url_to_relative_path(url) == "runs/pairs dir/images/p0_a.png"
    with pytest.raises(PairManifestError, match="outside the Label Studio document root"):
        local_files_url(tmp_path / "x.png", tmp_path / "other")


def test_s3_urls_join_prefix_and_path():
    assert s3_url("images/p0_a.png", "bucket", "datasets/pairs/") == (
        "s3://bucket/datasets/pairs/images/p0_a.png"
    )
    assert s3_url("images/p0_a.png", "bucket") == "s3://bucket/images/p0_a.png"
    # The object key the upload writes is the key of that URL.
    assert s3_key("images/p0_a.png", "/datasets/pairs/") == "datasets/pairs/images/p0_a.png"
    assert s3_key("images/p0_a.png", "") == "images/p0_a.png"
    assert url_to_relative_path("s3://bucket/datasets/x.png") == "datasets/x.png"


def test_urls_that_name_no_file_have_no_path():
    assert url_to_relative_path("https://cdn.example.com/x.png") is None
    assert url_to_relative_path("/data/upload/3/abc-x.png") is None
    assert url_to_relative_path("images/p0_a.png") == "images/p0_a.png"


def test_tasks_carry_urls_paths_pair_id_and_meta(tmp_path):
    rows = [pair_row("p0")]
    tasks = pair_rows_to_tasks(rows, lambda rel: f"s3://b/{rel}")
    assert tasks == [
        {
            "data": {
                "prompt": rows[0]["prompt"],
                "image_a": "s3://b/images/p0_a.png",
                "image_b": "s3://b/images/p0_b.png",
                "pair_id": "p0",
                "image_a_path": "images/p0_a.png",
                "image_b_path": "images/p0_b.png",
            },
            "meta": {
                "seed_a": 10,
                "seed_b": 11,
                "model_version": "toy-abc123",
                "steps": 20,
                "guidance_scale": 7.5,
                "timestep_spacing": "leading",
            },
        }
    ]
