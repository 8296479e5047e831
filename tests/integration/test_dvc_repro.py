"""`dvc repro` of dvc.yaml on the `ci` preset in a fresh git + DVC repository.

The repository gets the project's dvc.yaml and a params.yaml holding the resolved `ci`
configuration; `dvc repro` then runs every stage through the `unifl stage ...` commands.
Afterwards: the outputs exist, `dvc metrics show` and `dvc plots show` read them, nothing is
out of date, and changing one stage's parameter invalidates that stage and the ones after
it only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unifl.config import load_params, params_to_yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CURATE_OVERRIDES = ["curate.near_duplicate_threshold=1.0", "curate.tau2=1.0"]
STAGES = [
    "toy_world",
    "curate",
    "validate_prompts",
    "pairs",
    "label",
    "validate_labels",
    "reward",
    "pefl",
    "decoupled",
    "adversarial",
    "evaluate",
]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(args: list[str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("dvc-repo")
    run(["git", "init", "-q"], repo)
    # The repository's own DVC set-up, as a clone has it: no `dvc init` of the test's.
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = load_params(
        REPO / "params.yaml",
        preset="ci",
        overrides=[*CURATE_OVERRIDES, f"bootstrap.cache_dir={REPO / '.cache' / 'unifl' / 'toy'}"],
    )
    (repo / "params.yaml").write_text(params_to_yaml(params), encoding="utf-8")
    run([str(BIN / "dvc"), "repro"], repo)
    return repo


def test_repro_runs_every_stage_and_writes_the_outputs(reproduced: Path) -> None:
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    assert lock["stages"]["pefl"]["params"]["params.yaml"]["pefl"]["steps"] == 2
    data = reproduced / "data"
    assert (data / "adversarial" / "model" / "model_index.json").is_file()
    assert (data / "evaluation" / "report.html").is_file()
    assert (data / "reward" / "model").is_dir()
    labels = data / "labels" / "pairs.parquet"
    prompts = data / "prompts" / "prompts.parquet"
    assert labels.is_file() and prompts.is_file()
    gitignored = (data / ".gitignore").read_text()
    assert "/prompts" in gitignored and "/labels" in gitignored


def test_metrics_and_plots_are_readable(reproduced: Path) -> None:
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], reproduced).stdout)
    metrics = shown[""]["data"]  # "" is the workspace
    evaluation = metrics["data/evaluation/metrics.json"]["data"]
    assert 0.0 <= evaluation["caption_match_4steps"] <= 1.0
    assert metrics["data/pefl/metrics.json"]["data"]["steps"] == 2
    assert "val/accuracy_mean" in metrics["data/reward/metrics.json"]["data"]
    plots = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], reproduced).stdout)
    curves = plots["data"]
    for stage in ("pefl", "decoupled", "adversarial"):
        rendered = curves[f"data/{stage}/history.csv"]
        values = [row for plot in rendered for row in plot["content"]["data"]["values"]]
        assert {int(row["step"]) for row in values} == {1, 2}, stage


def test_nothing_is_stale_and_a_parameter_invalidates_only_its_stages(reproduced: Path) -> None:
    status = json.loads(run([str(BIN / "dvc"), "status", "--json"], reproduced).stdout)
    assert status == {}
    params_file = reproduced / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["decoupled"]["learning_rate"] = 3e-5
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        stale = json.loads(run([str(BIN / "dvc"), "status", "--json"], reproduced).stdout)
    finally:
        params_file.write_text(original)
    # decoupled.* is read by PeFL (its L_aes weights), decoupled and adversarial training.
    assert set(stale) == {"pefl", "decoupled", "adversarial"}
