"""Put a pairs directory's images where Label Studio's S3 storage reads them.

With `labeling.storage: s3` every task names its images as
``s3://{s3_bucket}/{s3_prefix}/{relative path}`` (`tasks.s3_url`). `upload_pair_images`
writes each image of the pair manifest to exactly that key before the tasks are imported.
An object already there with the file's size is left alone, so pushing the same pairs
again uploads nothing.

Credentials come only from the environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
(and AWS_SESSION_TOKEN when set), on a cluster from the `unifl-s3-credentials` Secret.
Never from the configuration or credential files, and they are never printed. The endpoint
is `labeling.s3_endpoint`, else AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (the
`unifl-endpoints` ConfigMap sets the first); the region is `labeling.s3_region`.
"""

from __future__ import annotations

import logging
import mimetypes
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unifl.cluster.settings import SECRET_KEYS, unset_secret_keys
from unifl.labeling.tasks import pair_image_paths, read_pair_manifest, s3_key
from unifl.tracking.redaction import redact_url_credentials

if TYPE_CHECKING:
    from unifl.config import LabelingConfig

logger = logging.getLogger(__name__)

CREDENTIAL_ENV: tuple[str, ...] = tuple(SECRET_KEYS["s3"])
"""The environment variables the upload needs (boto3's names), from the S3 Secret."""
CREDENTIALS_SECRET = SECRET_KEYS["s3"]["AWS_ACCESS_KEY_ID"].secret
SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
ENDPOINT_ENV: tuple[str, str] = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Where the endpoint comes from when `labeling.s3_endpoint` is unset, in this order."""


class ObjectStoreError(ValueError):
    """The images cannot be uploaded; the message names the bucket, key or variable."""


@dataclass(frozen=True)
class UploadReport:
    """What `upload_pair_images` did."""

    bucket: str
    prefix: str
    uploaded: int
    already_present: int
    bytes_uploaded: int


def storage_endpoint(
    labeling: LabelingConfig, environ: Mapping[str, str] | None = None
) -> str | None:
    """The S3 endpoint of the pair images: the configured one, else the environment's.

    The upload and the project's S3 storage use this same endpoint, so Label Studio reads
    the objects where they were written.
    """
    if labeling.s3_endpoint:
        return labeling.s3_endpoint
    environ = os.environ if environ is None else environ
    return next((environ[name] for name in ENDPOINT_ENV if environ.get(name)), None)


def _credentials(environ: Mapping[str, str], destination: str) -> dict[str, str]:
    unset = unset_secret_keys(CREDENTIAL_ENV, CREDENTIALS_SECRET, environ)
    if unset:
        raise ObjectStoreError(f"uploading the pair images to {destination}: {unset}")
    credentials = {
        "aws_access_key_id": environ["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": environ["AWS_SECRET_ACCESS_KEY"],
    }
    if environ.get(SESSION_TOKEN_ENV):
        credentials["aws_session_token"] = environ[SESSION_TOKEN_ENV]
    return credentials


def _client(labeling: LabelingConfig, endpoint: str | None, credentials: dict[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    # A custom endpoint (MinIO, a test server on an IP address) has no per-bucket host names.
    addressing = {"addressing_style": "path"} if endpoint else {}
    config = Config(
        s3=addressing,
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    session = boto3.session.Session(region_name=labeling.s3_region or None, **credentials)
    return session.client("s3", endpoint_url=endpoint, config=config)


def _scrubbed(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact_url_credentials(text)


def _failure(exc: Exception, what: str, bucket: str, shown_endpoint: str) -> ObjectStoreError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return ObjectStoreError(
                f"{what}: bucket {bucket!r} does not exist on {shown_endpoint}; create it "
                "(on a cluster the minio-buckets Job does) or set labeling.s3_bucket"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return ObjectStoreError(
                f"{what}: {shown_endpoint} refused the credentials from "
                f"{' / '.join(CREDENTIAL_ENV)} ({code}, HTTP {status})"
            )
        return ObjectStoreError(
            f"{what}: {shown_endpoint} answered {code or 'an error'} (HTTP {status}): "
            f"{error.get('Message', '')}"
        )
    return ObjectStoreError(f"{what}: {type(exc).__name__}: {exc}")


def upload_pair_images(
    labeling: LabelingConfig,
    pairs_dir: str | Path,
    rows: Sequence[dict[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> UploadReport:
    """Upload the images of the pair manifest to ``s3://{s3_bucket}/{s3_prefix}/``.

    Keys are the images' paths relative to `pairs_dir` under the prefix, the URLs the tasks
    carry. `rows` are the manifest's rows (read from `pairs_dir` when not given). Every
    image is checked to exist before anything is sent; objects already present with the
    same size are skipped.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    environ = os.environ if environ is None else environ
    bucket, prefix = labeling.s3_bucket, labeling.s3_prefix
    if not bucket:
        raise ObjectStoreError("labeling.storage is 's3' but labeling.s3_bucket is not set")
    pairs_dir = Path(pairs_dir)
    rows = read_pair_manifest(pairs_dir) if rows is None else rows
    files = pair_image_paths(pairs_dir, rows)
    base_key = s3_key("", prefix)
    destination = f"s3://{bucket}/{base_key}"
    credentials = _credentials(environ, destination)
    endpoint = storage_endpoint(labeling, environ)
    shown_endpoint = redact_url_credentials(endpoint) if endpoint else "the AWS S3 endpoint"
    secrets = list(credentials.values())
    client = _client(labeling, endpoint, credentials)

    present: dict[str, int] = {}
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{base_key}/" if base_key else ""
        )
        for page in pages:
            for item in page.get("Contents", []):
                present[item["Key"]] = int(item["Size"])
    except (ClientError, BotoCoreError) as exc:
        failure = _failure(exc, f"listing {destination}", bucket, shown_endpoint)
        raise ObjectStoreError(_scrubbed(str(failure), secrets)) from None

    uploaded = skipped = sent = 0
    for relative, path in files.items():
        key = s3_key(relative, prefix)
        size = path.stat().st_size
        if present.get(key) == size:
            skipped += 1
            continue
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            with path.open("rb") as body:
                client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            failure = _failure(
                exc, f"uploading {path} to s3://{bucket}/{key}", bucket, shown_endpoint
            )
            raise ObjectStoreError(_scrubbed(str(failure), secrets)) from None
        uploaded += 1
        sent += size
    logger.info(
        "pair images in %s: %d uploaded (%d bytes), %d already present",
        destination,
        uploaded,
        sent,
        skipped,
    )
    return UploadReport(bucket, prefix, uploaded, skipped, sent)
