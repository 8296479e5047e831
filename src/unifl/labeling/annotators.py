"""Simulated annotators whose preferences follow measurable image properties.

A panel of N annotators, each with its own noise level and seed. For a pair
(A, B) and a dimension d, annotator k draws e ~ Normal(0, noise_k^2) and answers

    A    if score_d(A) - score_d(B) + e >  margin
    B    if score_d(A) - score_d(B) + e < -margin
    Tie  otherwise

and the overall choice is the majority of its dimension choices (A if more
dimensions say A than B, B if the reverse, else Tie). With noise 0 every
annotator follows the scorer exactly; more noise means more disagreement.

The scores come from an `ImageScorer`, a callable `(paths, prompts) ->
{dimension: array[N]}` (higher is better), e.g. the toy world's oracle metrics;
this module never looks inside it. `labeling.scorer` names a factory
`module:function` that takes the `Params` and returns such a scorer.

Two outputs, so the rest of the pipeline cannot tell simulated from human labels:
* `simulated_export`: a file in Label Studio's JSON export format (no server);
* `post_simulated_annotations`: the same annotations posted into a Label Studio
  project. Label Studio Community lets an administrator create users through
  the API and post an annotation with `completed_by` set to another user, so
  every simulated annotator is a real user of the server
  (`annotator-<k>@unifl.local`) and the export attributes each annotation to it.
"""

from __future__ import annotations

import hashlib
import importlib
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from unifl.config import DIMENSIONS
from unifl.data.preferences import OVERALL
from unifl.labeling.label_config import CHOICES_TO_NAME, LABELED_DIMENSIONS
from unifl.labeling.tasks import pair_rows_to_tasks

if TYPE_CHECKING:
    from unifl.config import Params
    from unifl.labeling.client import LabelStudioClient

ANNOTATOR_EMAIL_DOMAIN = "unifl.local"
SIMULATED_TIMESTAMP = datetime(2024, 4, 8, tzinfo=UTC)
"""Creation time written into simulated exports: fixed, so identical inputs give identical files."""


class ImageScorer(Protocol):
    def __call__(
        self, paths: Sequence[Path], prompts: Sequence[str]
    ) -> Mapping[str, np.ndarray]: ...


class AnnotatorError(ValueError):
    """The simulated panel or its scorer is misconfigured; the message says which."""


@dataclass(frozen=True)
class SimulatedAnnotator:
    index: int
    noise: float
    seed: int

    @property
    def email(self) -> str:
        return f"annotator-{self.index + 1}@{ANNOTATOR_EMAIL_DOMAIN}"


def make_panel(
    num_annotators: int, noise: float | Sequence[float], seed: int, spread: float = 0.5
) -> list[SimulatedAnnotator]:
    """N annotators with their own noise and seed.

    A single `noise` is spread linearly over [noise * (1 - spread), noise * (1 + spread)]
    (mean `noise`), so the panel has careful and careless members, as real panels do.
    """
    if num_annotators < 1:
        raise AnnotatorError(f"num_annotators must be >= 1, got {num_annotators}")
    if isinstance(noise, int | float):
        if noise < 0:
            raise AnnotatorError(f"annotator noise must be >= 0, got {noise}")
        if num_annotators == 1:
            levels = [float(noise)]
        else:
            levels = [
                float(noise) * (1 - spread + 2 * spread * k / (num_annotators - 1))
                for k in range(num_annotators)
            ]
    else:
        levels = [float(level) for level in noise]
        if len(levels) != num_annotators:
            raise AnnotatorError(f"{len(levels)} noise levels for {num_annotators} annotators")
        if any(level < 0 for level in levels):
            raise AnnotatorError(f"annotator noise levels must be >= 0, got {levels}")
    seeds = np.random.SeedSequence(seed).spawn(num_annotators)
    return [
        SimulatedAnnotator(index=k, noise=levels[k], seed=int(seeds[k].generate_state(1)[0]))
        for k in range(num_annotators)
    ]


