"""Against a real Label Studio server (see conftest.py): project, tasks, images, annotations, export."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pair_directories import write_pair_directory
from unifl.cli import app
from unifl.config import DIMENSIONS, load_params
from unifl.data.preferences import OVERALL, read_pairs
from unifl.labeling.annotators import (
    annotation_result,
    make_panel,
    score_pairs,
    simulate_choices,
    simulated_export,
)
from unifl.labeling.client import LabelStudioClient, LabelStudioClientError, Secret
from unifl.labeling.export import convert_export
from unifl.labeling.label_config import build_label_config
from unifl.labeling.object_store import ObjectStoreError, upload_pair_images
from unifl.labeling.pipeline import label_pairs, pull_labels, push_pairs

pytestmark = pytest.mark.integration

COLOURS = [
    (230, 40, 40),
    (40, 90, 140),
    (30, 200, 60),
    (200, 120, 210),
    (20, 20, 220),
    (120, 90, 0),
]


def channel_scores(paths, prompts):
    """Mean of one channel per dimension: which image wins is obvious from the colours."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64) / 255 for p in paths])
    means = pixels.mean(axis=(1, 2))
    return {
        "color": means[:, 0],
        "layout": means[:, 1],
        "detail": means[:, 2],
        "lighting": means.mean(1),
    }


def make_pairs(directory: Path) -> list[dict]:
    return write_pair_directory(
        directory, list(zip(COLOURS[::2], COLOURS[1::2], strict=True)), size=16
    )


def labeling_params(label_studio, document_root: Path, **extra: str):
    overrides = [
        f"labeling.url={label_studio.url}",
        f"labeling.document_root={document_root}",
        f"labeling.project_title=test {uuid.uuid4().hex[:8]}",
        *(f"labeling.{key}={value}" for key, value in extra.items()),
    ]
    return load_params(None, overrides=overrides)


def test_project_setup_is_idempotent_and_config_checked_by_the_server(label_studio_client):
    title = f"setup {uuid.uuid4().hex[:8]}"
    config = build_label_config()
    first = label_studio_client.ensure_project(title, config)
    again = label_studio_client.ensure_project(title, config)
    assert first.created and not again.created and not again.config_updated
    assert again.id == first.id
    assert [p.id for p in label_studio_client.find_projects(title)] == [first.id]

    changed = config.replace('hotkey="1"', 'hotkey="0"')
    updated = label_studio_client.ensure_project(title, changed)
    assert updated.id == first.id and updated.config_updated
    stored = label_studio_client.sdk.projects.get(first.id).label_config
    assert 'hotkey="0"' in stored

    # The server validates configs: ours was accepted, a broken one is refused.
    broken = config.replace('toName="prompt"', 'toName="nowhere"', 1)
    with pytest.raises(
        LabelStudioClientError, match=rf"{label_studio_client.url} answered HTTP 400"
    ):
        label_studio_client.ensure_project(f"broken {uuid.uuid4().hex[:8]}", broken)


