"""A real Label Studio for the integration tests, started once per test session.

The server comes from the package registry (`pip install label-studio==<version>`)
into its own virtual environment under `.cache/label-studio/` in the repository,
installed on first use, so `make test` works on a fresh machine (expect two to
four minutes for the install and about two minutes for the first database
migration; later sessions reuse the venv and a migrated database snapshot and
start in seconds). It listens on 127.0.0.1 with local-file serving under a
temporary document root; its process group is terminated at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unifl.labeling.client import LabelStudioClient, Secret
from unifl.labeling.server import LABEL_STUDIO_VERSION, LabelStudioServer, start_server

REPOSITORY = Path(__file__).resolve().parents[2]
SERVER_CACHE = REPOSITORY / ".cache" / "label-studio"


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
