"""Simulated annotators: they follow the scorer, disagree with noise, and write real exports."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from typer.testing import CliRunner

from pair_directories import write_pair_directory
from unifl.cli import app
from unifl.config import DIMENSIONS, load_params
from unifl.data.preferences import OVERALL, read_pairs, read_votes
from unifl.labeling.agreement import agreement_report
from unifl.labeling.annotators import (
    AnnotatorError,
    load_scorer,
    make_panel,
    overall_choice,
    score_pairs,
    simulate_choices,
    simulated_export,
)
from unifl.labeling.export import convert_export
from unifl.labeling.label_config import build_label_config
from unifl.labeling.pipeline import label_pairs

# Keys of a task and of an annotation in a JSON export of Label Studio 1.23.2
# Community (recorded from a real server; the integration test re-checks them live).
REAL_TASK_KEYS = {
    "id", "annotations", "drafts", "predictions", "data", "meta", "created_at", "updated_at",
    "allow_skip", "inner_id", "total_annotations", "cancelled_annotations", "total_predictions",
    "comment_count", "unresolved_comment_count", "last_comment_updated_at", "project",
    "updated_by", "comment_authors",
}  # fmt: skip
REAL_ANNOTATION_KEYS = {
    "id", "completed_by", "result", "was_cancelled", "ground_truth", "created_at", "updated_at",
    "draft_created_at", "lead_time", "prediction", "result_count", "unique_id", "import_id",
    "last_action", "bulk_created", "task", "project", "updated_by", "parent_prediction",
    "parent_annotation", "last_created_by",
}  # fmt: skip


def channel_scores(paths: Sequence[Path], prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """A scorer that is easy to reason about: mean of one channel per dimension, in [0, 1]."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64) / 255 for p in paths])
    means = pixels.mean(axis=(1, 2))
    return {
        "color": means[:, 0],
        "layout": means[:, 1],
        "detail": means[:, 2],
        "lighting": means.mean(axis=1),
    }


def channel_scorer_factory(params):
    return channel_scores


def make_pairs(directory: Path, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    colours = [
        tuple(tuple(int(v) for v in rng.integers(0, 256, size=3)) for _ in "ab")
        for _ in range(count)
    ]
    return write_pair_directory(directory, colours)


def test_panel_levels_and_seeds():
    panel = make_panel(5, 0.2, seed=3)
    assert [a.noise for a in panel] == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3])
    assert len({a.seed for a in panel}) == 5
    assert [a.seed for a in make_panel(5, 0.2, seed=3)] == [a.seed for a in panel]
    assert [a.email for a in panel][:2] == ["annotator-1@unifl.local", "annotator-2@unifl.local"]
    assert [a.noise for a in make_panel(2, [0.0, 1.0], seed=0)] == [0.0, 1.0]
    with pytest.raises(AnnotatorError, match="3 noise levels for 2 annotators"):
        make_panel(2, [0.1, 0.2, 0.3], seed=0)
    with pytest.raises(AnnotatorError, match=">= 0"):
        make_panel(2, -0.1, seed=0)


def test_noise_zero_follows_the_scorer_exactly():
    gaps = {
        "color": np.array([0.5, -0.5, 0.01, -0.03]),
        "layout": np.array([0.2, 0.2, -0.2, 0.0]),
        "detail": np.array([-0.1, 0.3, 0.0, 0.021]),
        "lighting": np.array([0.0, -0.9, -0.5, 0.05]),
    }
    zeros = {d: np.zeros(4) for d in DIMENSIONS}
    panel = make_panel(3, 0.0, seed=1)
    # Gaps are compared in units of each dimension's RMS gap over the pairs:
    # color 0.354 -> [1.41, -1.41, 0.028, -0.085]; layout 0.173 -> [1.15, 1.15, -1.15, 0];
    # detail 0.158 -> [-0.63, 1.89, 0, 0.133]; lighting 0.515 -> [0, -1.75, -0.97, 0.097].
    choices = simulate_choices(panel, gaps, zeros, margin=0.1)
    expected = [
        {"color": "A", "layout": "A", "detail": "B", "lighting": "Tie", OVERALL: "A"},
        {"color": "B", "layout": "A", "detail": "A", "lighting": "B", OVERALL: "Tie"},
        {"color": "Tie", "layout": "B", "detail": "Tie", "lighting": "B", OVERALL: "B"},
        {"color": "Tie", "layout": "Tie", "detail": "A", "lighting": "Tie", OVERALL: "A"},
    ]
    for annotator_choices in choices:
        assert annotator_choices == expected
    assert overall_choice({"color": "A", "layout": "B"}) == "Tie"


