"""Promotion gates: a registered version moves up only when its evaluation says it may.

Two kinds of gate, configured in ``mlflow/promotion.yaml`` and the ``promotion`` section of
``params.yaml`` (the section's gates are added to the file's and win on the same metric):

* thresholds: a summary metric of the version's evaluation run must be >= a minimum
  (``thresholds``) or <= a maximum (``max_thresholds``);
* not worse than the champion: on the evaluation prompts both versions were scored on
  (paired by ``prompt_id`` in each run's per-prompt table), the bootstrap confidence interval
  of the mean improvement (candidate - champion, sign flipped for lower-is-better metrics)
  must have its lower bound >= -tolerance. Pairing removes the prompt-to-prompt variance that
  dwarfs model differences on a few dozen prompts; the interval keeps a lucky draw of prompts
  from passing a regression.

Every verdict and its inputs are written as version tags (``unifl.gate.<target>.*``). A failed
gate never promotes; an override needs a reason and is recorded (who, when, why).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import yaml

from unifl.config import ConfigError, Params, PromotionConfig
from unifl.tracking.registry import (
    ALIASES,
    EVALUATION_RUN_TAG,
    STAGE_TAG,
    RegistryError,
    archive_version,
    get_version,
    now_iso,
    set_legacy_stage,
    set_version_tags,
    stage_of,
    version_by_alias,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

Target = Literal["staging", "production"]
Direction = Literal["higher", "lower"]

logger = logging.getLogger(__name__)

GATE_PREFIX = "unifl.gate."
OVERRIDE_PREFIX = "unifl.override."
PROMPT_ID_COLUMN = "prompt_id"
SEED_COLUMN = "seed"
_REPOSITORY = Path(__file__).resolve().parents[3]
_POLICY_KEYS = ("thresholds", "max_thresholds", "champion_metrics", "tolerance")


class PromotionError(RegistryError):
    """A promotion request that cannot be carried out (wrong order, missing reason, ...)."""


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class GatePolicy:
    """The gates and the statistics knobs, resolved from the policy file and params."""

    thresholds: dict[str, float] = field(default_factory=dict)
    max_thresholds: dict[str, float] = field(default_factory=dict)
    compare_to_champion: bool = True
    champion_metrics: dict[str, Direction] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    confidence: float = 0.95
    bootstrap_samples: int = 1000
    seed: int = 0
    min_paired_prompts: int = 4
    per_prompt_artifact: str = "evaluation/per_prompt.csv"
    legacy_stages: bool = False

    @property
    def metrics(self) -> list[str]:
        """Every metric some gate reads."""
        names = {*self.thresholds, *self.max_thresholds, *self.champion_metrics}
        return sorted(names)

    @classmethod
    def from_config(cls, config: PromotionConfig, base_dir: str | Path = ".") -> GatePolicy:
        """Merge ``config.policy_file`` (if set; relative to `base_dir`) with the section.

        A missing file is an error unless it is the default path, so that an installed
        package without the repository's ``mlflow/`` directory still runs on params alone.
        """
        gates: dict[str, dict[str, Any]] = {key: {} for key in _POLICY_KEYS}
        if config.policy_file:
            # Relative paths: from `base_dir` (the working directory), else from the
            # repository this package runs from (an editable install outside its checkout).
            candidates = [Path(base_dir) / config.policy_file, _REPOSITORY / config.policy_file]
            path = next((c for c in candidates if c.is_file()), None)
            default = PromotionConfig.model_fields["policy_file"].default
            if path is not None:
                gates = read_policy_file(path)
            elif config.policy_file != default:
                raise ConfigError(f"promotion.policy_file: {candidates[0]} not found")
            else:
                logger.warning(
                    "promotion policy %s not found: only the gates of params.yaml apply",
                    config.policy_file,
                )
        for key in _POLICY_KEYS:
            gates[key] = {**gates[key], **getattr(config, key)}
        return cls(
            thresholds=gates["thresholds"],
            max_thresholds=gates["max_thresholds"],
            compare_to_champion=config.compare_to_champion,
            champion_metrics=gates["champion_metrics"],
            tolerance=gates["tolerance"],
            confidence=config.confidence,
            bootstrap_samples=config.bootstrap_samples,
            seed=config.seed,
            min_paired_prompts=config.min_paired_prompts,
            per_prompt_artifact=config.per_prompt_artifact,
            legacy_stages=config.legacy_stages,
        )


def read_policy_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a gate policy YAML; errors name the file and the key."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file}: top level must be a mapping")
    unknown = sorted(set(data) - set(_POLICY_KEYS))
    if unknown:
        raise ConfigError(f"{file}: unknown keys {unknown} (expected some of {_POLICY_KEYS})")
    gates: dict[str, dict[str, Any]] = {}
    for key in _POLICY_KEYS:
        section = data.get(key) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{file}: '{key}' must be a mapping of metric -> value")
        for metric, value in section.items():
            if key == "champion_metrics":
                if value not in ("higher", "lower"):
                    raise ConfigError(
                        f"{file}: champion_metrics.{metric}: {value!r} (expected higher or lower)"
                    )
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{file}: {key}.{metric}: {value!r} is not a number")
            elif key == "tolerance" and value < 0:
                raise ConfigError(f"{file}: tolerance.{metric}: must be >= 0 (got {value})")
        gates[key] = dict(section)
    return gates


# ---------------------------------------------------------------------------- gate math


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict with the numbers that decided it."""

    name: str
    metric: str
    kind: Literal["min", "max", "champion", "input"]
    passed: bool
    value: float | None = None
    bound: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    num_prompts: int | None = None
    detail: str = ""

    def as_tag(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "name"}
        return json.dumps(data, sort_keys=True)