def test_push_serve_annotate_export_convert(
    label_studio, label_studio_client, label_studio_document_root
):
    pairs_dir = label_studio_document_root / f"pairs-{uuid.uuid4().hex[:8]}"
    rows = make_pairs(pairs_dir)
    params = labeling_params(label_studio, label_studio_document_root, import_batch_size="2")
    client = label_studio_client

    pushed = push_pairs(client, params.labeling, pairs_dir)
    assert pushed.project_created and pushed.tasks_imported == 3
    again = push_pairs(client, params.labeling, pairs_dir)
    assert again.project_id == pushed.project_id and not again.project_created
    assert again.tasks_imported == 0 and again.tasks_already_present == 3
    assert again.storage_id == pushed.storage_id
    task_ids = pushed.task_ids_by_pair
    assert len(client.sdk.projects.get(pushed.project_id).model_dump()) > 0
    assert len(list(client.sdk.tasks.list(project=pushed.project_id))) == 3

    # The image URL of a task is served by the server (local-file serving + storage).
    task = client.sdk.tasks.get(task_ids["p0"])
    assert task.data["image_a"].startswith("/data/local-files/?d=")
    response = httpx.get(
        label_studio.url + task.data["image_a"],
        headers={"Authorization": f"Token {label_studio.credentials.token}"},
    )
    assert response.status_code == 200
    assert response.content == (pairs_dir / "images" / "p0_a.png").read_bytes()
    assert client.image_status(task.data["image_b"]) == 200

    # Three annotators, as the labeling UI would post them; one skip by the admin.
    users = [
        client.ensure_user(f"it-annotator-{k}-{uuid.uuid4().hex[:6]}@unifl.local") for k in range(3)
    ]
    votes = {
        "p0": [{"color": "A", "overall": "A"}, {"color": "A", "overall": "B"}, {"color": "B", "overall": "A"}],
        "p1": [{"color": "Tie", "layout": "B", "overall": "Tie"}, {"color": "Tie", "overall": "Tie"}, {"overall": "B"}],
        "p2": [{"detail": "B", "overall": "B"}, {"detail": "B", "overall": "B"}, {"detail": "A", "overall": "B"}],
    }  # fmt: skip
    for pair_id, per_user in votes.items():
        for user_id, choices in zip(users, per_user, strict=True):
            client.create_annotation(
                task_ids[pair_id], annotation_result(choices), completed_by=user_id
            )
    client.create_annotation(task_ids["p2"], [], was_cancelled=True)

    export = client.export_json(pushed.project_id)
    assert sorted(t["data"]["pair_id"] for t in export) == ["p0", "p1", "p2"]
    annotators_seen = {
        a["completed_by"] for t in export for a in t["annotations"] if not a["was_cancelled"]
    }
    assert annotators_seen == set(users)

    # A simulated export has exactly the structure of the real one.
    panel = make_panel(3, 0.0, seed=0)
    simulated = simulated_export(
        rows,
        panel,
        simulate_choices(panel, *score_pairs(rows, pairs_dir, channel_scores), 0.02),
        str,
    )
    real_task_keys = {key for t in export for key in t}
    real_annotation_keys = {key for t in export for a in t["annotations"] for key in a}
    assert {key for t in simulated for key in t} == real_task_keys
    assert {key for t in simulated for a in t["annotations"] for key in a} == real_annotation_keys

    result = convert_export(export, min_annotators=2)
    summary = result.summary
    assert (summary.tasks, summary.annotations, summary.annotations_cancelled) == (3, 10, 1)
    assert summary.votes == 6 + 6 + 6  # p0: 3 x 2, p1: 3 + 2 + 1, p2: 3 x 2

    def pair(pair_id: str, dimension: str) -> dict:
        rows_ = result.pairs[
            (result.pairs["task_id"] == str(task_ids[pair_id]))
            & (result.pairs["dimension"] == dimension)
        ]
        assert len(rows_) == 1, (pair_id, dimension)
        return rows_.iloc[0].to_dict()

    p0 = pair("p0", "color")
    assert (p0["image_w"], p0["tie"], p0["weight"]) == (
        "images/p0_a.png",
        False,
        pytest.approx(2 / 3),
    )
    assert pair("p0", "overall")["image_w"] == "images/p0_a.png"
    assert pair("p1", "color")["tie"] and pair("p1", "color")["weight"] == 1.0
    p1_overall = pair("p1", "overall")
    assert p1_overall["tie"] and p1_overall["weight"] == pytest.approx(2 / 3)
    p2 = pair("p2", "detail")
    assert (p2["image_w"], p2["image_l"], p2["num_votes"]) == (
        "images/p2_b.png",
        "images/p2_a.png",
        3,
    )
    # p1 layout has one vote only: dropped below min_annotators=2.
    assert summary.pairs_dropped_few_votes == 1
    assert set(result.pairs["dimension"]) == {"color", "detail", OVERALL}

    # `pull` writes the same tables from the server.
    pulled = pull_labels(client, params.labeling, label_studio_document_root / "labels")
    assert pulled.project_id == pushed.project_id
    pulled_pairs = read_pairs(label_studio_document_root / "labels" / "pairs.parquet")
    assert len(pulled_pairs) == len(convert_export(export, params.labeling.min_annotators).pairs)