def alpha_at(noise: float, scores_a, scores_b) -> float:
    panel = make_panel(5, noise, seed=7)
    choices = simulate_choices(panel, scores_a, scores_b, margin=0.02)
    rows = [
        {"pair_id": f"p{i}", "prompt": "p", "image_a": f"{i}a.png", "image_b": f"{i}b.png"}
        | {"seed_a": 0, "seed_b": 1, "model_version": "m", "steps": 1}
        | {"guidance_scale": 1.0, "timestep_spacing": "leading"}
        for i in range(len(scores_a["color"]))
    ]
    export = simulated_export(rows, panel, choices, lambda rel: rel)
    report = agreement_report(convert_export(export).votes)
    return float(np.mean([report["dimensions"][d]["alpha"] for d in DIMENSIONS]))


def test_more_noise_means_less_agreement():
    rng = np.random.default_rng(0)
    scores_a = {d: rng.uniform(0, 1, 200) for d in DIMENSIONS}
    scores_b = {d: rng.uniform(0, 1, 200) for d in DIMENSIONS}
    alphas = [alpha_at(noise, scores_a, scores_b) for noise in (0.0, 0.05, 0.2, 0.8)]
    assert alphas[0] == pytest.approx(1.0)
    assert alphas[0] > alphas[1] > alphas[2] > alphas[3]
    assert alphas[3] < 0.5


def test_simulated_export_has_the_real_layout_and_valid_results(tmp_path):
    rows = make_pairs(tmp_path, 3)
    panel = make_panel(2, 0.1, seed=0)
    scores_a, scores_b = score_pairs(rows, tmp_path, channel_scores)
    choices = simulate_choices(panel, scores_a, scores_b, margin=0.02)
    export = simulated_export(rows, panel, choices, lambda rel: f"/data/local-files/?d={rel}")
    export = json.loads(json.dumps(export))  # exactly what a file would hold
    interface = LabelInterface(build_label_config())
    assert [t["id"] for t in export] == [1, 2, 3]
    for task in export:
        assert set(task) == REAL_TASK_KEYS
        assert [a["completed_by"] for a in task["annotations"]] == [2, 3]
        for annotation in task["annotations"]:
            assert set(annotation) == REAL_ANNOTATION_KEYS
            assert interface.validate_annotation(annotation)
            assert {r["from_name"] for r in annotation["result"]} == {*DIMENSIONS, OVERALL}
    ids = [a["id"] for t in export for a in t["annotations"]]
    assert ids == list(range(1, 7))


def test_scorer_problems_are_named(tmp_path):
    rows = make_pairs(tmp_path, 2)
    with pytest.raises(AnnotatorError, match="no 'lighting' scores"):
        score_pairs(rows, tmp_path, lambda p, q: {d: np.zeros(len(p)) for d in DIMENSIONS[:3]})
    with pytest.raises(AnnotatorError, match="non-finite 'color' score for .*p0_a.png"):
        score_pairs(rows, tmp_path, lambda p, q: {d: np.full(len(p), np.nan) for d in DIMENSIONS})
    with pytest.raises(AnnotatorError, match="1 'color' scores for 2 images"):
        score_pairs(rows, tmp_path, lambda p, q: {d: np.zeros(1) for d in DIMENSIONS})
    (tmp_path / "images" / "p1_b.png").unlink()
    with pytest.raises(AnnotatorError, match="missing"):
        score_pairs(rows, tmp_path, channel_scores)
    params = load_params(None)
    with pytest.raises(AnnotatorError, match="expected 'module:function'"):
        load_scorer("nocolon", params)
    with pytest.raises(AnnotatorError, match="has no function 'nope'"):
        load_scorer("unifl.labeling.annotators:nope", params)