def bootstrap_mean_ci(
    values: np.ndarray, confidence: float, samples: int, seed: int
) -> tuple[float, float, float]:
    """Mean of `values` and its percentile bootstrap interval (two-sided, at `confidence`)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-d array")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    block = max(1, 2_000_000 // data.size)  # bounded memory for large prompt sets
    for start in range(0, samples, block):
        stop = min(samples, start + block)
        indices = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[indices].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(data.mean()), float(low), float(high)


def check_threshold(
    metric: str, value: float | None, bound: float, kind: Literal["min", "max"]
) -> GateResult:
    """``value >= bound`` (min) or ``value <= bound`` (max); a missing value fails."""
    name = f"{kind}.{metric}"
    if value is None or not np.isfinite(value):
        return GateResult(name, metric, kind, False, value, bound, detail="metric not logged")
    passed = value >= bound if kind == "min" else value <= bound
    sign = ">=" if kind == "min" else "<="
    detail = f"{value:.6g} {sign} {bound:.6g}" if passed else f"{value:.6g} not {sign} {bound:.6g}"
    return GateResult(name, metric, kind, bool(passed), float(value), bound, detail=detail)


def per_prompt_means(frame: pd.DataFrame, source: str, metrics: list[str]) -> pd.DataFrame:
    """One row per prompt id (and seed, where the table has a `seed` column), columns
    `metrics`; repeated rows are averaged.

    Keeping the seeds lets `compare_with_champion` pair the same samples. Metric columns
    absent from `frame` are left out (the gate reports them); a present one with a
    non-numeric or empty cell is an error naming the table, row and column.
    """
    if PROMPT_ID_COLUMN not in frame.columns:
        raise PromotionError(f"{source}: no '{PROMPT_ID_COLUMN}' column ({list(frame.columns)})")
    present = [metric for metric in metrics if metric in frame.columns]
    table = pd.DataFrame({PROMPT_ID_COLUMN: frame[PROMPT_ID_COLUMN].astype(str)})
    keys = [PROMPT_ID_COLUMN]
    if SEED_COLUMN in frame.columns:
        table[SEED_COLUMN] = frame[SEED_COLUMN].astype(str)
        keys.append(SEED_COLUMN)
    for column in present:
        numeric = pd.to_numeric(frame[column], errors="coerce")
        bad = ~np.isfinite(numeric.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise PromotionError(
                f"{source}: row {row}: column {column!r} is not a finite number "
                f"({frame[column].iloc[row]!r})"
            )
        table[column] = numeric.astype(np.float64)
    return table.groupby(keys, sort=True).mean()


def _by_prompt(table: pd.DataFrame) -> pd.DataFrame:
    """A `per_prompt_means` table averaged over its seeds (if it has them)."""
    if table.index.nlevels == 1:
        return table
    return table.groupby(level=PROMPT_ID_COLUMN, sort=True).mean()


def compare_with_champion(
    metric: str,
    direction: Direction,
    candidate: pd.DataFrame,
    champion: pd.DataFrame,
    tolerance: float,
    confidence: float,
    samples: int,
    seed: int,
    min_prompts: int,
) -> GateResult:
    """Paired bootstrap on shared prompts: pass when the CI's lower bound >= -tolerance.

    `candidate` and `champion` are `per_prompt_means` tables; where both keep seeds, only
    the (prompt, seed) samples both evaluated are compared. The improvement per prompt is
    ``candidate - champion`` for higher-is-better metrics and ``champion - candidate``
    otherwise, so "lower bound >= -tolerance" reads "not worse by more than tolerance".
    """
    name = f"champion.{metric}"
    for label, table in (("candidate", candidate), ("champion", champion)):
        if metric not in table.columns:
            return GateResult(
                name,
                metric,
                "champion",
                False,
                bound=-tolerance,
                detail=f"{label}'s per-prompt table has no column {metric!r}",
            )
    if candidate.index.nlevels != champion.index.nlevels:
        candidate, champion = _by_prompt(candidate), _by_prompt(champion)
    # With seeds on both sides, the same (prompt, seed) samples are paired, then averaged per
    # prompt: an evaluation at other seeds compares other samples, not a better model.
    shared = candidate.index.intersection(champion.index)
    pairs = _by_prompt(
        pd.DataFrame(
            {"candidate": candidate.loc[shared, metric], "champion": champion.loc[shared, metric]}
        ).dropna()
    )
    if len(pairs) < min_prompts:
        return GateResult(
            name,
            metric,
            "champion",
            False,
            bound=-tolerance,
            num_prompts=len(pairs),
            detail=f"only {len(pairs)} shared evaluation prompts (need {min_prompts})",
        )
    improvement = (pairs["candidate"] - pairs["champion"]).to_numpy()
    if direction == "lower":
        improvement = -improvement
    mean, low, high = bootstrap_mean_ci(improvement, confidence, samples, seed)
    passed = low >= -tolerance
    detail = (
        f"mean improvement {mean:.6g}, {confidence:.0%} CI [{low:.6g}, {high:.6g}] "
        f"{'>=' if passed else '<'} -{tolerance:.6g} on {len(pairs)} prompts"
    )
    return GateResult(
        name,
        metric,
        "champion",
        bool(passed),
        value=mean,
        bound=-tolerance,
        ci_low=low,
        ci_high=high,
        num_prompts=len(pairs),
        detail=detail,
    )


def evaluate_gates(
    policy: GatePolicy,
    candidate_metrics: Mapping[str, float],
    candidate_table: pd.DataFrame | None,
    champion_table: pd.DataFrame | None,
    has_champion: bool,
) -> list[GateResult]:
    """All gates of `policy` on the candidate's numbers (tables from `per_prompt_means`).

    Summary metrics missing from the run fall back to the mean of the per-prompt column.
    Without a champion (the first promotion) the comparison gates have nothing to compare to
    and pass, saying so.
    """

    def summary(metric: str) -> float | None:
        if metric in candidate_metrics:
            return float(candidate_metrics[metric])
        if candidate_table is not None and metric in candidate_table.columns:
            return float(candidate_table[metric].mean())
        return None

    results = [
        check_threshold(metric, summary(metric), float(bound), "min")
        for metric, bound in sorted(policy.thresholds.items())
    ]
    results += [
        check_threshold(metric, summary(metric), float(bound), "max")
        for metric, bound in sorted(policy.max_thresholds.items())
    ]
    if not policy.compare_to_champion:
        return results
    for metric, direction in sorted(policy.champion_metrics.items()):
        tolerance = float(policy.tolerance.get(metric, 0.0))
        if not has_champion:
            # Nothing to compare with, but the version must bring what a later candidate is
            # compared on when it is the champion: the metric and its per-prompt column.
            value = summary(metric)
            if candidate_table is None or metric not in candidate_table.columns:
                passed, detail = False, f"no champion yet, and no per-prompt column {metric!r}"
            elif value is None or not np.isfinite(value):
                passed, detail = False, f"no champion yet, and {metric} is not a finite number"
            else:
                passed, detail = True, f"no champion yet: nothing to compare with ({value:.6g})"
            results.append(
                GateResult(
                    f"champion.{metric}",
                    metric,
                    "champion",
                    passed,
                    value=value,
                    bound=-tolerance,
                    detail=detail,
                )
            )
        elif candidate_table is None or champion_table is None:
            missing = "candidate" if candidate_table is None else "champion"
            results.append(
                GateResult(
                    f"champion.{metric}",
                    metric,
                    "champion",
                    False,
                    bound=-tolerance,
                    detail=f"{missing} has no per-prompt table ({policy.per_prompt_artifact})",
                )
            )
        else:
            results.append(
                compare_with_champion(
                    metric,
                    direction,
                    candidate_table,
                    champion_table,
                    tolerance,
                    policy.confidence,
                    policy.bootstrap_samples,
                    policy.seed,
                    policy.min_paired_prompts,
                )
            )
    return results


# ---------------------------------------------------------------------------- promotion


@dataclass
class PromotionDecision:
    """What `promote` decided and why; `promoted` is the only thing callers must check."""

    model_name: str
    version: str
    target: Target
    gates_passed: bool
    promoted: bool
    overridden: bool = False
    override_reason: str | None = None
    champion_version: str | None = None
    replaced_version: str | None = None
    evaluation_run_id: str | None = None
    gates: list[GateResult] = field(default_factory=list)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [gate for gate in self.gates if not gate.passed]

    def summary(self) -> str:
        """A few readable lines for the CLI and the pipeline's final report."""
        verdict = "PASS" if self.gates_passed else "FAIL"
        if self.promoted:
            how = " (override)" if self.overridden else ""
            action = f"promoted to {self.target}{how}"
        else:
            action = "not promoted"
        lines = [f"{self.model_name} v{self.version}: gates {verdict}, {action}"]
        lines += [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in self.gates]
        if not self.gates:
            lines.append("  (no gates configured)")
        if self.replaced_version:
            lines.append(f"  replaced and archived: v{self.replaced_version}")
        if self.overridden:
            lines.append(f"  override reason: {self.override_reason}")
        return "\n".join(lines)