def load_scorer(spec: str, params: Params) -> ImageScorer:
    """Build the scorer named by `module:function` (a factory taking the params)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise AnnotatorError(f"labeling.scorer {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AnnotatorError(
            f"labeling.scorer {spec!r}: cannot import {module_name}: {exc}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise AnnotatorError(
            f"labeling.scorer {spec!r}: {module_name} has no function {attribute!r}"
        )
    return factory(params)


def score_pairs(
    rows: Sequence[dict[str, Any]],
    pairs_dir: str | Path,
    scorer: ImageScorer,
    batch_size: int = 64,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores of every pair's image A and image B per dimension, each array [num_pairs]."""
    base = Path(pairs_dir)
    scores_a: dict[str, list[np.ndarray]] = {d: [] for d in DIMENSIONS}
    scores_b: dict[str, list[np.ndarray]] = {d: [] for d in DIMENSIONS}
    with tqdm(total=len(rows), desc="scoring pairs", unit="pair", disable=None) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            for side, target in (("image_a", scores_a), ("image_b", scores_b)):
                paths = [base / row[side] for row in batch]
                missing = [str(p) for p in paths if not p.is_file()]
                if missing:
                    raise AnnotatorError(f"pair images missing under {base}: {missing[:5]}")
                result = scorer(paths, [row["prompt"] for row in batch])
                for dimension in DIMENSIONS:
                    if dimension not in result:
                        raise AnnotatorError(f"the scorer returned no {dimension!r} scores")
                    values = np.asarray(result[dimension], dtype=np.float64).reshape(-1)
                    if len(values) != len(batch):
                        raise AnnotatorError(
                            f"the scorer returned {len(values)} {dimension!r} scores for {len(batch)} images"
                        )
                    if not np.isfinite(values).all():
                        bad = int(np.flatnonzero(~np.isfinite(values))[0])
                        raise AnnotatorError(
                            f"the scorer returned a non-finite {dimension!r} score for {paths[bad]}"
                        )
                    target[dimension].append(values)
            bar.update(len(batch))
    return (
        {d: np.concatenate(v) if v else np.zeros(0) for d, v in scores_a.items()},
        {d: np.concatenate(v) if v else np.zeros(0) for d, v in scores_b.items()},
    )


def overall_choice(choices: Mapping[str, str]) -> str:
    """Majority of the dimension choices: the side more dimensions prefer, else Tie."""
    a = sum(1 for d in DIMENSIONS if choices.get(d) == "A")
    b = sum(1 for d in DIMENSIONS if choices.get(d) == "B")
    return "A" if a > b else "B" if b > a else "Tie"


def simulate_choices(
    panel: Sequence[SimulatedAnnotator],
    scores_a: Mapping[str, np.ndarray],
    scores_b: Mapping[str, np.ndarray],
    margin: float,
) -> list[list[dict[str, str]]]:
    """choices[k][i] = {dimension: A/B/Tie} of annotator k on pair i (overall included).

    Noise and `margin` are in units of each dimension's RMS score gap over the pairs.
    """
    if margin < 0:
        raise AnnotatorError(f"tie margin must be >= 0, got {margin}")
    num_pairs = len(next(iter(scores_a.values()))) if scores_a else 0
    gaps = (
        np.stack(
            [
                np.asarray(scores_a[d], np.float64) - np.asarray(scores_b[d], np.float64)
                for d in DIMENSIONS
            ],
            axis=1,
        )
        if num_pairs
        else np.zeros((0, len(DIMENSIONS)))
    )
    # Each dimension's scores live on their own scale (colourfulness differences
    # are a tenth of lighting's), so gaps are measured in units of the
    # dimension's root-mean-square gap over the batch: one noise level and one
    # tie margin then mean the same disagreement on every dimension.
    scale = np.sqrt(np.mean(gaps**2, axis=0)) if num_pairs else np.ones(len(DIMENSIONS))
    gaps = gaps / np.where(scale > 0, scale, 1.0)
    panel_choices = []
    for annotator in panel:
        rng = np.random.default_rng(annotator.seed)
        judged = gaps + annotator.noise * rng.standard_normal(gaps.shape)
        labels = np.where(judged > margin, "A", np.where(judged < -margin, "B", "Tie"))
        per_pair = []
        for i in range(num_pairs):
            choices = {d: str(labels[i, j]) for j, d in enumerate(DIMENSIONS)}
            choices[OVERALL] = overall_choice(choices)
            per_pair.append(choices)
        panel_choices.append(per_pair)
    return panel_choices