def test_label_stage_without_server_writes_tables_that_follow_the_scorer(tmp_path):
    pairs_dir = tmp_path / "pairs"
    rows = make_pairs(pairs_dir, 6)
    params = load_params(
        None,
        overrides=[
            "labeling.annotator_noise=0",
            "labeling.num_annotators=3",
            "labeling.tie_margin=0",
        ],
    )
    report = label_pairs(params, pairs_dir, tmp_path / "labels", scorer=channel_scores)
    out = tmp_path / "labels"
    assert sorted(p.name for p in out.iterdir()) == [
        "agreement.json",
        "export.json",
        "pairs.parquet",
        "summary.json",
        "votes.parquet",
    ]
    pairs = read_pairs(out / "pairs.parquet")
    votes = read_votes(out / "votes.parquet")
    assert len(votes) == 6 * 3 * 5 and len(pairs) == 6 * 5
    assert report.summary.pairs == 30
    scores_a, scores_b = score_pairs(rows, pairs_dir, channel_scores)
    for i, row in enumerate(rows):
        for dimension in DIMENSIONS:
            got = pairs[(pairs["task_id"] == str(i + 1)) & (pairs["dimension"] == dimension)].iloc[
                0
            ]
            winner = (
                row["image_a"]
                if scores_a[dimension][i] > scores_b[dimension][i]
                else row["image_b"]
            )
            assert got["image_w"] == winner and got["weight"] == 1.0 and not got["tie"]
    agreement = json.loads((out / "agreement.json").read_text())
    assert all(agreement["dimensions"][d]["alpha"] in (1.0, None) for d in DIMENSIONS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == "simulated annotators (no server)"
    # Same seed, same labels, byte for byte (DVC sees an unchanged output).
    label_pairs(params, pairs_dir, tmp_path / "again", scorer=channel_scores)
    pd.testing.assert_frame_equal(read_pairs(tmp_path / "again" / "pairs.parquet"), pairs)
    for name in ("export.json", "agreement.json", "summary.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()


def test_cli_stage_label(tmp_path):
    pairs_dir = tmp_path / "pairs"
    make_pairs(pairs_dir, 2)
    scorer = f"{__name__}:channel_scorer_factory"
    runner = CliRunner()
    (tmp_path / "params.yaml").write_text("{}\n")  # defaults, whatever the repository's file holds
    args = ["stage", "label", "--pairs", str(pairs_dir), "--out", str(tmp_path / "labels")]
    args += ["--params", str(tmp_path / "params.yaml")]
    result = runner.invoke(app, [*args, "--set", f"labeling.scorer={scorer}"])
    assert result.exit_code == 0, result.output
    assert "2 tasks, 10 annotations" in result.output
    assert (tmp_path / "labels" / "pairs.parquet").is_file()
    (pairs_dir / "pairs.jsonl").write_text('{"pair_id": "x"}\n')
    result = runner.invoke(app, [*args, "--set", f"labeling.scorer={scorer}"])
    assert result.exit_code == 2
    assert "pairs.jsonl:1: missing fields" in result.output
    # The earlier labels are untouched by the failed run.
    assert (tmp_path / "labels" / "pairs.parquet").is_file()


def test_noise_means_the_same_on_every_dimension_whatever_its_scale():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(200)
    scores_a = {d: base * (100.0 if d == "color" else 0.01) for d in DIMENSIONS}
    zeros = {d: np.zeros(200) for d in DIMENSIONS}
    panel = make_panel(2, 0.5, seed=3)
    choices = simulate_choices(panel, scores_a, zeros, margin=0.1)
    for annotator_choices in choices:
        colour = [c["color"] for c in annotator_choices]
        detail = [c["detail"] for c in annotator_choices]
        lighting = [c["lighting"] for c in annotator_choices]
        # Same gaps up to scale, so the same agreement with the scorer on each dimension.
        truth = np.where(base > 0, "A", "B")
        rates = [np.mean(np.array(v) == truth) for v in (colour, detail, lighting)]
        assert min(rates) > 0.6 and max(rates) - min(rates) < 0.12