def _evaluation_inputs(
    client: MlflowClient, version: ModelVersion, policy: GatePolicy
) -> tuple[str | None, dict[str, float], pd.DataFrame | None]:
    """(evaluation run id, its metrics, its per-prompt table or none)."""
    from mlflow.exceptions import MlflowException

    run_id = version.tags.get(EVALUATION_RUN_TAG) or version.run_id
    if not run_id:
        return None, {}, None
    try:
        metrics = dict(client.get_run(run_id).data.metrics)
    except MlflowException as exc:
        raise RegistryError(
            f"{version.name} v{version.version}: its evaluation run {run_id} cannot be read "
            f"({exc.message})"
        ) from None
    with tempfile.TemporaryDirectory(prefix="unifl-gate-") as tmp:
        try:
            local = client.download_artifacts(run_id, policy.per_prompt_artifact, tmp)
        except (MlflowException, OSError):
            return run_id, metrics, None
        source = f"run {run_id} artifact {policy.per_prompt_artifact}"
        try:
            frame = pd.read_csv(local)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise PromotionError(f"{source}: not a readable CSV: {exc}") from None
    return run_id, metrics, per_prompt_means(frame, source, policy.metrics)


def _who() -> str:
    for variable in ("UNIFL_USER", "USER"):
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def promote(
    client: MlflowClient,
    model_name: str,
    version: str | int,
    gate_config: GatePolicy | PromotionConfig,
    override_reason: str | None = None,
    target: Target = "staging",
    override_by: str | None = None,
) -> PromotionDecision:
    """Run the gates for `version` and move it to `target` if they pass (or are overridden).

    Order is enforced: candidate -> staging -> production. The version that held the target's
    alias before is archived. `override_reason` (non-empty) promotes despite failed gates and
    is recorded on the version with who and when; the failed verdict stays recorded too.
    """
    policy = (
        gate_config if isinstance(gate_config, GatePolicy) else GatePolicy.from_config(gate_config)
    )
    if target not in ("staging", "production"):
        raise PromotionError(f"target {target!r}: expected 'staging' or 'production'")
    if override_reason is not None and not override_reason.strip():
        raise PromotionError("an override needs a reason (--reason '...')")
    model_version = get_version(client, model_name, version)
    number = str(model_version.version)
    current = stage_of(model_version)
    if target == "staging" and current in ("staging", "production"):
        raise PromotionError(f"{model_name} v{number} is already at {current}")
    if target == "production" and current != "staging":
        raise PromotionError(f"{model_name} v{number} is at {current}; promote it to staging first")
    if target == "production":
        # The alias, not the tag, says which version is staged: two staging promotions at
        # once can leave the tag on a version whose alias moved on.
        staged = version_by_alias(client, model_name, ALIASES["staging"])
        if staged is None or str(staged.version) != number:
            holder = "no version" if staged is None else f"v{staged.version}"
            raise PromotionError(
                f"{model_name} v{number} is tagged staging, but {holder} holds the "
                f"'{ALIASES['staging']}' alias; promote v{number} to staging again first"
            )

    champion = version_by_alias(client, model_name, ALIASES["production"])
    champion_table = None
    if champion is not None and policy.compare_to_champion and policy.champion_metrics:
        _, _, champion_table = _evaluation_inputs(client, champion, policy)
    run_id, metrics, candidate_table = _evaluation_inputs(client, model_version, policy)
    gates = evaluate_gates(policy, metrics, candidate_table, champion_table, champion is not None)
    if not gates:
        gates.append(
            GateResult(
                "policy",
                "",
                "input",
                False,
                detail="no promotion gates configured (no policy file found and none in "
                "params.yaml's promotion section): nothing to check the version against",
            )
        )
    if run_id is None:
        gates.append(
            GateResult("evaluation_run", "", "input", False, detail="version has no evaluation run")
        )
    passed = all(gate.passed for gate in gates)
    overridden = not passed and override_reason is not None
    decision = PromotionDecision(
        model_name=model_name,
        version=number,
        target=target,
        gates_passed=passed,
        promoted=passed or overridden,
        overridden=overridden,
        override_reason=override_reason if overridden else None,
        champion_version=None if champion is None else str(champion.version),
        evaluation_run_id=run_id,
        gates=gates,
    )

    prefix = f"{GATE_PREFIX}{target}."
    tags: dict[str, Any] = {
        f"{prefix}verdict": "pass" if passed else "fail",
        f"{prefix}checked_at": now_iso(),
        f"{prefix}by": override_by or _who(),
        f"{prefix}inputs": json.dumps(
            {
                "evaluation_run_id": run_id,
                "champion_version": decision.champion_version,
                "policy": asdict(policy),
            },
            sort_keys=True,
        ),
    }
    tags.update({f"{prefix}{gate.name}": gate.as_tag() for gate in gates})
    if overridden:
        override = f"{OVERRIDE_PREFIX}{target}."
        tags[f"{override}by"] = override_by or _who()
        tags[f"{override}at"] = now_iso()
        tags[f"{override}reason"] = override_reason
    tags[f"{prefix}decision"] = (
        "promoted (override)" if overridden else "promoted" if passed else "rejected"
    )
    set_version_tags(client, model_name, number, tags)
    if decision.promoted:
        decision.replaced_version = _move(client, model_name, number, target, policy.legacy_stages)
    return decision


