"""Every KFP component's function, called directly, in pipeline order, on the `ci` preset.

The functions are the components' `python_func` (what the pod executes), given artifact
objects whose paths lie in a temporary directory and an MLflow SQLite store; each fixture
runs one step on the outputs of the one before, the way the pipeline wires them. The toy
world comes from the shared bootstrap cache (trained once per configuration).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml
from kfp import dsl

from unifl.components import build_components
from unifl.config import ConfigError, Params, load_params, params_to_yaml
from unifl.orchestration.parameters import DATA_SECTIONS

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "components-test"
DIMENSIONS = ("color", "layout", "detail", "lighting")
# The ci bootstrap's text encoder is barely trained, so nearly all toy captions embed alike
# and near-duplicate removal would leave one prompt; these keep the 16 the preset asks for.
CURATE_OVERRIDES = ["curate.near_duplicate_threshold=1.0", "curate.tau2=1.0"]

COMPONENTS = build_components("unifl:test")


def func(name: str) -> Any:
    return COMPONENTS[name].python_func


class Workspace:
    """Artifact objects under one temporary directory, like the pipeline root of a run."""

    def __init__(self, root: Path, params: Params) -> None:
        self.root = root
        self.params = params
        self.params_yaml = params_to_yaml(params)

    def out(self, kind: type, name: str) -> Any:
        return kind(name=name, uri=str(self.root / name))

    def client(self) -> Any:
        from mlflow import MlflowClient

        uri = self.params.tracking.tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("components")
    params = load_params(
        REPO / "params.yaml",
        preset="ci",
        overrides=[
            *CURATE_OVERRIDES,
            f"bootstrap.cache_dir={REPO / '.cache' / 'unifl' / 'toy'}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        ],
    )
    return Workspace(root, params)


def resolve_kwargs(ws: Workspace, **named: Any) -> dict[str, Any]:
    return {
        "params_yaml": ws.params_yaml,
        "overrides": [],
        "pipeline": "full",
        "pipeline_run_id": RUN_ID,
        "kfp_job_id": "kfp-job-1",
        "gpu_node_selector": {"unifl.io/node-pool": "gpu"},
        "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "label_studio_from_env": False,
        "config": ws.out(dsl.Artifact, "config.yaml"),
        **named,
    }


@pytest.fixture(scope="module")
def resolved(ws: Workspace) -> Any:
    return func("resolve_config")(**resolve_kwargs(ws, pefl_steps=2, registered_model="unifl-sd"))


@pytest.fixture(scope="module")
def boot(ws: Workspace, resolved: Any) -> dict[str, Any]:
    outputs = {
        "base_model": ws.out(dsl.Model, "base_model"),
        "segmenter": ws.out(dsl.Model, "segmenter"),
        "train_data": ws.out(dsl.Dataset, "train_data"),
        "eval_data": ws.out(dsl.Dataset, "eval_data"),
        "metrics": ws.out(dsl.Metrics, "boot_metrics"),
        "report": ws.out(dsl.Markdown, "boot_report.md"),
    }
    version = func("bootstrap_toy")(params_yaml=resolved.data_params_yaml, real_data="", **outputs)
    return {**outputs, "version": version}


@pytest.fixture(scope="module")
def prompts(ws: Workspace, resolved: Any, boot: dict[str, Any]) -> dict[str, Any]:
    outputs = {
        "prompts": ws.out(dsl.Dataset, "prompts"),
        "metrics": ws.out(dsl.Metrics, "curate_metrics"),
        "report": ws.out(dsl.Markdown, "curate_report.md"),
    }
    func("curate_prompts")(
        params_yaml=resolved.data_params_yaml,
        base_model=boot["base_model"],
        prompt_source="",
        dvc_remote=str(ws.root / "dvc-remote"),
        **outputs,
    )
    return outputs


def validate(
    ws: Workspace, resolved: Any, kind: str, table: Any, file: str, name: str, images=None
):
    outputs = {
        "validation": ws.out(dsl.Artifact, f"{name}_validation"),
        "metrics": ws.out(dsl.Metrics, f"{name}_metrics"),
        "report": ws.out(dsl.HTML, f"{name}_report.html"),
    }
    func("validate_data")(
        params_yaml=resolved.data_params_yaml,
        kind=kind,
        table=table,
        table_file=file,
        images=images,
        **outputs,
    )
    return outputs


@pytest.fixture(scope="module")
def prompts_check(ws: Workspace, resolved: Any, prompts: dict[str, Any]) -> dict[str, Any]:
    return validate(ws, resolved, "prompts", prompts["prompts"], "prompts.parquet", "prompts")


@pytest.fixture(scope="module")
def pairs(ws: Workspace, resolved: Any, boot: dict[str, Any], prompts: dict[str, Any]):
    outputs = {
        "pairs": ws.out(dsl.Dataset, "pairs"),
        "metrics": ws.out(dsl.Metrics, "pairs_metrics"),
        "report": ws.out(dsl.Markdown, "pairs_report.md"),
    }
    func("generate_pairs")(
        params_yaml=resolved.data_params_yaml,
        base_model=boot["base_model"],
        prompts=prompts["prompts"],
        dvc_remote="",
        gpu_type="nvidia.com/gpu",
        gpu_count=1,
        **outputs,
    )
    return outputs


def label(ws: Workspace, resolved: Any, pairs: dict[str, Any], name: str, export: str = ""):
    outputs = {
        "labels": ws.out(dsl.Dataset, name),
        "metrics": ws.out(dsl.Metrics, f"{name}_metrics"),
        "report": ws.out(dsl.Markdown, f"{name}_report.md"),
    }
    func("label_preferences")(
        params_yaml=resolved.data_params_yaml,
        pairs=pairs["pairs"],
        labels_export=export,
        dvc_remote="",
        **outputs,
    )
    return outputs


@pytest.fixture(scope="module")
def labels(ws: Workspace, resolved: Any, pairs: dict[str, Any]) -> dict[str, Any]:
    return label(ws, resolved, pairs, "labels")


@pytest.fixture(scope="module")
def labels_check(ws, resolved, labels, pairs) -> dict[str, Any]:
    return validate(
        ws, resolved, "pairs", labels["labels"], "pairs.parquet", "labels", pairs["pairs"]
    )


@pytest.fixture(scope="module")
def lineage(ws, resolved, prompts, prompts_check, pairs, labels, labels_check) -> Any:
    metrics = ws.out(dsl.Metrics, "lineage_metrics")
    func("log_data_lineage")(
        params_yaml=resolved.params_yaml,
        parent_run_id=resolved.parent_run_id,
        prompts=prompts["prompts"],
        prompts_validation=prompts_check["validation"],
        pairs=pairs["pairs"],
        labels=labels["labels"],
        labels_validation=labels_check["validation"],
        metrics=metrics,
    )
    return metrics


@pytest.fixture(scope="module")
def reward(ws, resolved, labels, pairs, lineage) -> dict[str, Any]:
    outputs = {
        "reward_model": ws.out(dsl.Model, "reward_model"),
        "metrics": ws.out(dsl.Metrics, "reward_metrics"),
        "report": ws.out(dsl.Markdown, "reward_report.md"),
    }
    version = func("train_reward")(
        params_yaml=resolved.params_yaml,
        parent_run_id=resolved.parent_run_id,
        labels=labels["labels"],
        pairs=pairs["pairs"],
        gpu_type="nvidia.com/gpu",
        gpu_count=1,
        **outputs,
    )
    return {**outputs, "version": version}


def train(ws: Workspace, resolved: Any, stage: str, name: str, **inputs: Any) -> dict[str, Any]:
    outputs = {
        "model": ws.out(dsl.Model, name),
        "metrics": ws.out(dsl.Metrics, f"{name}_metrics"),
        "report": ws.out(dsl.Markdown, f"{name}_report.md"),
    }
    func(stage)(
        params_yaml=resolved.params_yaml,
        parent_run_id=resolved.parent_run_id,
        run_id=resolved.run_id,
        checkpoint_root=str(ws.root / "checkpoints"),
        gpu_type="nvidia.com/gpu",
        gpu_count=1,
        **inputs,
        **outputs,
    )
    return outputs


@pytest.fixture(scope="module")
def pefl(ws, resolved, boot, reward) -> dict[str, Any]:
    return train(
        ws,
        resolved,
        "pefl",
        "pefl",
        base_model=boot["base_model"],
        train_data=boot["train_data"],
        reward_model=reward["reward_model"],
        segmenter=boot["segmenter"],
    )


@pytest.fixture(scope="module")
def decoupled(ws, resolved, boot, prompts, reward, pefl) -> dict[str, Any]:
    return train(
        ws,
        resolved,
        "decoupled",
        "decoupled",
        base_model=pefl["model"],
        prompts=prompts["prompts"],
        train_data=boot["train_data"],
        reward_model=reward["reward_model"],
    )


@pytest.fixture(scope="module")
def adversarial(ws, resolved, boot, reward, decoupled) -> dict[str, Any]:
    return train(
        ws,
        resolved,
        "adversarial",
        "adversarial",
        base_model=decoupled["model"],
        train_data=boot["train_data"],
        reward_model=reward["reward_model"],
    )


@pytest.fixture(scope="module")
def evaluation(ws, resolved, boot, reward, adversarial) -> dict[str, Any]:
    outputs = {
        "evaluation": ws.out(dsl.Dataset, "evaluation"),
        "metrics": ws.out(dsl.Metrics, "evaluation_metrics"),
        "report": ws.out(dsl.HTML, "evaluation_report.html"),
        "summary": ws.out(dsl.Markdown, "evaluation_summary.md"),
    }
    version = func("evaluate")(
        params_yaml=resolved.params_yaml,
        parent_run_id=resolved.parent_run_id,
        model=adversarial["model"],
        eval_data=boot["eval_data"],
        segmenter=boot["segmenter"],
        reward_model=reward["reward_model"],
        base_model=boot["base_model"],
        gpu_type="nvidia.com/gpu",
        gpu_count=1,
        **outputs,
    )
    return {**outputs, "version": version}


@pytest.fixture(scope="module")
def promotion(ws, resolved, evaluation) -> dict[str, Any]:
    outputs = {
        "decision": ws.out(dsl.Artifact, "decision"),
        "metrics": ws.out(dsl.Metrics, "decision_metrics"),
        "report": ws.out(dsl.Markdown, "decision.md"),
    }
    verdict = func("promote")(
        params_yaml=resolved.params_yaml,
        parent_run_id=resolved.parent_run_id,
        model_version=evaluation["version"],
        target="staging",
        **outputs,
    )
    return {**outputs, "verdict": verdict}


def stage_runs(ws: Workspace, parent_run_id: str) -> dict[str, Any]:
    client = ws.client()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return {run.data.tags["unifl.stage_name"]: run for run in runs}


# ---------------------------------------------------------------------------- tests


def test_resolve_config_opens_the_parent_run_and_slices_the_data_sections(
    ws: Workspace, resolved: Any
) -> None:
    parent = ws.client().get_run(resolved.parent_run_id)
    assert parent.data.tags["unifl.pipeline_run_id"] == RUN_ID == resolved.run_id
    assert parent.data.tags["unifl.kfp_job_id"] == "kfp-job-1"
    assert parent.data.params["pefl.steps"] == "2"
    assert set(yaml.safe_load(resolved.data_params_yaml)) == set(DATA_SECTIONS)
    assert (ws.root / "config.yaml").read_text() == resolved.params_yaml
    # Resolving again (a retried first step) re-opens the same parent run.
    again = func("resolve_config")(**resolve_kwargs(ws, pefl_steps=2))
    assert again.parent_run_id == resolved.parent_run_id


def test_resolve_config_names_a_bad_parameter_before_tracking(ws: Workspace, resolved: Any) -> None:
    client = ws.client()
    experiment = client.get_experiment_by_name(ws.params.tracking.experiment)
    before = len(client.search_runs([experiment.experiment_id]))
    with pytest.raises(ConfigError, match=r"'decoupled_steps' \(decoupled\.steps\)"):
        func("resolve_config")(**resolve_kwargs(ws, pipeline_run_id="bad", decoupled_steps=-1))
    with pytest.raises(ConfigError, match=r"'gpu_tolerations'"):
        func("resolve_config")(
            **resolve_kwargs(ws, pipeline_run_id="bad", gpu_tolerations=[{"effect": "Always"}])
        )
    assert len(client.search_runs([experiment.experiment_id])) == before


def test_resolve_config_hands_on_no_url_credentials(ws: Workspace, tmp_path: Path) -> None:
    from unifl.orchestration.artifacts import ArtifactError, dvc_track
    from unifl.orchestration.parameters import params_from_yaml

    secret = "S3cret-pw-4821"
    params = ws.params.model_copy(deep=True)
    params.pipeline.dvc_remote = f"https://bob:{secret}@dvc.example.com/store"
    params.labeling.url = f"https://bob:{secret}@labels.example.com"
    kwargs = resolve_kwargs(ws, pipeline_run_id="url-credentials")
    kwargs["params_yaml"] = params_to_yaml(params)
    kwargs["config"] = dsl.Artifact(name="config", uri=str(tmp_path / "config.yaml"))
    resolved = func("resolve_config")(**kwargs)

    client = ws.client()
    logged = client.download_artifacts(resolved.parent_run_id, "config/params.yaml", str(tmp_path))
    texts = {
        "params_yaml output": resolved.params_yaml,
        "data_params_yaml output": resolved.data_params_yaml,
        "config artifact": (tmp_path / "config.yaml").read_text(),
        "MLflow config/params.yaml": Path(logged).read_text(),
        "MLflow params": json.dumps(client.get_run(resolved.parent_run_id).data.params),
    }
    for where, text in texts.items():
        assert secret not in text, where
        assert "bob:***@" in text, where
    handed_on = params_from_yaml(resolved.params_yaml)
    assert handed_on.pipeline.dvc_remote == "https://bob:***@dvc.example.com/store"
    # A later step cannot log in with a redacted URL, and says so.
    with pytest.raises(ArtifactError, match="credentials in the URL are not handed from step"):
        dvc_track(tmp_path / "config.yaml", handed_on.pipeline.dvc_remote)
    from unifl.labeling.client import LabelStudioClient, LabelStudioClientError

    with pytest.raises(LabelStudioClientError, match="give the URL without them"):
        LabelStudioClient.from_config(handed_on.labeling)


def test_bootstrap_toy_passes_on_the_toy_world(boot: dict[str, Any]) -> None:
    base = Path(boot["base_model"].path)
    assert (base / "model_index.json").is_file()
    assert (Path(boot["segmenter"].path) / "config.json").is_file()
    assert len(list((Path(boot["train_data"].path) / "images").glob("*.png"))) == 256
    assert len(list((Path(boot["eval_data"].path) / "images").glob("*.png"))) == 32
    assert boot["version"].startswith("toy-") and boot["base_model"].metadata["model_version"]
    assert 0.0 <= boot["metrics"].metadata["caption_match_real"] <= 1.0


def test_curate_prompts_writes_the_table_and_its_dvc_hash(ws: Workspace, prompts) -> None:
    table = pd.read_parquet(Path(prompts["prompts"].path) / "prompts.parquet")
    assert len(table) == 16 == prompts["metrics"].metadata["output_rows"]
    assert table["prompt_id"].is_unique
    md5 = prompts["prompts"].metadata["dvc_md5"]
    assert md5.endswith(".dir") and prompts["prompts"].metadata["dvc_nfiles"] == 2
    # Pushed to the DVC remote under its content address.
    remote = ws.root / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]
    assert remote.is_file()
    assert "Prompt curation" in Path(prompts["report"].path).read_text()


def test_validate_data_reports_and_stops_on_a_bad_table(ws, resolved, prompts_check) -> None:
    from unifl.data.validation import DataValidationError

    assert prompts_check["metrics"].metadata["failed"] == 0
    assert prompts_check["metrics"].metadata["evaluated"] >= 5
    assert "<html" in Path(prompts_check["report"].path).read_text().lower()
    bad = ws.root / "bad_prompts"
    bad.mkdir()
    pd.DataFrame({"prompt_id": ["a", "a"], "prompt": ["a red circle", "a blue square"]}).to_parquet(
        bad / "prompts.parquet"
    )
    with pytest.raises(DataValidationError, match="prompt_id"):
        validate(ws, resolved, "prompts", dsl.Dataset(uri=str(bad)), "prompts.parquet", "bad")


def test_generate_pairs_writes_two_images_per_prompt(pairs: dict[str, Any], boot) -> None:
    from unifl.labeling.tasks import read_pair_manifest

    rows = read_pair_manifest(pairs["pairs"].path)
    assert len(rows) == 16 and pairs["metrics"].metadata["images"] == 32
    assert {row["model_version"] for row in rows} == {boot["version"]}
    assert pairs["pairs"].metadata["dvc_md5"].endswith(".dir")


def test_label_preferences_and_the_same_from_its_export(ws, resolved, pairs, labels) -> None:
    table = pd.read_parquet(Path(labels["labels"].path) / "pairs.parquet")
    assert set(table["dimension"]) == {*DIMENSIONS, "overall"}
    assert len(table) == 16 * 5 == labels["metrics"].metadata["pairs"]
    assert len(labels["labels"].metadata["export_id"]) == 16
    export = Path(labels["labels"].path) / "export.json"
    again = label(ws, resolved, pairs, "labels_from_export", export=str(export))
    converted = pd.read_parquet(Path(again["labels"].path) / "pairs.parquet")
    pd.testing.assert_frame_equal(table, converted)
    assert again["labels"].metadata["export_id"] == labels["labels"].metadata["export_id"]


def test_label_preferences_names_an_export_it_cannot_use(ws: Workspace, tmp_path: Path) -> None:
    from unifl.labeling.pipeline import LabelingError
    from unifl.orchestration.parameters import data_params_yaml
    from unifl.orchestration.steps import StepError

    def run(export: Path) -> Any:
        return func("label_preferences")(
            params_yaml=data_params_yaml(ws.params),
            pairs=dsl.Dataset(name="pairs", uri=str(tmp_path / "pairs")),
            labels_export=str(export),
            dvc_remote="",
            labels=dsl.Dataset(name="labels", uri=str(tmp_path / "labels")),
            metrics=dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics")),
            report=dsl.Markdown(name="report", uri=str(tmp_path / "report.md")),
        )

    latin1 = tmp_path / "export-latin1.json"
    latin1.write_bytes(
        '[{"id": 1, "data": {"prompt": "un caf\u00e9"}, "annotations": []}]'.encode("latin-1")
    )
    with pytest.raises(StepError) as info:
        run(latin1)
    assert str(info.value).startswith(
        f"pipeline parameter 'labels_export': {latin1}: not UTF-8 text (invalid"
    )
    with pytest.raises(StepError, match=r"'labels_export': .*nowhere.json: export file not found"):
        run(tmp_path / "nowhere.json")
    unannotated = tmp_path / "export-unannotated.json"
    unannotated.write_text(json.dumps([{"id": 1, "data": {}, "annotations": []}]))
    with pytest.raises(LabelingError, match=f"export {unannotated}: 0 annotated tasks of 1 "):
        run(unannotated)
    assert not (tmp_path / "labels").exists()


def test_log_data_lineage_records_data_steps_in_the_run(
    ws, resolved, lineage, prompts, pairs, labels
):
    parent = ws.client().get_run(resolved.parent_run_id)
    tags = parent.data.tags
    assert tags["unifl.lineage.dvc.prompts"] == prompts["prompts"].metadata["dvc_md5"]
    assert tags["unifl.lineage.dvc.pairs"] == pairs["pairs"].metadata["dvc_md5"]
    assert tags["unifl.lineage.dvc.labels"] == labels["labels"].metadata["dvc_md5"]
    assert tags["unifl.lineage.label_studio.export_id"] == labels["labels"].metadata["export_id"]
    runs = stage_runs(ws, resolved.parent_run_id)
    assert {"curate", "validate-prompts", "pairs", "labeling", "validate-labels"} <= set(runs)
    assert runs["curate"].data.metrics["output_rows"] == 16
    assert lineage.metadata["labeling/pairs"] == 80


def test_train_reward_registers_the_reward_models(ws, resolved, reward) -> None:
    assert reward["version"] == "1"
    assert (Path(reward["reward_model"].path) / "model").is_dir()
    version = ws.client().get_model_version(ws.params.tracking.reward_registered_model, "1")
    assert version.tags["unifl.pipeline_run_id"] == RUN_ID
    assert version.tags["unifl.lineage.dvc.labels"].endswith(".dir")
    history = ws.client().get_metric_history(
        stage_runs(ws, resolved.parent_run_id)["reward"].info.run_id, "train/loss"
    )
    assert len(history) >= 2 and all(point.value > 0 for point in history)
    for dimension in DIMENSIONS:
        assert 0.0 <= reward["metrics"].metadata[f"val/accuracy/{dimension}"] <= 1.0


def test_pefl_trains_in_its_checkpoint_directory_and_resumes(ws, resolved, boot, reward, pefl):
    assert (Path(pefl["model"].path) / "model" / "model_index.json").is_file()
    assert not (Path(pefl["model"].path) / "checkpoints").exists()  # not in the artifact
    work = Path(pefl["model"].metadata["checkpoint_dir"])
    assert work == ws.root / "checkpoints" / RUN_ID / "pefl"
    assert any((work / "checkpoints").iterdir())
    assert pefl["metrics"].metadata["steps"] == 2 == pefl["metrics"].metadata["steps_this_run"]
    run = stage_runs(ws, resolved.parent_run_id)["pefl"]
    assert [p.step for p in ws.client().get_metric_history(run.info.run_id, "loss")] == [1, 2]
    # A retried pod (same run id, same checkpoint volume) resumes instead of starting over.
    retried = train(
        ws,
        resolved,
        "pefl",
        "pefl_retry",
        base_model=boot["base_model"],
        train_data=boot["train_data"],
        reward_model=reward["reward_model"],
        segmenter=boot["segmenter"],
    )
    assert retried["metrics"].metadata["steps_this_run"] == 0
    assert retried["metrics"].metadata["steps"] == 2


def test_decoupled_and_adversarial_tune_the_model_further(ws, resolved, decoupled, adversarial):
    for outputs in (decoupled, adversarial):
        assert (Path(outputs["model"].path) / "model" / "model_index.json").is_file()
        assert outputs["metrics"].metadata["steps"] == 2
    runs = stage_runs(ws, resolved.parent_run_id)
    assert {"decoupled", "adversarial"} <= set(runs)
    assert "d_loss" in runs["adversarial"].data.metrics


def test_evaluate_registers_the_tuned_model_with_its_evaluation(ws, resolved, evaluation):
    assert evaluation["version"] == "1"
    client = ws.client()
    version = client.get_model_version(ws.params.tracking.registered_model, "1")
    evaluate_run = stage_runs(ws, resolved.parent_run_id)["evaluate"]
    assert version.tags["unifl.evaluation_run_id"] == evaluate_run.info.run_id
    assert version.aliases == ["candidate"]
    assert "caption_match_20steps" in evaluate_run.data.metrics
    assert evaluation["metrics"].metadata["caption_match_4steps"] == pytest.approx(
        evaluate_run.data.metrics["caption_match_4steps"]
    )
    artifacts = {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "evaluation")}
    assert "evaluation/per_prompt.csv" in artifacts and "evaluation/grid_4steps.png" in artifacts
    assert "caption_match" in Path(evaluation["summary"].path).read_text()


def test_promote_moves_the_version_to_staging(ws, resolved, promotion) -> None:
    assert promotion["verdict"] == "promoted"
    decision = json.loads((Path(promotion["decision"].path) / "decision.json").read_text())
    assert decision["target"] == "staging" and decision["gates_passed"]
    client = ws.client()
    version = client.get_model_version(ws.params.tracking.registered_model, "1")
    assert version.aliases == ["challenger"] and version.tags["unifl.stage"] == "staging"
    assert version.tags["unifl.gate.staging.verdict"] == "pass"
    parent = client.get_run(resolved.parent_run_id)
    assert parent.data.tags["unifl.promotion.decision"] == "promoted"


def test_promote_to_production_after_staging(ws, resolved, promotion) -> None:
    outputs = {
        "decision": ws.out(dsl.Artifact, "decision_production"),
        "metrics": ws.out(dsl.Metrics, "decision_production_metrics"),
        "report": ws.out(dsl.Markdown, "decision_production.md"),
    }
    verdict = func("promote")(
        params_yaml=resolved.params_yaml,
        parent_run_id=resolved.parent_run_id,
        model_version="1",
        target="production",
        **outputs,
    )
    assert verdict == "promoted"
    version = ws.client().get_model_version(ws.params.tracking.registered_model, "1")
    assert version.aliases == ["champion"] and version.tags["unifl.stage"] == "production"
    decision = json.loads((Path(outputs["decision"].path) / "decision.json").read_text())
    assert decision["reached"] == "production" and decision["promoted"]


def test_finish_tracking_closes_the_parent_run(ws, resolved, promotion) -> None:
    status = dsl.PipelineTaskFinalStatus(
        state="SUCCEEDED",
        pipeline_job_resource_name="local",
        pipeline_task_name="exit-handler-1",
        error_code=None,
        error_message=None,
    )
    closed = func("finish_tracking")(
        params_yaml=ws.params_yaml,
        overrides=[],
        pipeline_run_id=RUN_ID,
        kfp_job_id="kfp-job-1",
        mlflow_tracking_uri=ws.params.tracking.tracking_uri,
        mlflow_experiment=ws.params.tracking.experiment,
        status=status,
    )
    assert closed == "FINISHED"
    assert ws.client().get_run(resolved.parent_run_id).info.status == "FINISHED"


def run_stage_command(args: list[str]) -> None:
    """Runs `unifl stage <args>` in this process: what the launched processes would run."""
    from typer.testing import CliRunner

    from unifl.cli import app

    result = CliRunner().invoke(app, ["stage", *args])
    assert result.exit_code == 0, result.output


def test_pefl_on_several_gpus_launches_the_stage_command(
    ws, resolved, boot, reward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pipeline.gpu_count > 1: the step hands the stage to `accelerate launch` (replaced here
    by the same command run in this process: this machine has no GPUs)."""
    import unifl.cluster.distributed as distributed

    launched: list[tuple[list[str], dict[str, Any]]] = []

    def fake_run_stage(args: list[str], **options: Any) -> int:
        launched.append((list(args), options))
        run_stage_command(args)
        return 0

    monkeypatch.setattr(distributed, "run_stage", fake_run_stage)
    params = ws.params.model_copy(deep=True)
    params.pipeline.gpu_count = 2
    gpus_run = resolved_for(ws, params, "gpus-run")
    outputs = train(
        ws,
        gpus_run,
        "pefl",
        "pefl_gpus",
        base_model=boot["base_model"],
        train_data=boot["train_data"],
        reward_model=reward["reward_model"],
        segmenter=boot["segmenter"],
    )
    ((args, options),) = launched
    work = ws.root / "checkpoints" / "gpus-run" / "pefl"
    assert args[0] == "pefl" and args[args.index("--out") + 1] == str(work)
    assert args[args.index("--params") + 1] == str(work / "stage_params.yaml")
    assert args[args.index("--base") + 1] == boot["base_model"].path
    assert options["num_processes"] == 2 and options["strategy"] == "auto"
    assert outputs["model"].metadata["training_mode"] == "gpus"
    assert (Path(outputs["model"].path) / "model" / "model_index.json").is_file()
    run = stage_runs(ws, gpus_run.parent_run_id)["pefl"]
    assert run.data.tags["unifl.training_mode"] == "gpus"
    # The per-step metrics come from the stage's history once the processes are done.
    assert [p.step for p in ws.client().get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_pefl_on_several_nodes_runs_a_training_job_from_the_shared_volume(
    ws, resolved, boot, reward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cluster.num_nodes > 1: the step stages its inputs on the checkpoint volume and starts a
    TrainJob through `unifl.cluster.launcher` (replaced here, as no Kubernetes API server
    can run, by the job's command run in this process)."""
    import unifl.cluster.launcher as launcher
    import unifl.cluster.settings as settings

    jobs: list[dict[str, Any]] = []

    def fake_launch(stage: str, stage_args: list[str], **job: Any) -> None:
        jobs.append({"stage": stage, "args": list(stage_args), **job})
        run_stage_command([stage, *stage_args])

    training = SimpleNamespace(namespace="ml", api="trainjob")
    monkeypatch.setattr(launcher, "launch_training_stage", fake_launch)
    monkeypatch.setattr(
        settings, "load_cluster_settings", lambda needs: SimpleNamespace(training=training)
    )
    monkeypatch.setenv("UNIFL_IMAGE", "registry.example/unifl:1.0-cuda")
    params = ws.params.model_copy(deep=True)
    params.cluster.num_nodes = 2
    outputs = train(
        ws,
        resolved_for(ws, params, "nodes-run"),
        "pefl",
        "pefl_nodes",
        base_model=boot["base_model"],
        train_data=boot["train_data"],
        reward_model=reward["reward_model"],
        segmenter=boot["segmenter"],
    )
    (job,) = jobs
    work = ws.root / "checkpoints" / "nodes-run" / "pefl"
    assert job["stage"] == "pefl" and job["run_id"] == "nodes-run"
    assert job["image"] == "registry.example/unifl:1.0-cuda" and job["settings"] is training
    assert (job["num_nodes"], job["gpus_per_node"]) == (2, 1)
    for name in ("base", "data", "reward", "segmenter"):
        staged = job["args"][job["args"].index(f"--{name}") + 1]
        assert staged.startswith(str(work / "inputs")), name  # on the shared volume
    assert not (Path(outputs["model"].path) / "inputs").exists()
    assert outputs["model"].metadata["training_mode"] == "nodes"
    assert outputs["metrics"].metadata["steps"] == 2


def resolved_for(ws: Workspace, params: Params, run_id: str) -> Any:
    """The first step's outputs for another configuration, as a run of its own."""
    kwargs = resolve_kwargs(ws, pipeline_run_id=run_id)
    kwargs["params_yaml"] = params_to_yaml(params)
    return func("resolve_config")(**kwargs)