def test_label_stage_posts_simulated_annotations_through_the_api(
    label_studio, label_studio_client, label_studio_document_root, tmp_path
):
    pairs_dir = label_studio_document_root / f"stage-{uuid.uuid4().hex[:8]}"
    rows = make_pairs(pairs_dir)
    params = labeling_params(
        label_studio, label_studio_document_root, annotator_noise="0", num_annotators="2"
    )
    report = label_pairs(
        params, pairs_dir, tmp_path / "labels", scorer=channel_scores, client=label_studio_client
    )
    assert report.annotations_posted == 3 * 2
    export = json.loads((tmp_path / "labels" / "export.json").read_text())
    emails = {user.id: user.email for user in label_studio_client.sdk.users.list()}
    assert {emails[a["completed_by"]] for t in export for a in t["annotations"]} == {
        "annotator-1@unifl.local",
        "annotator-2@unifl.local",
    }
    pairs = read_pairs(tmp_path / "labels" / "pairs.parquet")
    scores_a, scores_b = score_pairs(rows, pairs_dir, channel_scores)
    by_pair = {t["data"]["pair_id"]: str(t["id"]) for t in export}
    for i, row in enumerate(rows):
        for dimension in DIMENSIONS:
            got = pairs[
                (pairs["task_id"] == by_pair[row["pair_id"]]) & (pairs["dimension"] == dimension)
            ]
            gap = scores_a[dimension][i] - scores_b[dimension][i]
            expected = row["image_a"] if gap > 0.02 else row["image_b"]
            assert abs(gap) > 0.02 and got.iloc[0]["image_w"] == expected
    # A rerun posts nothing new: no doubled votes.
    again = label_pairs(
        params, pairs_dir, tmp_path / "again", scorer=channel_scores, client=label_studio_client
    )
    assert again.annotations_posted == 0 and again.summary.votes == report.summary.votes


def test_personal_access_token_works(label_studio, label_studio_client):
    created = label_studio_client.sdk.tokens.create()
    client = LabelStudioClient(label_studio.url, Secret(created.token, "a personal access token"))
    assert client.whoami()["email"] == label_studio.credentials.username