def _move(client: MlflowClient, name: str, number: str, target: Target, legacy: bool) -> str | None:
    """Point the target's alias at `number`; archive the version that held it before."""
    alias = ALIASES[target]
    previous = version_by_alias(client, name, alias)
    replaced = None
    if previous is not None and str(previous.version) != number:
        replaced = str(previous.version)
        archive_version(client, name, replaced, replaced_by=number)
    client.set_registered_model_alias(name, alias, number)
    for lower_stage in ("candidate", "staging"):
        lower_alias = ALIASES[lower_stage]
        if lower_alias == alias:
            continue
        holder = version_by_alias(client, name, lower_alias)
        if holder is not None and str(holder.version) == number:
            client.delete_registered_model_alias(name, lower_alias)
    set_version_tags(client, name, number, {STAGE_TAG: target, f"unifl.{target}_at": now_iso()})
    if legacy:
        set_legacy_stage(client, name, number, target)
    return replaced


def promote_from_params(
    params: Params,
    model_name: str | None,
    version: str | int,
    target: Target = "staging",
    override_reason: str | None = None,
    base_dir: str | Path = ".",
) -> PromotionDecision:
    """`promote` on the configured tracking server with the configured gates (CLI, KFP).

    `model_name=None` means ``tracking.registered_model``; the policy file is resolved
    relative to `base_dir`.
    """
    from unifl.tracking.runs import connect, tracking_errors

    policy = GatePolicy.from_config(params.promotion, base_dir=base_dir)
    client = connect(params.tracking)
    with tracking_errors(params.tracking.tracking_uri):
        return promote(
            client,
            model_name or params.tracking.registered_model,
            version,
            policy,
            override_reason=override_reason,
            target=target,
        )
