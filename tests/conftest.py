"""Shared test settings: offline, quiet telemetry, few threads, fixed seeds."""

import os

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Must be set before torch loads: spin-waiting OpenMP threads slow a busy 2-core machine 10x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ci_bootstrap(tmp_path_factory):
    """The toy world bootstrapped once per test session with the tiny `ci` preset."""
    from unifl.config import load_params
    from unifl.toy.bootstrap import bootstrap_toy_world

    cache = tmp_path_factory.mktemp("toy-cache")
    params = load_params(None, preset="ci", overrides=[f"bootstrap.cache_dir={cache}"])
    return bootstrap_toy_world(params, progress=False)