def annotation_result(choices: Mapping[str, str], key: str | None = None) -> list[dict[str, Any]]:
    """Label Studio `result` items for a set of choices, as the labeling UI writes them.

    The UI gives each item a random 10-character id; with `key` the ids are
    derived from it instead, so a simulated export is the same file every time.
    """

    def item_id(dimension: str) -> str:
        if key is None:
            return secrets.token_urlsafe(8)[:10]
        return hashlib.sha256(f"{key}/{dimension}".encode()).hexdigest()[:10]

    return [
        {
            "id": item_id(dimension),
            "type": "choices",
            "value": {"choices": [choices[dimension]]},
            "origin": "manual",
            "to_name": CHOICES_TO_NAME,
            "from_name": dimension,
        }
        for dimension in LABELED_DIMENSIONS
        if dimension in choices
    ]


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def simulated_export(
    rows: Sequence[dict[str, Any]],
    panel: Sequence[SimulatedAnnotator],
    choices: Sequence[Sequence[dict[str, str]]],
    image_url: Callable[[str], str],
    *,
    project_id: int = 1,
    first_user_id: int = 2,
    created_at: datetime | None = None,
) -> list[dict[str, Any]]:
    """A Label Studio JSON export (the Community edition's layout) of simulated annotations.

    User ids start at `first_user_id` (1 is the server's administrator), as they
    would after `post_simulated_annotations` on a fresh server. Ids, unique ids
    and timestamps are derived from the inputs (`created_at` defaults to
    `SIMULATED_TIMESTAMP`), so the same pairs and panel give the same file.
    """
    moment = created_at or SIMULATED_TIMESTAMP
    tasks = pair_rows_to_tasks(rows, image_url)
    export: list[dict[str, Any]] = []
    annotation_id = 0
    for task_index, task in enumerate(tasks):
        task_id = task_index + 1
        annotations = []
        for annotator in panel:
            annotation_id += 1
            stamp = _timestamp(moment + timedelta(seconds=annotation_id))
            user_id = first_user_id + annotator.index
            key = f"{project_id}/{task['data']['pair_id']}/{annotator.index}"
            result = annotation_result(choices[annotator.index][task_index], key=key)
            annotations.append(
                {
                    "id": annotation_id,
                    "completed_by": user_id,
                    "result": result,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "created_at": stamp,
                    "updated_at": stamp,
                    "draft_created_at": None,
                    "lead_time": None,
                    "prediction": {},
                    "result_count": 1 if result else 0,
                    "unique_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"unifl:{key}")),
                    "import_id": None,
                    "last_action": None,
                    "bulk_created": False,
                    "task": task_id,
                    "project": project_id,
                    "updated_by": user_id,
                    "parent_prediction": None,
                    "parent_annotation": None,
                    "last_created_by": None,
                }
            )
        created = _timestamp(moment)
        export.append(
            {
                "id": task_id,
                "annotations": annotations,
                "drafts": [],
                "predictions": [],
                "data": task["data"],
                "meta": task["meta"],
                "created_at": created,
                "updated_at": _timestamp(moment + timedelta(seconds=annotation_id)),
                "allow_skip": True,
                "inner_id": task_id,
                "total_annotations": len(annotations),
                "cancelled_annotations": 0,
                "total_predictions": 0,
                "comment_count": 0,
                "unresolved_comment_count": 0,
                "last_comment_updated_at": None,
                "project": project_id,
                "updated_by": first_user_id + panel[-1].index if panel else None,
                "comment_authors": [],
            }
        )
    return export


def post_simulated_annotations(
    client: LabelStudioClient,
    project_id: int,
    task_ids_by_pair: Mapping[str, int],
    rows: Sequence[dict[str, Any]],
    panel: Sequence[SimulatedAnnotator],
    choices: Sequence[Sequence[dict[str, str]]],
) -> int:
    """Post every annotator's choices as that annotator's annotations; returns how many.

    Tasks that already hold an annotation of an annotator are left alone, so a
    rerun does not double the votes.
    """
    user_ids = {
        a.index: client.ensure_user(a.email, "Simulated", f"annotator {a.index + 1}") for a in panel
    }
    existing = {
        (int(task["id"]), int(annotation["completed_by"]))
        for task in client.export_json(project_id)
        for annotation in task.get("annotations", [])
        if isinstance(annotation.get("completed_by"), int)
    }
    posted = 0
    total = len(rows) * len(panel)
    with tqdm(total=total, desc="posting annotations", unit="annotation", disable=None) as bar:
        for task_index, row in enumerate(rows):
            task_id = task_ids_by_pair.get(row["pair_id"])
            if task_id is None:
                raise AnnotatorError(f"pair {row['pair_id']!r} has no task in the project")
            for annotator in panel:
                user_id = user_ids[annotator.index]
                if (task_id, user_id) not in existing:
                    client.create_annotation(
                        task_id,
                        annotation_result(choices[annotator.index][task_index]),
                        completed_by=user_id,
                    )
                    posted += 1
                bar.update(1)
    return posted
