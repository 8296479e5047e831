"""unifl-collect, people annotating in Label Studio, then unifl-train: kfp.local, a real server.

The collect run pushes its pairs to the test Label Studio (see conftest.py); simulated
annotators then post their annotations through the API as the labeling UI would (the days
of human labeling); the train run pulls them, trains, evaluates and promotes. MLflow is a
SQLite file shared by both runs, as `unifl run` keeps it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from unifl.config import load_params
from unifl.labeling.annotators import (
    annotation_result,
    load_scorer,
    make_panel,
    post_simulated_annotations,
    score_pairs,
    simulate_choices,
)
from unifl.labeling.pipeline import SUMMARY_FILE, push_pairs
from unifl.labeling.tasks import read_pair_manifest
from unifl.orchestration.data_reports import labels_lineage
from unifl.orchestration.local import LocalLayout, latest_collect_outputs, run_local
from unifl.orchestration.summary import task_outputs

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
COLLECT_STAGES = {"curate", "validate-prompts", "pairs", "labeling"}
# The lineage step gives the imported prompts and pairs a nested run each; the pull step and
# the lineage step share the labeling one.
TRAIN_STAGES = {
    "curate",
    "pairs",
    "labeling",
    "validate-labels",
    "reward",
    "pefl",
    "decoupled",
    "adversarial",
    "evaluate",
}


def nested_runs(client, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def parent_run(client, experiment: str, pipeline_run_id: str):
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.`unifl.pipeline_run_id` = '{pipeline_run_id}'",
    )
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in runs]
    return parents[0]


def test_collect_then_annotate_then_train(
    label_studio, label_studio_client, label_studio_document_root, monkeypatch
):
    from mlflow import MlflowClient

    # The step subprocesses find the server and token in the configuration only.
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    title = f"collect-train {uuid.uuid4().hex[:8]}"
    # Under the server's document root, so Local Files storage can serve the pairs.
    out = label_studio_document_root / f"run-{uuid.uuid4().hex[:8]}"
    params = load_params(
        REPO / "params.yaml",
        preset="ci",
        overrides=[
            f"bootstrap.cache_dir={REPO / '.cache' / 'unifl' / 'toy'}",
            f"labeling.url={label_studio.url}",
            f"labeling.token_file={label_studio.token_path}",
            f"labeling.document_root={label_studio_document_root}",
            f"labeling.project_title={title}",
            # A pair needs two votes: the task annotated by one person only is dropped.
            "labeling.min_annotators=2",
        ],
    )
    client = label_studio_client

    # 1. unifl-collect: curate -> validate -> pairs -> push to Label Studio.
    collect = run_local(params, "collect", out_dir=out, progress=False)
    pairs_dir, prompts_dir = collect.outputs["pairs"], collect.outputs["prompts"]
    assert (pairs_dir.is_dir(), prompts_dir.is_dir()) == (True, True)
    assert latest_collect_outputs(LocalLayout(out.resolve())) == (str(pairs_dir), str(prompts_dir))
    rows = read_pair_manifest(pairs_dir)
    assert len(rows) >= 3
    projects = client.find_projects(title)
    assert len(projects) == 1
    project_id = int(projects[0].id)
    tasks = client.export_json(project_id)
    assert sorted(t["data"]["pair_id"] for t in tasks) == sorted(r["pair_id"] for r in rows)
    assert all(not t["annotations"] for t in tasks)
    push_output = json.loads(
        (collect.run_dir / "push-to-label-studio" / "executor_output.json").read_text()
    )
    assert push_output["parameterValues"]["Output"] == str(project_id)

    mlflow = MlflowClient(tracking_uri=collect.tracking_uri, registry_uri=collect.tracking_uri)
    experiment = params.tracking.experiment
    collect_parent = parent_run(mlflow, experiment, collect.pipeline_run_id)
    assert collect_parent.info.status == "FINISHED"
    collected = nested_runs(mlflow, collect_parent.info.run_id)
    assert {run.data.tags["unifl.stage_name"] for run in collected} == COLLECT_STAGES
    push_run = next(run for run in collected if "tasks_imported" in run.data.metrics)
    assert push_run.data.metrics["tasks_imported"] == len(rows)
    assert push_run.data.tags["unifl.lineage.label_studio.project_id"] == str(project_id)
    assert collect_parent.data.tags["unifl.lineage.label_studio.project_id"] == str(project_id)
    assert not mlflow.search_registered_models(f"name = '{params.tracking.registered_model}'")

    # 2. People annotate (simulated, through the API). Every task but the last gets two
    # annotators; the last gets one (dropped: min_annotators=2); the admin skips one task.
    pushed = push_pairs(client, params.labeling, pairs_dir)
    assert pushed.project_id == project_id and pushed.tasks_imported == 0
    assert pushed.tasks_already_present == len(rows)
    panel = make_panel(2, params.labeling.annotator_noise, seed=params.project.seed)
    scores = score_pairs(rows, pairs_dir, load_scorer(params.labeling.scorer, params))
    choices = simulate_choices(panel, *scores, params.labeling.tie_margin)
    posted = post_simulated_annotations(
        client,
        project_id,
        pushed.task_ids_by_pair,
        rows[:-1],
        panel,
        [per_annotator[:-1] for per_annotator in choices],
    )
    assert posted == 2 * (len(rows) - 1)
    lone_annotator = client.ensure_user(panel[0].email)
    last_task = pushed.task_ids_by_pair[rows[-1]["pair_id"]]
    client.create_annotation(
        last_task, annotation_result(choices[0][-1]), completed_by=lone_annotator
    )
    client.create_annotation(pushed.task_ids_by_pair[rows[0]["pair_id"]], [], was_cancelled=True)
    votes_posted = sum(len(annotation_result(c)) for per in choices for c in per)
    dimensions = len(annotation_result(choices[0][0]))
    votes_posted -= dimensions  # annotator 2 never saw the last task

    # 3. unifl-train on the collect run's pairs and prompts.
    train = run_local(
        params,
        "train",
        out_dir=out,
        pairs_uri=str(pairs_dir),
        prompts_uri=str(prompts_dir),
        progress=False,
    )
    labels_dir = task_outputs(train.run_dir)[("pull-labels", "labels")]
    summary = json.loads((labels_dir / SUMMARY_FILE).read_text())
    expected = {
        "tasks": len(rows),
        "annotations": posted + 2,  # with the lone annotation and the skip
        "annotations_cancelled": 1,
        "votes": votes_posted,
        "pairs_dropped_few_votes": dimensions,  # the last task's
        "tasks_dropped_few_votes": 1,
        "pairs": dimensions * (len(rows) - 1),
        "min_annotators": 2,
        "project_id": project_id,
    }
    assert {key: summary[key] for key in expected} == expected

    train_parent = parent_run(mlflow, experiment, train.pipeline_run_id)
    assert train_parent.info.status == "FINISHED"
    trained = nested_runs(mlflow, train_parent.info.run_id)
    assert {run.data.tags["unifl.stage_name"] for run in trained} == TRAIN_STAGES
    assert all(run.info.status == "FINISHED" for run in trained)
    pull_runs = [run for run in trained if run.data.tags["unifl.stage_name"] == "labeling"]
    assert pull_runs and all(
        (run.data.metrics["votes"], run.data.metrics["pairs"])
        == (votes_posted, dimensions * (len(rows) - 1))
        for run in pull_runs
    )
    pefl = next(run for run in trained if run.data.tags["unifl.stage_name"] == "pefl")
    assert len(mlflow.get_metric_history(pefl.info.run_id, "loss")) == params.pefl.steps
    evaluation = next(run for run in trained if run.data.tags["unifl.stage_name"] == "evaluate")
    assert 0.0 <= evaluation.data.metrics["caption_match_4steps"] <= 1.0
    assert train.evaluation_dir is not None and (train.evaluation_dir / "report.html").is_file()

    # A new unifl-sd version from this train run, with the promotion decision.
    versions = mlflow.search_model_versions(f"name = '{params.tracking.registered_model}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = mlflow.get_model_version(params.tracking.registered_model, "1")
    assert version.tags["unifl.pipeline_run_id"] == train.pipeline_run_id
    assert version.tags["unifl.evaluation_run_id"] == evaluation.info.run_id
    # No champion yet and no absolute thresholds in the ci policy: the gates pass.
    assert train.decision is not None
    assert (train.decision["version"], train.decision["promoted"]) == ("1", True)
    assert train_parent.data.tags["unifl.promotion.decision"] == "promoted"
    assert train_parent.data.tags["unifl.promotion.version"] == "1"
    assert version.tags["unifl.gate.staging.verdict"] == "pass"
    assert (version.tags["unifl.stage"], version.aliases) == ("staging", ["challenger"])

    # Lineage: the Label Studio project and export the model was trained on.
    lineage = labels_lineage(labels_dir)
    for tags in (train_parent.data.tags, version.tags):
        assert tags["unifl.lineage.label_studio.project_id"] == str(project_id)
        assert tags["unifl.lineage.label_studio.export_id"] == lineage["export_id"]
    # ... and the prompts and pairs versions: the train run hashes its imported artifacts
    # again and gets the hashes the collect run recorded.
    for data in ("prompts", "pairs"):
        recorded = collect_parent.data.tags[f"unifl.lineage.dvc.{data}"]
        assert train_parent.data.tags[f"unifl.lineage.dvc.{data}"] == recorded
        assert version.tags[f"unifl.lineage.dvc.{data}"] == recorded
