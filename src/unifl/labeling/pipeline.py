"""The labeling steps the CLI, DVC and KFP call: push pairs, pull labels, label a pairs directory.

Outputs of a labels directory (written whole or not at all):

* `export.json`: the Label Studio JSON export the tables came from (real or simulated);
* `votes.parquet`, `pairs.parquet`: the tables of `unifl.data.preferences`;
* `agreement.json`: Krippendorff's alpha per dimension, annotators' agreement;
* `summary.json`: the conversion counts (kept, cancelled, ties, dropped) and the source.

Nothing here writes the token anywhere: it is read from the environment or the
Secret file at the moment the client is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unifl.data.preferences import write_pairs, write_votes
from unifl.io import atomic_directory, check_output_apart, write_json
from unifl.labeling.agreement import agreement_report
from unifl.labeling.export import ConversionSummary, convert_export
from unifl.labeling.label_config import build_instructions_html, build_label_config
from unifl.labeling.tasks import (
    local_files_url,
    pair_image_paths,
    pair_rows_to_tasks,
    read_pair_manifest,
    s3_url,
)

if TYPE_CHECKING:
    from unifl.config import LabelingConfig, Params
    from unifl.labeling.annotators import ImageScorer
    from unifl.labeling.client import LabelStudioClient

EXPORT_FILE = "export.json"
VOTES_FILE = "votes.parquet"
PAIRS_FILE = "pairs.parquet"
AGREEMENT_FILE = "agreement.json"
SUMMARY_FILE = "summary.json"


class LabelingError(ValueError):
    """A labeling step cannot run with these inputs; the message names what is wrong."""


@dataclass
class PushReport:
    project_id: int
    project_created: bool
    config_updated: bool
    tasks_imported: int
    tasks_already_present: int
    storage_id: int | None
    task_ids_by_pair: dict[str, int]
    images_uploaded: int = 0
    """Images written to the bucket by this push (storage 's3')."""
    images_already_present: int = 0
    """Images the bucket already held with the same size (storage 's3')."""


@dataclass
class LabelsReport:
    source: str
    out_dir: Path
    summary: ConversionSummary
    agreement: dict[str, Any]
    project_id: int | None = None
    annotations_posted: int = 0


def image_url_builder(labeling: LabelingConfig, pairs_dir: Path) -> Callable[[str], str]:
    """How the server will show the images: Local Files URLs or s3:// keys it presigns."""
    if labeling.storage == "s3":
        if not labeling.s3_bucket:
            raise LabelingError("labeling.storage is 's3' but labeling.s3_bucket is not set")
        bucket, prefix = labeling.s3_bucket, labeling.s3_prefix
        return lambda relative: s3_url(relative, bucket, prefix)
    root = Path(labeling.document_root)
    return lambda relative: local_files_url(pairs_dir / relative, root)


