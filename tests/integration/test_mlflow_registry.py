"""Tracking, model logging and registry promotion against a real MLflow server on loopback.

The server is started once for the module by `running_mlflow_server` (mlflow/server.sh,
SQLite + served artifacts in a temporary directory). Each test uses its own experiment
and registered model names so the tests do not see each other's runs.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from unifl.config import Params, load_params
from unifl.tracking.lineage import lineage_tags
from unifl.tracking.promotion import GatePolicy, PromotionError, promote, promote_from_params
from unifl.tracking.registry import (
    ALIASES,
    EVALUATION_RUN_TAG,
    register_model_version,
    version_by_alias,
)
from unifl.tracking.runs import (
    TrackingError,
    attach_run,
    connect,
    finish_pipeline_run,
    stage_run,
    start_pipeline_run,
)

from .mlflow_server import REPOSITORY, MlflowServer, running_mlflow_server

pytestmark = pytest.mark.integration

TOKEN = "ls-a1b2c3d4e5f6a7b8c9d0"
NUM_PROMPTS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def make_params(server: MlflowServer, *overrides: str) -> Params:
    name = uuid.uuid4().hex[:8]
    return load_params(
        None,
        overrides=[
            f"tracking.tracking_uri={server.url}",
            f"tracking.experiment=exp-{name}",
            f"tracking.registered_model=model-{name}",
            "promotion.bootstrap_samples=500",
            "promotion.policy_file=null",
            *overrides,
        ],
    )


def per_prompt_table(shift: float, seed: int) -> pd.DataFrame:
    """Per-prompt rewards: prompt difficulty (shared) + model shift + small noise."""
    difficulty = np.random.default_rng(0).normal(0.0, 1.0, size=NUM_PROMPTS)
    noise = np.random.default_rng(seed).normal(0.0, 0.02, size=NUM_PROMPTS)
    values = difficulty + shift + noise
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i:02d}" for i in range(NUM_PROMPTS)],
            "prompt": [f"a red circle number {i}" for i in range(NUM_PROMPTS)],
            "reward_color": values,
        }
    )


def candidate_version(
    params: Params, parent: str, stage: str, shift: float, seed: int, with_table: bool = True
) -> str:
    """A version logged by a training run and judged by a separate evaluation run.

    The evaluation run logs an evaluation output directory (metrics.json, per_prompt.csv)
    the way the evaluate stage writes it; the version points at it by tag.
    """
    table = per_prompt_table(shift, seed)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "evaluation"
        out_dir.mkdir()
        if with_table:
            table.to_csv(out_dir / "per_prompt.csv", index=False)
        metrics = {"reward_color": float(table["reward_color"].mean()), "clip": 0.3 + shift}
        (out_dir / "metrics.json").write_text(json.dumps(metrics))
        with stage_run(f"evaluate-{stage}", parent, params) as evaluation:
            evaluation.log_evaluation(out_dir)
    with stage_run(f"train-{stage}", parent, params) as run:
        run.log_text("weights", "model/weights.txt")
        version = register_model_version(
            run.client,
            params.tracking.registered_model,
            f"{run.artifact_uri}/model",
            run_id=run.run_id,
            evaluation_run_id=evaluation.run_id,
        )
    assert version.run_id != evaluation.run_id
    return str(version.version)


def test_pipeline_run_with_nested_stages(server: MlflowServer, monkeypatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    params = make_params(server, f"labeling.project_title=labels {TOKEN}")
    tags = {
        **lineage_tags(
            {"data/pairs": "abc.dir"}, label_studio_project_id=3, label_studio_export_id=9
        ),
        "note": f"token {TOKEN}",
    }
    parent = start_pipeline_run(params, "kfp-run-1", tags=tags)
    assert start_pipeline_run(params, "kfp-run-1") == parent  # a retried pipeline re-attaches

    with stage_run("pefl", parent, params) as run:
        for step in range(5):
            run.metrics_callback(step, {"loss": 1.0 / (step + 1), "reward/color": 0.1 * step})
        run.log_table(per_prompt_table(0.0, 1), "evaluation/per_prompt.csv")
        run.log_table(per_prompt_table(0.0, 1), "evaluation/per_prompt.json")
        run.log_text("<html><body>report</body></html>", "reports/pefl.html")
        from PIL import Image

        run.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "samples/grid.png")
        run.log_lineage(label_studio_export_id="e-17")
        first_run_id = run.run_id
    with stage_run("pefl", parent, params) as again:  # a retried stage resumes its run
        assert again.run_id == first_run_id

    with pytest.raises(RuntimeError, match="boom"), stage_run("decoupled", parent, params):
        raise RuntimeError("boom")
    attach_run(params, parent).log_metrics({"wall_minutes": 1.5})
    with pytest.raises(TrackingError, match="run '0123' not found"):
        attach_run(params, "0123")
    finish_pipeline_run(params, parent)

    client = connect(params.tracking)
    parent_run = client.get_run(parent)
    stage = client.get_run(first_run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics["wall_minutes"] == 1.5
    assert stage.data.tags["mlflow.parentRunId"] == parent
    assert stage.data.tags["unifl.pipeline_run_id"] == "kfp-run-1"
    assert parent_run.data.params["pefl.steps"] == "200"
    assert stage.data.params["pefl.steps"] == "200" and "toy.seed" not in stage.data.params
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True
    ).stdout.strip()
    if head:
        assert parent_run.data.tags["unifl.git_commit"] == head
        assert parent_run.data.tags["mlflow.source.git.commit"] == head
    assert parent_run.data.tags["unifl.lineage.dvc.data/pairs"] == "abc.dir"
    assert parent_run.data.tags["unifl.lineage.label_studio.project_id"] == "3"
    assert stage.data.tags["unifl.lineage.label_studio.export_id"] == "e-17"

    history = client.get_metric_history(first_run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    artifacts = {a.path for a in client.list_artifacts(first_run_id, "evaluation")}
    assert artifacts == {"evaluation/per_prompt.csv", "evaluation/per_prompt.json"}
    assert {a.path for a in client.list_artifacts(first_run_id, "samples")} == {"samples/grid.png"}
    local = client.download_artifacts(first_run_id, "evaluation/per_prompt.csv", str(server.root))
    assert pd.read_csv(local)["reward_color"].to_numpy() == pytest.approx(
        per_prompt_table(0.0, 1)["reward_color"].to_numpy()
    )
    failed = client.search_runs(
        [parent_run.info.experiment_id], "tags.`unifl.stage_name` = 'decoupled'"
    )
    assert [r.info.status for r in failed] == ["FAILED"]

    # The token from the environment reached neither params nor tags of any run.
    for run_info in client.search_runs([parent_run.info.experiment_id]):
        data = run_info.data
        assert all(TOKEN not in f"{k}={v}" for k, v in {**data.params, **data.tags}.items())
    assert "labeling.project_title" not in parent_run.data.params
    assert "note" not in parent_run.data.tags


def test_resumed_pipeline_run_must_keep_its_params(server: MlflowServer) -> None:
    params = make_params(server)
    start_pipeline_run(params, "kfp-run-2")
    changed = params.model_copy(deep=True)
    changed.pefl.steps = 7
    with pytest.raises(TrackingError, match="different values for pefl.steps"):
        start_pipeline_run(changed, "kfp-run-2")


def test_unreachable_server_fails_fast_with_the_uri(server: MlflowServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = load_params(None, overrides=[f"tracking.tracking_uri=http://127.0.0.1:{port}"])
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port} is unreachable"):
        start_pipeline_run(params, "kfp-run-3")
    with pytest.raises(TrackingError, match="unreachable"), stage_run("pefl", None, params):
        pass
    assert time.monotonic() - start < 5


def test_a_server_that_stops_answering_is_reported(monkeypatch) -> None:
    from mlflow import MlflowClient

    from unifl.config import TrackingConfig
    from unifl.tracking.runs import StageRun, configure_http

    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    configure_http(TrackingConfig(http_max_retries=1, http_timeout_s=2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    gone = StageRun(MlflowClient(uri), "0" * 32, "pefl", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} stopped answering"):
        gone.metrics_callback(3, {"loss": 0.5})
    assert time.monotonic() - start < 15


def test_a_uri_that_is_not_the_server_root_is_reported(server: MlflowServer) -> None:
    params = load_params(None, overrides=[f"tracking.tracking_uri={server.url}/not-mlflow"])
    with pytest.raises(TrackingError, match=r"/not-mlflow answered 404 on /health"):
        start_pipeline_run(params, "kfp-run-4")


def test_promotion_lifecycle_with_legacy_stages(server: MlflowServer, monkeypatch) -> None:
    monkeypatch.setenv("UNIFL_USER", "release-manager")
    params = make_params(
        server,
        "promotion.legacy_stages=true",
        "promotion.thresholds={clip: 0.25}",
        "promotion.champion_metrics={reward_color: higher}",
        "promotion.tolerance={reward_color: 0.05}",
    )
    name = params.tracking.registered_model
    client = connect(params.tracking)
    parent = start_pipeline_run(params, "kfp-run-5")

    # v1: the first model, no champion to compare with.
    v1 = candidate_version(params, parent, "v1", shift=0.0, seed=1)
    assert version_by_alias(client, name, "candidate").version == v1
    first = promote_from_params(params, None, v1, target="staging")
    assert first.promoted and first.gates_passed and first.champion_version is None
    with pytest.raises(PromotionError, match="already at staging"):
        promote_from_params(params, None, v1, target="staging")
    assert promote_from_params(params, None, v1, target="production").promoted
    assert version_by_alias(client, name, "champion").version == v1
    assert version_by_alias(client, name, "challenger") is None
    assert version_by_alias(client, name, "candidate") is None

    # v2: clearly better on the same prompts; it replaces v1, which is archived.
    v2 = candidate_version(params, parent, "v2", shift=0.3, seed=2)
    with pytest.raises(PromotionError, match="promote it to staging first"):
        promote_from_params(params, None, v2, target="production")
    staged = promote_from_params(params, None, v2, target="staging")
    assert staged.promoted and staged.champion_version == v1
    comparison = next(g for g in staged.gates if g.kind == "champion")
    assert comparison.num_prompts == NUM_PROMPTS and comparison.ci_low > 0.25
    assert version_by_alias(client, name, "challenger").version == v2
    assert client.get_model_version(name, v2).current_stage == "Staging"
    produced = promote_from_params(params, None, v2, target="production")
    assert produced.promoted and produced.replaced_version == v1
    assert version_by_alias(client, name, ALIASES["production"]).version == v2
    old = client.get_model_version(name, v1)
    new = client.get_model_version(name, v2)
    assert old.tags["unifl.stage"] == "archived" and old.tags["unifl.replaced_by"] == v2
    assert old.current_stage == "Archived" and new.current_stage == "Production"
    assert new.tags["unifl.stage"] == "production"
    assert new.tags["unifl.gate.production.verdict"] == "pass"
    assert new.tags["unifl.gate.production.by"] == "release-manager"
    assert '"ci_low"' in new.tags["unifl.gate.production.champion.reward_color"]
    assert f'"champion_version": "{v1}"' in new.tags["unifl.gate.production.inputs"]

    # v3: clearly worse than the champion and under the threshold: never promoted by the gate.
    v3 = candidate_version(params, parent, "v3", shift=-0.3, seed=3)
    rejected = promote(client, name, v3, gate_policy(params))
    assert not rejected.promoted and not rejected.gates_passed
    assert {g.name for g in rejected.failed_gates} == {"min.clip", "champion.reward_color"}
    version = client.get_model_version(name, v3)
    assert version.tags["unifl.stage"] == "candidate"
    assert version.tags["unifl.gate.staging.verdict"] == "fail"
    assert version.tags["unifl.gate.staging.decision"] == "rejected"
    assert version.current_stage == "None"
    assert version_by_alias(client, name, "challenger") is None
    assert version_by_alias(client, name, "champion").version == v2

    # An override needs a reason; with one, it promotes and is recorded on the version.
    with pytest.raises(PromotionError, match="needs a reason"):
        promote(client, name, v3, gate_policy(params), override_reason="  ")
    forced = promote(
        client, name, v3, gate_policy(params), override_reason="hotfix for a broken prompt"
    )
    assert forced.promoted and forced.overridden and not forced.gates_passed
    version = client.get_model_version(name, v3)
    assert version.tags["unifl.override.staging.reason"] == "hotfix for a broken prompt"
    assert version.tags["unifl.override.staging.by"] == "release-manager"
    assert version.tags["unifl.override.staging.at"].startswith("20")
    assert version.tags["unifl.gate.staging.verdict"] == "fail"
    assert version.tags["unifl.gate.staging.decision"] == "promoted (override)"
    assert version_by_alias(client, name, "challenger").version == v3
    assert version_by_alias(client, name, "champion").version == v2

    # v4: an evaluation without the per-prompt table cannot show it is not worse.
    v4 = candidate_version(params, parent, "v4", shift=0.3, seed=4, with_table=False)
    blind = promote(client, name, v4, gate_policy(params))
    assert not blind.promoted
    assert [g.detail for g in blind.failed_gates] == [
        "candidate has no per-prompt table (evaluation/per_prompt.csv)"
    ]
    # Production takes the version that holds the staging alias, not a stale staging tag.
    client.set_model_version_tag(name, v4, "unifl.stage", "staging")
    with pytest.raises(PromotionError, match=rf"v{v4} is tagged staging, but v{v3} holds"):
        promote(client, name, v4, gate_policy(params), target="production")
    client.set_model_version_tag(name, v4, "unifl.stage", "candidate")
    # A policy without a single gate checks nothing, so it promotes nothing.
    ungated = promote(client, name, v4, GatePolicy(compare_to_champion=False))
    assert not ungated.promoted
    assert [g.name for g in ungated.failed_gates] == ["policy"]
    assert "no promotion gates configured" in ungated.failed_gates[0].detail


def gate_policy(params: Params) -> GatePolicy:
    return GatePolicy.from_config(params.promotion, base_dir=REPOSITORY)


def test_promote_command(server: MlflowServer, tmp_path: Path) -> None:
    from unifl.cli import app

    params = make_params(server, "promotion.thresholds={clip: 0.25}")
    parent = start_pipeline_run(params, "kfp-run-6")
    good = candidate_version(params, parent, "good", shift=0.0, seed=1)
    bad = candidate_version(params, parent, "bad", shift=-0.2, seed=2)
    common = [
        "--params", str(tmp_path / "none.yaml"),
        "--set", f"tracking.tracking_uri={server.url}",
        "--set", f"tracking.registered_model={params.tracking.registered_model}",
        "--set", "promotion.thresholds={clip: 0.25}",
        # The evaluations here log `clip` alone, not the policy file's champion metrics.
        "--set", "promotion.compare_to_champion=false",
        "--set", "promotion.bootstrap_samples=100",
    ]  # fmt: skip
    (tmp_path / "none.yaml").write_text("{}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["promote", "--version", good, *common])
    assert result.exit_code == 0, result.output
    assert f"v{good}: gates PASS, promoted to staging" in result.output
    result = runner.invoke(app, ["promote", "--version", bad, *common])
    assert result.exit_code == 1
    assert "[FAIL] min.clip: 0.1 not >= 0.25" in result.output
    result = runner.invoke(app, ["promote", "--version", bad, "--override", *common])
    assert result.exit_code == 2 and "--reason" in result.output
    result = runner.invoke(
        app, ["promote", "--version", bad, "--override", "--reason", "demo", *common]
    )
    assert result.exit_code == 0 and "promoted to staging (override)" in result.output
    result = runner.invoke(app, ["promote", "--version", "99", *common])
    assert result.exit_code == 2 and "has no version 99" in result.output
    result = runner.invoke(app, ["promote", "--version", "abc", *common])
    assert result.exit_code == 2 and "version 'abc'" in result.output
    ghost = candidate_version(params, parent, "ghost", shift=0.0, seed=3)
    client = connect(params.tracking)
    name = params.tracking.registered_model
    client.set_model_version_tag(name, ghost, EVALUATION_RUN_TAG, "0" * 32)
    result = runner.invoke(app, ["promote", "--version", ghost, *common])
    assert result.exit_code == 2
    assert f"v{ghost}: its evaluation run {'0' * 32} cannot be read" in result.output
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = runner.invoke(
        app, ["promote", "--version", good, *common, "--set", f"tracking.tracking_uri={closed}"]
    )
    assert result.exit_code == 2
    assert f"error: MLflow tracking server {closed} is unreachable" in result.output
    assert "Traceback" not in result.output


def test_reward_model_pyfunc_round_trip(server: MlflowServer, tmp_path: Path) -> None:
    import mlflow.pyfunc
    import torch
    from PIL import Image

    from unifl.models.reward import build_toy_reward_model
    from unifl.tracking.models import log_reward_model

    torch.manual_seed(0)
    reward = build_toy_reward_model(image_size=32, seed=0)
    reward.save(tmp_path / "reward")
    params = make_params(server)
    with stage_run("reward", None, params) as run:
        ref = log_reward_model(
            run, tmp_path / "reward", registered_model_name=params.tracking.reward_registered_model
        )
    assert ref.version == "1" and ref.registry_uri.endswith("/1")

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    prompts = ["a red circle", "a blue square", "a green triangle"]
    loaded = mlflow.pyfunc.load_model(ref.registry_uri)
    scores = loaded.predict(pd.DataFrame({"image": encoded, "prompt": prompts}))
    assert list(scores.columns) == ["color", "layout", "detail", "lighting"]
    with torch.no_grad():
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        expected = reward(images, prompts=prompts)
    for dimension in scores.columns:
        assert scores[dimension].to_numpy() == pytest.approx(expected[dimension].numpy(), abs=1e-5)


@pytest.fixture(scope="module")
def toy_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1.5-layout model (same classes as production) saved as a diffusers directory."""
    from unifl.models.base import save_base_model
    from unifl.models.toy_presets import build_toy_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return save_base_model(build_toy_model("toy-sd15"), tmp_path_factory.mktemp("toy") / "base")


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGB"))


