"""What a finished local run produced, read back from its outputs, and the text `unifl run`
prints at the end: the evaluation table, the promotion decision, where everything is, and
the command that opens the MLflow UI on the run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unifl.orchestration.steps import DECISION_FILE, SUMMARY_TABLE_FILE


@dataclass
class RunSummary:
    """The outputs of one local pipeline run."""

    pipeline: str
    pipeline_run_id: str
    run_dir: Path
    tracking_uri: str
    seconds: float
    log_file: Path
    evaluation_dir: Path | None = None
    evaluation_table: str | None = None
    decision: dict[str, Any] | None = None
    outputs: dict[str, Path] = field(default_factory=dict)

    @property
    def mlflow_ui_command(self) -> str:
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"

    def text(self) -> str:
        minutes, seconds = divmod(int(round(self.seconds)), 60)
        lines = [
            f"{self.pipeline} finished in {minutes}m{seconds:02d}s "
            f"(pipeline run id {self.pipeline_run_id})",
        ]
        if self.evaluation_table:
            lines += ["", "Evaluation of the tuned model:", self.evaluation_table]
        if self.decision:
            lines += ["", "Promotion:", self.decision.get("summary", json.dumps(self.decision))]
        lines += ["", "Outputs:"]
        width = max((len(name) for name in self.outputs), default=0)
        lines += [f"  {name.ljust(width)}  {path}" for name, path in self.outputs.items()]
        lines += [f"  {'log'.ljust(width)}  {self.log_file}"]
        lines += ["", "Open the MLflow UI on these runs:", f"  {self.mlflow_ui_command}"]
        return "\n".join(lines)


OUTPUTS_SHOWN: dict[str, tuple[str, str]] = {
    "prompts": ("curate-prompts", "prompts"),
    "pairs": ("generate-pairs", "pairs"),
    "labels": ("label-preferences", "labels"),
    "reward models": ("train-reward", "reward_model"),
    "tuned model": ("adversarial", "model"),
    "evaluation": ("evaluate", "evaluation"),
    "evaluation report": ("evaluate", "report"),
    "promotion decision": ("promote", "decision"),
}
"""Name shown -> (task, output) of the artifacts a person looks for after a run."""


def task_outputs(run_dir: Path) -> dict[tuple[str, str], Path]:
    """(task, output name) -> artifact path, from the executor outputs the local runner wrote.

    A cached task's outputs live in the run that computed them; the executor output of
    this run's task directory, or the cache, points there, so the URIs are read rather
    than guessed.
    """
    found: dict[tuple[str, str], Path] = {}
    for executor_output in sorted(run_dir.glob("*/executor_output.json")):
        task = executor_output.parent.name
        try:
            data = json.loads(executor_output.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for name, entry in (data.get("artifacts") or {}).items():
            for artifact in entry.get("artifacts") or []:
                uri = artifact.get("uri")
                if uri:
                    found[(task, name)] = Path(uri)
    for task_dir in sorted(path for path in run_dir.iterdir() if path.is_dir()):
        for output in task_dir.iterdir():
            found.setdefault((task_dir.name, output.name), output)
    return found


def summarize_run(
    pipeline: str,
    pipeline_run_id: str,
    run_dir: Path,
    tracking_uri: str,
    seconds: float,
    log_file: Path,
    extra_outputs: dict[tuple[str, str], Path] | None = None,
) -> RunSummary:
    """Collect the evaluation table, the decision and the artifact paths of a finished run."""
    outputs = task_outputs(run_dir) if run_dir.is_dir() else {}
    outputs.update(extra_outputs or {})
    summary = RunSummary(pipeline, pipeline_run_id, run_dir, tracking_uri, seconds, log_file)
    summary.outputs["pipeline outputs"] = run_dir
    for shown, key in OUTPUTS_SHOWN.items():
        if key in outputs and outputs[key].exists():
            summary.outputs[shown] = outputs[key]
    evaluation = outputs.get(("evaluate", "evaluation"))
    if evaluation is not None and (evaluation / SUMMARY_TABLE_FILE).is_file():
        summary.evaluation_dir = evaluation
        summary.evaluation_table = (evaluation / SUMMARY_TABLE_FILE).read_text().rstrip()
    decision = outputs.get(("promote", "decision"))
    if decision is not None and (decision / DECISION_FILE).is_file():
        summary.decision = json.loads((decision / DECISION_FILE).read_text(encoding="utf-8"))
    return summary
