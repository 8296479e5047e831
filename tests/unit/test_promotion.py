"""Gate math of the promotion: bootstrap interval, paired champion comparison, thresholds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unifl.config import ConfigError, PromotionConfig
from unifl.tracking.promotion import (
    GatePolicy,
    PromotionError,
    bootstrap_mean_ci,
    check_threshold,
    compare_with_champion,
    evaluate_gates,
    per_prompt_means,
    read_policy_file,
)

SAMPLES = 2000


def _table(
    values: np.ndarray, metric: str = "reward", ids: list[str] | None = None
) -> pd.DataFrame:
    ids = ids or [f"p{i:03d}" for i in range(len(values))]
    frame = pd.DataFrame({"prompt_id": ids, metric: values})
    return per_prompt_means(frame, "test table", [metric])


def _compare(candidate: np.ndarray, champion: np.ndarray, direction="higher", tolerance=0.0):
    return compare_with_champion(
        "reward", direction, _table(candidate), _table(champion), tolerance,
        confidence=0.95, samples=SAMPLES, seed=0, min_prompts=4,
    )  # fmt: skip


@pytest.fixture
def champion_values() -> np.ndarray:
    # Prompt difficulty varies far more than the model difference tested below.
    return np.random.default_rng(1).normal(0.0, 1.0, size=40)


def test_bootstrap_is_deterministic_and_covers_the_mean() -> None:
    values = np.random.default_rng(2).normal(0.3, 0.1, size=50)
    first = bootstrap_mean_ci(values, 0.95, SAMPLES, seed=7)
    assert first == bootstrap_mean_ci(values, 0.95, SAMPLES, seed=7)
    mean, low, high = first
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    # The percentile interval is close to the normal one: +-1.96 standard errors.
    standard_error = values.std(ddof=1) / np.sqrt(values.size)
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.15)
    # A wider confidence gives a wider interval.
    _, low_99, high_99 = bootstrap_mean_ci(values, 0.99, SAMPLES, seed=7)
    assert low_99 < low and high_99 > high


def test_bootstrap_of_constant_values_is_a_point() -> None:
    assert bootstrap_mean_ci(np.full(10, -0.25), 0.9, 100, seed=0) == pytest.approx(
        (-0.25, -0.25, -0.25)
    )


def test_bootstrap_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci(np.array([]), 0.95, 100, seed=0)


def test_clearly_better_candidate_passes(champion_values: np.ndarray) -> None:
    noise = np.random.default_rng(3).normal(0.0, 0.05, size=champion_values.size)
    result = _compare(champion_values + 0.5 + noise, champion_values)
    assert result.passed
    assert result.value == pytest.approx(0.5 + noise.mean())
    assert result.ci_low > 0.4 and result.ci_high < 0.6
    assert result.num_prompts == 40


def test_clearly_worse_candidate_fails(champion_values: np.ndarray) -> None:
    noise = np.random.default_rng(4).normal(0.0, 0.05, size=champion_values.size)
    result = _compare(champion_values - 0.5 + noise, champion_values, tolerance=0.1)
    assert not result.passed
    assert result.ci_high < -0.4
    assert "< -0.1" in result.detail


def test_equal_within_tolerance_passes_and_fails_without_it(champion_values: np.ndarray) -> None:
    noise = np.random.default_rng(5).normal(0.0, 0.01, size=champion_values.size)
    slightly_worse = champion_values - 0.02 + noise
    within = _compare(slightly_worse, champion_values, tolerance=0.05)
    assert within.passed
    # Truly worse (the interval excludes 0), but by less than the tolerance.
    assert -0.05 <= within.ci_low < within.value < within.ci_high < 0
    assert not _compare(slightly_worse, champion_values, tolerance=0.0).passed


def test_lower_is_better_flips_the_sign(champion_values: np.ndarray) -> None:
    lower = _compare(champion_values - 0.5, champion_values, direction="lower")
    assert lower.passed and lower.value == pytest.approx(0.5)
    higher = _compare(champion_values + 0.5, champion_values, direction="lower")
    assert not higher.passed and higher.value == pytest.approx(-0.5)


def test_pairing_uses_prompt_ids_and_averages_seeds() -> None:
    champion = pd.DataFrame({"prompt_id": ["a", "b", "c", "d", "e"], "reward": [1, 2, 3, 4, 5.0]})
    # Shuffled rows, two seeds per prompt, one prompt the champion never saw.
    candidate = pd.DataFrame(
        {
            "prompt_id": ["e", "d", "c", "b", "a", "a", "b", "c", "d", "e", "zz"],
            "reward": [5.5, 4.5, 3.5, 2.5, 1.5, 1.3, 2.3, 3.3, 4.3, 5.3, -100.0],
            "prompt": ["text"] * 11,
        }
    )
    result = compare_with_champion(
        "reward", "higher", per_prompt_means(candidate, "cand", ["reward"]),
        per_prompt_means(champion, "champ", ["reward"]), 0.0, 0.95, 500, 0, 4,
    )  # fmt: skip
    assert result.num_prompts == 5
    assert result.value == pytest.approx(0.4)
    assert result.ci_low == pytest.approx(0.4) and result.passed


def test_seeds_pair_the_same_samples_before_they_are_averaged() -> None:
    prompts = ["a", "b", "c", "d"]
    base = np.array([1.0, 2.0, 3.0, 4.0])

    def table(seeds: list[int], values: list[np.ndarray]) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "prompt_id": prompts * len(seeds),
                "seed": np.repeat(seeds, len(prompts)),
                "reward": np.concatenate(values),
            }
        )
        return per_prompt_means(frame, "table", ["reward"])

    # Seed 1 is the only one both evaluated: +0.5 on it, where the means of each side's own
    # seeds would give 5.25 - 5 = +0.25.
    candidate = table([0, 1], [base + 10, base + 0.5])
    champion = table([1, 2], [base, base + 10])
    paired = compare_with_champion("reward", "higher", candidate, champion, 0, 0.95, 200, 0, 4)
    assert paired.value == pytest.approx(0.5) and paired.num_prompts == 4
    # Without seeds on one side, each side's seeds are averaged per prompt.
    unseeded = _table(base + 5, ids=prompts)
    averaged = compare_with_champion("reward", "higher", candidate, unseeded, 0, 0.95, 200, 0, 4)
    assert averaged.value == pytest.approx(0.25)
    # No seed in common: nothing is paired.
    other = table([7], [base])
    alone = compare_with_champion("reward", "higher", candidate, other, 0, 0.95, 200, 0, 4)
    assert not alone.passed and "only 0 shared" in alone.detail


def test_too_few_shared_prompts_fail() -> None:
    result = compare_with_champion(
        "reward", "higher", _table(np.ones(3), ids=["a", "b", "c"]),
        _table(np.ones(3), ids=["c", "d", "e"]), 0.0, 0.95, 100, 0, 4,
    )  # fmt: skip
    assert not result.passed and result.num_prompts == 1
    assert "only 1 shared" in result.detail


def test_missing_metric_column_fails_naming_it() -> None:
    champion = _table(np.ones(5), metric="other")
    result = compare_with_champion(
        "reward", "higher", _table(np.ones(5)), champion, 0.0, 0.95, 100, 0, 4
    )
    assert (
        not result.passed and "champion's per-prompt table has no column 'reward'" in result.detail
    )


def test_per_prompt_table_errors_name_row_and_column() -> None:
    with pytest.raises(PromotionError, match="table.csv: no 'prompt_id' column"):
        per_prompt_means(pd.DataFrame({"reward": [1.0]}), "table.csv", ["reward"])
    bad = pd.DataFrame({"prompt_id": ["a", "b"], "reward": [1.0, "n/a"]})
    with pytest.raises(PromotionError, match=r"table.csv: row 1: column 'reward'"):
        per_prompt_means(bad, "table.csv", ["reward"])


@pytest.mark.parametrize(
    ("value", "bound", "kind", "passed"),
    [
        (0.8, 0.5, "min", True),
        (0.5, 0.5, "min", True),
        (0.4, 0.5, "min", False),
        (12.0, 20.0, "max", True),
        (25.0, 20.0, "max", False),
        (None, 0.5, "min", False),
        (float("nan"), 20.0, "max", False),
    ],
)
def test_thresholds_in_both_directions(value, bound, kind, passed) -> None:
    result = check_threshold("metric", value, bound, kind)
    assert result.passed is passed
    assert result.name == f"{kind}.metric"


def test_evaluate_gates_combines_thresholds_and_champion(champion_values: np.ndarray) -> None:
    policy = GatePolicy(
        thresholds={"clip": 0.3},
        max_thresholds={"fid": 50.0},
        champion_metrics={"reward": "higher"},
        tolerance={"reward": 0.05},
        bootstrap_samples=500,
    )
    candidate = _table(champion_values + 0.2)
    champion = _table(champion_values)
    good = evaluate_gates(policy, {"clip": 0.35, "fid": 40.0}, candidate, champion, True)
    assert [g.name for g in good] == ["min.clip", "max.fid", "champion.reward"]
    assert all(g.passed for g in good)
    bad = evaluate_gates(policy, {"clip": 0.25, "fid": 40.0}, candidate, champion, True)
    assert [g.passed for g in bad] == [False, True, True]
    # No champion yet: the comparison has nothing to compare with and passes, saying so.
    first = evaluate_gates(policy, {"clip": 0.35, "fid": 40.0}, candidate, None, False)
    assert first[-1].passed and "no champion" in first[-1].detail
    # ... but only with the metric a later candidate is compared on when this one is champion.
    empty = evaluate_gates(policy, {"clip": 0.35, "fid": 40.0}, None, None, False)
    assert not empty[-1].passed
    assert empty[-1].detail == "no champion yet, and no per-prompt column 'reward'"
    unnamed = evaluate_gates(policy, {}, candidate.rename(columns={"reward": "x"}), None, False)
    assert [g.passed for g in unnamed] == [False, False, False]
    # A champion without a per-prompt table cannot be compared with: fail.
    blind = evaluate_gates(policy, {"clip": 0.35, "fid": 40.0}, candidate, None, True)
    assert not blind[-1].passed and "champion has no per-prompt table" in blind[-1].detail
    # A summary metric missing from the run falls back to the per-prompt mean.
    fallback = evaluate_gates(GatePolicy(thresholds={"reward": -10.0}), {}, candidate, None, False)
    assert fallback[0].value == pytest.approx(candidate["reward"].mean())


def test_policy_file_and_params_merge(tmp_path) -> None:
    policy_file = tmp_path / "promotion.yaml"
    policy_file.write_text(
        "thresholds: {clip: 0.3, aesthetic: 0.1}\n"
        "champion_metrics: {reward: higher}\n"
        "tolerance: {reward: 0.02}\n"
    )
    config = PromotionConfig(
        policy_file=str(policy_file),
        thresholds={"clip": 0.4},
        max_thresholds={"fid": 30.0},
        bootstrap_samples=50,
        legacy_stages=True,
    )
    policy = GatePolicy.from_config(config)
    assert policy.thresholds == {"clip": 0.4, "aesthetic": 0.1}
    assert policy.max_thresholds == {"fid": 30.0}
    assert policy.champion_metrics == {"reward": "higher"}
    assert policy.tolerance == {"reward": 0.02}
    assert policy.bootstrap_samples == 50 and policy.legacy_stages
    assert policy.metrics == ["aesthetic", "clip", "fid", "reward"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gates: {}\n", "unknown keys \\['gates'\\]"),
        ("champion_metrics: {reward: up}\n", "champion_metrics.reward: 'up'"),
        ("thresholds: {clip: high}\n", "thresholds.clip: 'high' is not a number"),
        ("tolerance: {reward: -1}\n", "tolerance.reward: must be >= 0"),
        ("thresholds: [1, 2]\n", "'thresholds' must be a mapping"),
    ],
)
def test_bad_policy_file_names_file_and_key(tmp_path, text: str, message: str) -> None:
    policy_file = tmp_path / "bad.yaml"
    policy_file.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        read_policy_file(policy_file)
    assert str(policy_file) in str(error.value)


def test_policy_file_lookup(tmp_path) -> None:
    with pytest.raises(ConfigError, match="promotion.policy_file"):
        GatePolicy.from_config(PromotionConfig(policy_file="nowhere.yaml"), base_dir=tmp_path)
    # The default path falls back to the repository's file when the working directory has none.
    policy = GatePolicy.from_config(PromotionConfig(thresholds={"a": 1.0}), base_dir=tmp_path)
    assert policy.thresholds == {"a": 1.0}
    assert policy.champion_metrics["reward_color_20steps"] == "higher"
    no_file = GatePolicy.from_config(PromotionConfig(policy_file=None, thresholds={"a": 1.0}))
    assert no_file.champion_metrics == {} and no_file.thresholds == {"a": 1.0}


def test_repository_policy_file_is_valid() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    gates = read_policy_file(root / "mlflow" / "promotion.yaml")
    assert gates["champion_metrics"], "the shipped policy compares with the champion"