def test_wrong_token_gives_a_clear_error_without_the_token(
    label_studio, label_studio_document_root, tmp_path, monkeypatch
):
    wrong = "0123456789abcdef0123456789abcdef01234567"
    client = LabelStudioClient(
        label_studio.url, Secret(wrong, "environment variable LABEL_STUDIO_API_KEY")
    )
    with pytest.raises(LabelStudioClientError) as info:
        client.whoami()
    message = str(info.value)
    assert f"Label Studio at {label_studio.url} refused the token" in message
    assert "environment variable LABEL_STUDIO_API_KEY" in message and "HTTP 401" in message
    assert wrong not in message

    pairs_dir = label_studio_document_root / f"cli-{uuid.uuid4().hex[:8]}"
    make_pairs(pairs_dir)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", wrong)
    (tmp_path / "params.yaml").write_text("{}\n")
    args = [
        "labeling",
        "push",
        "--pairs",
        str(pairs_dir),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    result = CliRunner().invoke(app, [*args, "--set", f"labeling.url={label_studio.url}"])
    assert result.exit_code == 2
    assert "refused the token from environment variable LABEL_STUDIO_API_KEY" in result.output
    assert wrong not in result.output


def test_cli_push_and_pull(
    label_studio, label_studio_client, label_studio_document_root, tmp_path, monkeypatch
):
    pairs_dir = label_studio_document_root / f"cli-{uuid.uuid4().hex[:8]}"
    make_pairs(pairs_dir)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    (tmp_path / "params.yaml").write_text("{}\n")

    def settings(title: str) -> list[str]:
        return [
            "--params", str(tmp_path / "params.yaml"),
            "--set", f"labeling.url={label_studio.url}",
            "--set", f"labeling.token_file={label_studio.token_path}",
            "--set", f"labeling.document_root={label_studio_document_root}",
            "--set", f"labeling.project_title={title}",
        ]  # fmt: skip

    title = f"cli {uuid.uuid4().hex[:8]}"
    labels = tmp_path / "labels"
    runner = CliRunner()
    pushed = runner.invoke(app, ["labeling", "push", "--pairs", str(pairs_dir), *settings(title)])
    assert pushed.exit_code == 0, pushed.output
    assert "(created)" in pushed.output and "imported 3 tasks, 0 already present" in pushed.output

    # Nobody has annotated yet: the pull says so and writes nothing.
    early = runner.invoke(app, ["labeling", "pull", "--out", str(labels), *settings(title)])
    assert early.exit_code == 2
    assert "0 annotated tasks of 3 (0 annotations" in early.output
    assert f"nothing was written to {labels}" in early.output
    assert not labels.exists()

    (project,) = label_studio_client.find_projects(title)
    first_task = min(task.id for task in label_studio_client.sdk.tasks.list(project=project.id))
    label_studio_client.create_annotation(
        first_task, annotation_result({"color": "A", "overall": "B"})
    )
    pulled = runner.invoke(app, ["labeling", "pull", "--out", str(labels), *settings(title)])
    assert pulled.exit_code == 0, pulled.output
    assert "3 tasks, 1 annotations" in pulled.output
    written = read_pairs(labels / "pairs.parquet")
    assert sorted(written["dimension"]) == ["color", "overall"]

    # A pull from a project without annotations (here: the wrong title) keeps the labels.
    other = f"cli other {uuid.uuid4().hex[:8]}"
    other_push = runner.invoke(
        app, ["labeling", "push", "--pairs", str(pairs_dir), *settings(other)]
    )
    assert other_push.exit_code == 0, other_push.output
    wrong = runner.invoke(app, ["labeling", "pull", "--out", str(labels), *settings(other)])
    assert wrong.exit_code == 2
    assert (
        "0 annotated tasks of 3" in wrong.output and f"{labels} is left as it was" in wrong.output
    )
    assert read_pairs(labels / "pairs.parquet").equals(written)
    outputs = pushed.output + early.output + pulled.output + wrong.output
    assert label_studio.credentials.token not in outputs


def new_bucket(s3_server: str) -> str:
    """An empty bucket on the S3 test server (on a cluster the minio-buckets Job makes them)."""
    bucket = f"pairs-{uuid.uuid4().hex[:8]}"
    assert httpx.put(f"{s3_server}/{bucket}").status_code == 200
    return bucket


def test_pair_images_are_uploaded_once_and_again_when_changed(s3_server, tmp_path):
    pairs_dir = tmp_path / "pairs"
    rows = make_pairs(pairs_dir)
    bucket = new_bucket(s3_server)
    labeling = load_params(
        None,
        overrides=[
            "labeling.storage=s3",
            f"labeling.s3_bucket={bucket}",
            "labeling.s3_prefix=/runs/3/pairs/",
            f"labeling.s3_endpoint={s3_server}",
            "labeling.s3_region=us-east-1",
        ],
    ).labeling
    secret = "s3-test-secret-0e4b7a91c2"
    environ = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": secret}

    first = upload_pair_images(labeling, pairs_dir, environ=environ)
    assert (first.uploaded, first.already_present) == (6, 0)
    assert first.bytes_uploaded == sum(
        (pairs_dir / r[s]).stat().st_size for r in rows for s in ("image_a", "image_b")
    )
    store = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="test-key-id",
        aws_secret_access_key=secret,
    )

    def stored(relative: str) -> dict:
        return store.get_object(Bucket=bucket, Key=f"runs/3/pairs/{relative}")

    for row in rows:
        for side in ("image_a", "image_b"):
            item = stored(row[side])
            assert item["Body"].read() == (pairs_dir / row[side]).read_bytes()
            assert item["ContentType"] == "image/png"
    listed = store.list_objects_v2(Bucket=bucket)["Contents"]
    assert len(listed) == 6

    again = upload_pair_images(labeling, pairs_dir, environ=environ)
    assert (again.uploaded, again.already_present, again.bytes_uploaded) == (0, 6, 0)

    # A regenerated image (another size) is uploaded again; the others are left alone.
    Image.new("RGB", (24, 24), (1, 2, 3)).save(pairs_dir / "images" / "p2_b.png")
    changed = upload_pair_images(labeling, pairs_dir, environ=environ)
    assert (changed.uploaded, changed.already_present) == (1, 5)
    assert (
        stored("images/p2_b.png")["Body"].read() == (pairs_dir / "images" / "p2_b.png").read_bytes()
    )

    missing_bucket = labeling.model_copy(update={"s3_bucket": f"absent-{uuid.uuid4().hex[:8]}"})
    with pytest.raises(ObjectStoreError) as info:
        upload_pair_images(missing_bucket, pairs_dir, environ=environ)
    message = str(info.value)
    assert f"bucket {missing_bucket.s3_bucket!r} does not exist on {s3_server}" in message
    assert secret not in message