def _read_pairs(pairs_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    pairs_dir = Path(pairs_dir)
    rows = read_pair_manifest(pairs_dir)
    pair_image_paths(pairs_dir, rows)  # a missing image is an error naming its row
    return pairs_dir, rows


def push_pairs(
    client: LabelStudioClient, labeling: LabelingConfig, pairs_dir: str | Path
) -> PushReport:
    """Create or update the project, attach the image storage, import the pairs' tasks.

    With storage 's3' the images are first uploaded to the bucket under the keys the tasks
    name (`object_store.upload_pair_images`: what is already there is skipped), so the
    server finds every image a task shows.
    """
    client.whoami()  # a wrong URL or token fails here, before anything is read or sent
    pairs_dir, rows = _read_pairs(pairs_dir)
    image_url = image_url_builder(labeling, pairs_dir)
    tasks = pair_rows_to_tasks(rows, image_url)
    uploaded = already_present = 0
    if labeling.storage == "s3":
        from unifl.labeling.object_store import upload_pair_images

        upload = upload_pair_images(labeling, pairs_dir, rows)
        uploaded, already_present = upload.uploaded, upload.already_present
    setup = client.ensure_project(
        labeling.project_title,
        build_label_config(),
        description="Aesthetic preference pairs (color, layout, detail, lighting, overall).",
        instructions_html=build_instructions_html(),
    )
    if labeling.storage == "s3":
        from unifl.labeling.object_store import storage_endpoint

        storage_id = client.ensure_s3_storage(
            setup.id,
            labeling.s3_bucket or "",
            labeling.s3_prefix,
            region=labeling.s3_region,
            endpoint=storage_endpoint(labeling),
            presign=labeling.s3_presign,
            presign_ttl_minutes=labeling.presign_ttl_minutes,
        )
    else:
        storage_id = client.ensure_local_storage(setup.id, pairs_dir)
    imported = client.import_tasks(setup.id, tasks, labeling.import_batch_size)
    return PushReport(
        project_id=setup.id,
        project_created=setup.created,
        config_updated=setup.config_updated,
        tasks_imported=imported.imported,
        tasks_already_present=imported.already_present,
        storage_id=storage_id,
        task_ids_by_pair=imported.task_ids_by_pair,
        images_uploaded=uploaded,
        images_already_present=already_present,
    )


def write_labels(
    export: list[dict[str, Any]],
    out_dir: str | Path,
    min_annotators: int,
    source: str,
    extra: dict[str, Any] | None = None,
) -> LabelsReport:
    """Convert an export and write the labels directory atomically.

    An export without a single vote (nobody has annotated yet, or the wrong project), or
    whose every pair falls below `min_annotators`, is an error naming `source`: nothing is
    written, so an existing labels directory is never replaced by an empty one.
    """
    result = convert_export(export, min_annotators=min_annotators)
    out_dir = Path(out_dir)
    _check_not_empty(result.summary, result.votes, out_dir, source)
    agreement = agreement_report(result.votes)
    with atomic_directory(out_dir) as tmp:
        with (tmp / EXPORT_FILE).open("w", encoding="utf-8") as handle:
            json.dump(export, handle, indent=1, ensure_ascii=False)
        write_votes(result.votes, tmp / VOTES_FILE)
        write_pairs(result.pairs, tmp / PAIRS_FILE)
        write_json(tmp / AGREEMENT_FILE, agreement)
        write_json(
            tmp / SUMMARY_FILE, {"source": source, **result.summary.to_dict(), **(extra or {})}
        )
    return LabelsReport(source=source, out_dir=out_dir, summary=result.summary, agreement=agreement)


def _check_not_empty(summary: ConversionSummary, votes: Any, out_dir: Path, source: str) -> None:
    if not votes.empty and summary.pairs > 0:
        return
    kept = (
        f"{out_dir} is left as it was" if out_dir.exists() else f"nothing was written to {out_dir}"
    )
    if votes.empty:
        raise LabelingError(
            f"{source}: 0 annotated tasks of {summary.tasks} ({summary.annotations} "
            f"annotations, {summary.annotations_cancelled} cancelled, "
            f"{summary.annotations_empty} without a choice), so there are no labels; {kept}. "
            "Annotate tasks first, or check that this is the right project."
        )
    annotated = votes["task_id"].nunique()
    raise LabelingError(
        f"{source}: {annotated} annotated tasks of {summary.tasks}, but no pair has "
        f"{summary.min_annotators} votes (labeling.min_annotators), so there are no labels; "
        f"{kept}."
    )


def pull_labels(
    client: LabelStudioClient, labeling: LabelingConfig, out_dir: str | Path
) -> LabelsReport:
    """Export the project through the SDK and write the labels directory."""
    client.whoami()
    projects = client.find_projects(labeling.project_title)
    if not projects:
        raise LabelingError(
            f"no project titled {labeling.project_title!r} on {client.url}: run `unifl labeling push` first"
        )
    project_id = int(projects[0].id)
    export = client.export_json(project_id)
    report = write_labels(
        export,
        out_dir,
        labeling.min_annotators,
        source=f"label-studio {client.url} project {project_id}",
        extra={"project_id": project_id},
    )
    report.project_id = project_id
    return report


def label_pairs(
    params: Params,
    pairs_dir: str | Path,
    out_dir: str | Path,
    scorer: ImageScorer | None = None,
    client: LabelStudioClient | None = None,
) -> LabelsReport:
    """The `label` stage: simulated annotators label a pairs directory.

    Without `labeling.url` the panel writes an export file in Label Studio's
    format; with it, the pairs are pushed, the panel posts its annotations
    through the API, and the project is exported. Either way the same
    conversion writes the tables.
    """
    from unifl.labeling.annotators import (
        load_scorer,
        make_panel,
        post_simulated_annotations,
        score_pairs,
        simulate_choices,
        simulated_export,
    )

    labeling = params.labeling
    check_output_apart(out_dir, [pairs_dir])
    pairs_dir, rows = _read_pairs(pairs_dir)
    scorer = scorer or load_scorer(labeling.scorer, params)
    panel = make_panel(labeling.num_annotators, labeling.annotator_noise, seed=params.project.seed)
    scores_a, scores_b = score_pairs(rows, pairs_dir, scorer)
    choices = simulate_choices(panel, scores_a, scores_b, labeling.tie_margin)
    settings = {
        "num_annotators": labeling.num_annotators,
        "annotator_noise": [a.noise for a in panel],
        "tie_margin": labeling.tie_margin,
        "pairs_dir": str(pairs_dir),
    }

    if client is None and not labeling.url:
        export = simulated_export(
            rows, panel, choices, _simulation_url_builder(labeling, pairs_dir)
        )
        return write_labels(
            export,
            out_dir,
            labeling.min_annotators,
            source="simulated annotators (no server)",
            extra={"simulation": settings},
        )

    from unifl.labeling.client import LabelStudioClient

    client = client or LabelStudioClient.from_config(labeling)
    pushed = push_pairs(client, labeling, pairs_dir)
    posted = post_simulated_annotations(
        client, pushed.project_id, pushed.task_ids_by_pair, rows, panel, choices
    )
    export = client.export_json(pushed.project_id)
    report = write_labels(
        export,
        out_dir,
        labeling.min_annotators,
        source=f"simulated annotators via label-studio {client.url} project {pushed.project_id}",
        extra={
            "simulation": settings,
            "project_id": pushed.project_id,
            "annotations_posted": posted,
        },
    )
    report.project_id = pushed.project_id
    report.annotations_posted = posted
    return report


def _simulation_url_builder(labeling: LabelingConfig, pairs_dir: Path) -> Callable[[str], str]:
    # Without a server the URLs are only for show; keep the scheme the server would
    # use, and fall back to a root at the pairs directory's parent when the pairs
    # lie outside the configured document root (e.g. a pipeline's scratch space).
    if labeling.storage == "s3":
        return image_url_builder(labeling, pairs_dir)
    root = Path(labeling.document_root).resolve()
    if not pairs_dir.resolve().is_relative_to(root):
        root = pairs_dir.resolve().parent
    return lambda relative: local_files_url(pairs_dir / relative, root)
