"""A real Label Studio for the integration tests, started once per test session.

The server comes from the package registry (`pip install label-studio==<version>`)
into its own virtual environment under `.cache/label-studio/` in the repository,
installed on first use, so `make test` works on a fresh machine (expect two to
four minutes for the install and about two minutes for the first database
migration; later sessions reuse the venv and a migrated database snapshot and
start in seconds). It listens on 127.0.0.1 with local-file serving under a
temporary document root; its process group is terminated at the end.

For the S3 storage an S3-compatible server (moto's, in its own venv under
`.cache/s3-server/`, installed on first use) runs on 127.0.0.1 too. Label
Studio's SSRF protection rightly refuses storage endpoints on loopback, so the
test server is started with SSRF_PROTECTION_ENABLED=false; nothing else differs
from a default server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from unifl.labeling.client import LabelStudioClient, Secret
from unifl.labeling.server import (
    LABEL_STUDIO_VERSION,
    LabelStudioServer,
    ensure_tool_venv,
    free_port,
    start_server,
)

REPOSITORY = Path(__file__).resolve().parents[2]
SERVER_CACHE = REPOSITORY / ".cache" / "label-studio"
S3_SERVER_CACHE = REPOSITORY / ".cache" / "s3-server"
S3_SERVER_REQUIREMENTS = ["moto[s3]==5.2.5", "flask>=3", "flask-cors>=5"]


@pytest.fixture(scope="session")
def label_studio_document_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the test server; put pairs under it."""
    return tmp_path_factory.mktemp("label-studio-files")


@pytest.fixture(scope="session")
def label_studio(
    tmp_path_factory: pytest.TempPathFactory, label_studio_document_root: Path
) -> Iterator[LabelStudioServer]:
    server = start_server(
        tmp_path_factory.mktemp("label-studio-data"),
        label_studio_document_root,
        cache_dir=SERVER_CACHE,
        version=LABEL_STUDIO_VERSION,
        template_dir=SERVER_CACHE / f"template-{LABEL_STUDIO_VERSION}",
        startup_timeout=600,
        extra_env={"SSRF_PROTECTION_ENABLED": "false"},
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def label_studio_client(label_studio: LabelStudioServer) -> LabelStudioClient:
    """A client authenticated as the server's administrator (legacy token)."""
    return LabelStudioClient(
        label_studio.url, Secret(label_studio.credentials.token, "the test server's admin token")
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an S3-compatible server on 127.0.0.1 (any credentials are accepted)."""
    program = ensure_tool_venv(
        S3_SERVER_CACHE / "venv-moto-5.2.5", S3_SERVER_REQUIREMENTS, "moto_server"
    )
    port = free_port()
    log = (tmp_path_factory.mktemp("s3-server") / "server.log").open("wb")
    process = subprocess.Popen(
        [str(program), "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"S3 test server exited with code {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"S3 test server at {url} did not answer within 60 s")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        log.close()