def test_s3_storage_serves_the_uploaded_images(
    label_studio, label_studio_client, s3_server, tmp_path, monkeypatch
):
    pairs_dir = tmp_path / "pairs"
    make_pairs(pairs_dir)
    bucket, prefix = new_bucket(s3_server), "runs/7/pairs"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    storage = dict(
        storage="s3",
        s3_bucket=bucket,
        s3_prefix=prefix,
        s3_endpoint=s3_server,
        s3_region="us-east-1",
    )
    params = labeling_params(
        label_studio, tmp_path, **storage, s3_presign=True, presign_ttl_minutes="5"
    )
    # The push uploads the images under the keys the tasks name; a second push finds them.
    pushed = push_pairs(label_studio_client, params.labeling, pairs_dir)
    again = push_pairs(label_studio_client, params.labeling, pairs_dir)
    assert pushed.tasks_imported == 3 and again.tasks_imported == 0
    assert (pushed.images_uploaded, pushed.images_already_present) == (6, 0)
    assert (again.images_uploaded, again.images_already_present) == (0, 6)
    assert again.storage_id == pushed.storage_id

    task_id = pushed.task_ids_by_pair["p1"]
    exported = {t["id"]: t for t in label_studio_client.export_json(pushed.project_id)}
    assert exported[task_id]["data"]["image_a"] == f"s3://{bucket}/{prefix}/images/p1_a.png"
    # The task API hands the UI a resolver URL for the s3:// URI; the resolver
    # redirects to a presigned URL of the storage's endpoint, which serves the image.
    shown = label_studio_client.sdk.tasks.get(task_id).data["image_a"]
    assert shown.startswith(f"/tasks/{task_id}/resolve/?fileuri=")
    fileuri = shown.split("fileuri=", 1)[1]
    assert base64.urlsafe_b64decode(fileuri + "=" * (-len(fileuri) % 4)).decode() == (
        f"s3://{bucket}/{prefix}/images/p1_a.png"
    )
    resolved = httpx.get(
        label_studio.url + shown,
        headers={"Authorization": f"Token {label_studio.credentials.token}"},
    )
    assert resolved.status_code == 303
    location = resolved.headers["location"]
    assert location.startswith(f"{s3_server}/{bucket}/{prefix}/images/p1_a.png?")
    assert "Signature" in location
    image = httpx.get(location)
    assert image.status_code == 200
    assert image.content == (pairs_dir / "images" / "p1_a.png").read_bytes()

    # Without presigned URLs (the in-cluster setting) Label Studio streams the image itself;
    # another project on the same pairs finds every image already in the bucket.
    proxied = labeling_params(label_studio, tmp_path, **storage, s3_presign=False)
    streamed_push = push_pairs(label_studio_client, proxied.labeling, pairs_dir)
    assert (streamed_push.images_uploaded, streamed_push.images_already_present) == (0, 6)
    task_id = streamed_push.task_ids_by_pair["p2"]
    shown = label_studio_client.sdk.tasks.get(task_id).data["image_b"]
    streamed = httpx.get(
        label_studio.url + shown,
        headers={"Authorization": f"Token {label_studio.credentials.token}"},
    )
    assert streamed.status_code == 200
    assert streamed.content == (pairs_dir / "images" / "p2_b.png").read_bytes()
