"""Uploading the pair images for S3 storage: what is checked before anything is sent.

The uploads themselves run against a real S3-compatible server in
tests/integration/test_label_studio.py.
"""

from pathlib import Path

import pytest

from pair_directories import write_pair_directory
from unifl.config import load_params
from unifl.labeling.object_store import ObjectStoreError, storage_endpoint, upload_pair_images
from unifl.labeling.tasks import PairManifestError, pair_image_paths

KEY_ID = "AKIAUNITTEST00000042"
SECRET_KEY = "unit-test-secret-7c1f9e2d4b"


def labeling(**settings: str):
    overrides = ["labeling.storage=s3", *(f"labeling.{k}={v}" for k, v in settings.items())]
    return load_params(None, overrides=overrides).labeling


def make_pairs(directory: Path, count: int = 2) -> list[dict]:
    return write_pair_directory(directory, [((40 * i, 100, 200),) * 2 for i in range(count)])


def test_image_paths_map_every_relative_path_to_its_file(tmp_path):
    rows = make_pairs(tmp_path)
    files = pair_image_paths(tmp_path, rows)
    assert files == {
        f"images/p{i}_{side}.png": tmp_path / "images" / f"p{i}_{side}.png"
        for i in range(2)
        for side in "ab"
    }


def test_a_missing_image_names_its_row_pair_field_and_file(tmp_path):
    make_pairs(tmp_path, count=3)
    (tmp_path / "images" / "p1_b.png").unlink()
    (tmp_path / "images" / "p2_a.png").unlink()
    environ = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with pytest.raises(PairManifestError) as info:
        upload_pair_images(labeling(s3_bucket="pairs"), tmp_path, environ=environ)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'pairs.jsonl'}: row 2 (pair 'p1'): image_b")
    assert f"'images/p1_b.png' not found at {tmp_path / 'images' / 'p1_b.png'}" in message
    assert "1 more images are missing" in message


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        ({}, "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ACCESS_KEY_ID": KEY_ID}, "AWS_SECRET_ACCESS_KEY"),
        ({"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ACCESS_KEY_ID": ""}, "AWS_ACCESS_KEY_ID"),
    ],
)
def test_missing_credentials_name_the_variables_and_never_a_value(tmp_path, environ, missing):
    make_pairs(tmp_path)
    settings = labeling(s3_bucket="pairs", s3_prefix="runs/1/pairs/")
    with pytest.raises(ObjectStoreError) as info:
        upload_pair_images(settings, tmp_path, environ=environ)
    message = str(info.value)
    assert message.startswith(
        "uploading the pair images to s3://pairs/runs/1/pairs: "
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
    )
    assert "unifl-s3-credentials Secret" in message
    assert message.endswith(f"not set: {missing}")
    assert KEY_ID not in message and SECRET_KEY not in message


def test_no_bucket_is_an_error(tmp_path):
    make_pairs(tmp_path)
    with pytest.raises(ObjectStoreError, match="labeling.s3_bucket is not set"):
        upload_pair_images(labeling(), tmp_path, environ={})


def test_endpoint_is_the_configured_one_else_the_environments():
    configured = labeling(s3_bucket="b", s3_endpoint="http://minio:9000")
    assert storage_endpoint(configured, {"AWS_ENDPOINT_URL_S3": "http://other:9000"}) == (
        "http://minio:9000"
    )
    unset = labeling(s3_bucket="b")
    assert storage_endpoint(unset, {}) is None
    assert storage_endpoint(unset, {"AWS_ENDPOINT_URL": "http://any:1"}) == "http://any:1"
    both = {"AWS_ENDPOINT_URL": "http://any:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2"}
    assert storage_endpoint(unset, both) == "http://s3only:2"