def test_diffusion_pyfunc_logs_registers_loads_and_generates(
    server: MlflowServer, toy_base_dir: Path
) -> None:
    import mlflow.pyfunc
    import torch

    from unifl.config import SamplingConfig
    from unifl.models.base import load_base_model
    from unifl.models.sampler import generate
    from unifl.tracking.models import log_diffusion_model

    params = make_params(server)
    sampling = SamplingConfig(steps=2, guidance_scale=3.0, timestep_spacing="trailing")
    with stage_run("adversarial", None, params) as run:
        ref = log_diffusion_model(
            run, toy_base_dir, sampling, registered_model_name=params.tracking.registered_model
        )
    assert ref.version == "1"
    client = connect(params.tracking)
    version = client.get_model_version(params.tracking.registered_model, "1")
    assert version.tags["unifl.stage"] == "candidate" and version.run_id == ref.run_id

    loaded = mlflow.pyfunc.load_model(ref.registry_uri)
    prompts = ["a red circle", "a blue square"]
    output = loaded.predict(pd.DataFrame({"prompt": prompts}), params={"seed": 3})
    assert list(output.columns) == ["prompt", "image"] and output["prompt"].tolist() == prompts
    pixels = np.stack([_decode_png(data) for data in output["image"]])
    assert pixels.shape == (2, 32, 32, 3)

    # The served model generates exactly what the library does with the logged defaults.
    model = load_base_model(toy_base_dir)
    with torch.no_grad():
        expected = generate(model, prompts, steps=2, guidance_scale=3.0, seed=3,
                            timestep_spacing="trailing")  # fmt: skip
    expected_pixels = (expected.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(pixels, expected_pixels.numpy())
    other_seed = loaded.predict(pd.DataFrame({"prompt": prompts[:1]}), params={"seed": 4})
    assert not np.array_equal(_decode_png(other_seed["image"][0]), pixels[0])


def test_lora_adapter_through_the_diffusers_flavor(
    server: MlflowServer, toy_base_dir: Path, tmp_path: Path
) -> None:
    import mlflow.diffusers
    import mlflow.pyfunc
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    from unifl.models.base import load_base_model
    from unifl.tracking.models import log_lora_adapter, save_lora_adapter

    model = load_base_model(toy_base_dir)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model.unet.add_adapter(lora)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: non-zero B matrices
        for name, parameter in model.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    adapter = save_lora_adapter(model.unet, tmp_path / "adapter")

    params = make_params(server)
    with stage_run("decoupled", None, params) as run:
        ref = log_lora_adapter(
            run, adapter, str(toy_base_dir), registered_model_name="unifl-lora-" + run.run_id[:6]
        )
    assert ref.version == "1"
    flavor = mlflow.diffusers.load_model(ref.registry_uri)
    assert flavor.base_model == str(toy_base_dir.resolve()) and flavor.adapter_type == "lora"

    def images(pipeline_output) -> list[np.ndarray]:
        return [_decode_png(data) for data in pipeline_output]

    request = {"num_inference_steps": 2, "height": 32, "width": 32, "guidance_scale": 3.0}
    loaded = mlflow.pyfunc.load_model(ref.registry_uri)
    torch.manual_seed(5)
    with_adapter = images(
        loaded.predict(pd.DataFrame({"prompt": ["a red circle"]}), params=request)
    )
    # The served pipeline carries the trained adapter (same LoRA B weights, not zeros) ...
    served_unet = loaded.get_raw_model().unet
    trained = sum(
        float(p.detach().abs().sum()) for n, p in model.unet.named_parameters() if "lora_B" in n
    )
    served = sum(
        float(p.detach().abs().sum()) for n, p in served_unet.named_parameters() if "lora_B" in n
    )
    assert trained > 0 and served == pytest.approx(trained, rel=1e-5)
    # ... and generates what diffusers' own LoRA loading generates.
    base = DiffusionPipeline.from_pretrained(str(toy_base_dir))
    base.load_lora_weights(str(adapter))
    torch.manual_seed(5)
    reference = base(prompt=["a red circle"], output_type="pil", **request).images
    assert with_adapter[0].shape == (32, 32, 3)
    assert np.array_equal(with_adapter[0], np.asarray(reference[0]))


def test_pyfunc_inputs_are_checked() -> None:
    from unifl.tracking.pyfunc_models import PyfuncInputError, decode_image, prompts_from_input

    assert prompts_from_input(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert prompts_from_input({"prompt": "a"}) == ["a"]
    assert prompts_from_input(["a", "b"]) == ["a", "b"]
    with pytest.raises(PyfuncInputError, match="no 'prompt' column"):
        prompts_from_input(pd.DataFrame({"text": ["a"], "other": [1]}))
    with pytest.raises(PyfuncInputError, match="row 1: prompt must be a string"):
        prompts_from_input(["a", 3])
    with pytest.raises(PyfuncInputError, match="no prompts"):
        prompts_from_input([])
    with pytest.raises(PyfuncInputError, match="row 2: image bytes are not a readable image"):
        decode_image(b"not a png", 2)
    with pytest.raises(PyfuncInputError, match="row 0: image is text but not base64"):
        decode_image("%%%", 0)
