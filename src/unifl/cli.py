"""The `unifl` command line: thin adapters that parse arguments and call the library.

Every command takes the configuration the same way: `--params params.yaml`,
an optional `--preset ci`, and any number of `--set stage.key=value`.
Heavy imports stay inside the commands so `unifl --help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unifl.config import ConfigError, Params, load_params

app = typer.Typer(
    help="UniFL: unified feedback learning for Stable Diffusion.", no_args_is_help=True
)
toy_app = typer.Typer(help="The toy world: data, tiny models, bootstrap.", no_args_is_help=True)
stage_app = typer.Typer(
    help="One pipeline stage (called by DVC and KFP components).", no_args_is_help=True
)
labeling_app = typer.Typer(
    help="Label Studio: serve, push tasks, pull annotations.", no_args_is_help=True
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
app.add_typer(stage_app, name="stage")
app.add_typer(labeling_app, name="labeling")
app.add_typer(config_app, name="config")

ParamsOpt = Annotated[Path, typer.Option("--params", help="The params file.")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="A packaged preset, e.g. 'ci'.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a value: stage.key=value (repeatable).")
]


def load(params: Path, preset: str | None, overrides: list[str] | None) -> Params:
    """Load the configuration or exit with the error's message (no traceback).

    Also sets this process's torch threads (`project.num_threads`).
    """
    from unifl.models.precision import apply_num_threads

    try:
        config = load_params(params, preset=preset, overrides=overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    apply_num_threads(config.project)
    return config


@config_app.command("show")
def config_show(
    params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None
) -> None:
    """Print the resolved configuration (credentials in URLs shown as ***)."""
    from unifl.tracking.redaction import safe_params_yaml

    typer.echo(safe_params_yaml(load(params, preset, set_)))


@config_app.command("describe")
def config_describe() -> None:
    """Print every field with its default and description."""
    from unifl.config import describe_params

    typer.echo(describe_params())


# Commands of the stages are added below, one function each, by the modules' owners.


@toy_app.command("bootstrap")
def toy_bootstrap(
    out: Annotated[Path | None, typer.Option(help="Output directory; default: the cache.")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even when a cached result exists.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the toy VAE, base model, segmenter and CLIP (cached by config hash); print metrics."""
    from unifl.toy.bootstrap import bootstrap_toy_world, summary_lines

    result = bootstrap_toy_world(load(params, preset, set_), out_dir=out, force=force)
    typer.echo("\n".join(summary_lines(result)))


@app.command("promote")
def promote(
    version: Annotated[str, typer.Option("--version", help="Registered model version.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Registered model (default: tracking.registered_model)."),
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="Target stage: staging or production.")
    ] = "staging",
    override: Annotated[
        bool, typer.Option("--override", help="Promote even if a gate fails (needs --reason).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why the override is justified (recorded).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the promotion gates on a model version and promote it if they pass.

    Exit status: 0 promoted, 1 rejected by a gate, 2 bad request (config, order, server).
    """
    from unifl.tracking.promotion import promote_from_params
    from unifl.tracking.registry import RegistryError
    from unifl.tracking.runs import TrackingError

    if to not in ("staging", "production"):
        typer.echo(f"error: --to {to!r}: expected staging or production", err=True)
        raise typer.Exit(2)
    if override != bool(reason and reason.strip()):
        typer.echo("error: --override and a non-empty --reason go together", err=True)
        raise typer.Exit(2)
    config = load(params, preset, set_)
    try:
        decision = promote_from_params(
            config,
            model,
            version,
            target=to,  # type: ignore[arg-type]
            override_reason=reason if override else None,
        )
    except (ConfigError, RegistryError, TrackingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(decision.summary())
    if not decision.promoted:
        raise typer.Exit(1)


@stage_app.command("evaluate")
def stage_evaluate(
    model: Annotated[str, typer.Option("--model", help="Model directory or hub id to evaluate.")],
    prompts: Annotated[
        Path,
        typer.Option(
            "--prompts", help="Prompts: curated table, toy data set, CSV/JSONL/Parquet or .txt."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory (replaced as a whole).")],
    segmenter: Annotated[
        Path | None, typer.Option("--segmenter", help="Toy segmenter: caption-match, oracle.")
    ] = None,
    reward: Annotated[
        Path | None, typer.Option("--reward", help="Decoupled reward model directory.")
    ] = None,
    real_data: Annotated[
        Path | None, typer.Option("--real-data", help="Real images for the Frechet distance.")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Model drawn beside it in the grids (before).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a model: per-prompt metrics at each step count, Frechet, grids, report."""
    from unifl.evaluation.evaluate import run_evaluation, summary_table

    config = load(params, preset, set_)
    try:
        result = run_evaluation(config, model, prompts, out, segmenter, reward, real_data, baseline)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_table(result))
    typer.echo(f"wrote {out}")


PairsDirOpt = Annotated[
    Path, typer.Option("--pairs", help="Pairs directory (images and the pair manifest).")
]
LabelsOutOpt = Annotated[
    Path, typer.Option("--out", help="Labels directory to write (replaced as a whole).")
]


def _labeling_failed(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _echo_labels(report: object) -> None:
    summary = report.summary  # type: ignore[attr-defined]
    typer.echo(
        f"{summary.tasks} tasks, {summary.annotations} annotations "
        f"({summary.annotations_cancelled} cancelled), {summary.votes} votes -> "
        f"{summary.pairs} pairs ({summary.tie_pairs} ties, "
        f"{summary.pairs_dropped_few_votes} dropped below {summary.min_annotators} votes)"
    )
    alphas = report.agreement["dimensions"]  # type: ignore[attr-defined]
    typer.echo(
        "Krippendorff's alpha: "
        + ", ".join(
            f"{d} {v['alpha']:.3f}" if v["alpha"] is not None else f"{d} n/a"
            for d, v in alphas.items()
        )
    )
    typer.echo(f"wrote {report.out_dir}")  # type: ignore[attr-defined]


@labeling_app.command("serve")
def labeling_serve(
    port: Annotated[
        int | None, typer.Option("--port", help="Port (default labeling.server_port).")
    ] = None,
    document_root: Annotated[
        Path | None,
        typer.Option(
            "--document-root", help="Served local files root (default labeling.document_root)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Server data (default <server_dir>/data).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Start a real local Label Studio on 127.0.0.1 (installed on first use) until Ctrl-C."""
    from unifl.labeling.server import LabelStudioServerError, start_server

    labeling = load(params, preset, set_).labeling
    root = (document_root or Path(labeling.document_root)).resolve()
    data = data_dir or Path(labeling.server_dir) / "data"
    typer.echo(f"Starting Label Studio {labeling.server_version} (data in {data}); the first start")
    typer.echo("installs it and migrates its database, which takes a few minutes...")
    try:
        server = start_server(
            data,
            root,
            port=port or labeling.server_port,
            cache_dir=labeling.server_dir,
            version=labeling.server_version,
            template_dir=Path(labeling.server_dir) / f"template-{labeling.server_version}",
        )
    except LabelStudioServerError as exc:
        raise _labeling_failed(exc) from None
    typer.echo(f"Label Studio is running at {server.url}")
    typer.echo(f"  login:         {server.credentials.username}")
    typer.echo(f"  password:      {server.credentials.password}")
    typer.echo(f"  API token in:  {server.token_path} (legacy token, readable only by you)")
    typer.echo(f"  local files:   {root}")
    typer.echo(
        f"Use it: --set labeling.url={server.url} --set labeling.token_file={server.token_path}"
    )
    typer.echo("Press Ctrl-C to stop.")
    try:
        server.process.wait()
    except KeyboardInterrupt:
        typer.echo("stopping Label Studio")
    finally:
        server.stop()


@labeling_app.command("push")
def labeling_push(
    pairs: PairsDirOpt,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Create or update the project and import the pairs as tasks (idempotent)."""
    from unifl.labeling.client import LabelStudioClient, LabelStudioClientError
    from unifl.labeling.pipeline import push_pairs

    labeling = load(params, preset, set_).labeling
    try:
        client = LabelStudioClient.from_config(labeling)
        report = push_pairs(client, labeling, pairs)
    except (LabelStudioClientError, ValueError, OSError) as exc:
        raise _labeling_failed(exc) from None
    if report.project_created:
        state = "created"
    else:
        state = "config updated" if report.config_updated else "unchanged"
    if labeling.storage == "s3":
        typer.echo(
            f"images in s3://{labeling.s3_bucket}/{labeling.s3_prefix.strip('/')}: uploaded "
            f"{report.images_uploaded}, {report.images_already_present} already present"
        )
    typer.echo(
        f"project {report.project_id} ({state}) at {client.url}: imported {report.tasks_imported} "
        f"tasks, {report.tasks_already_present} already present"
    )


@labeling_app.command("pull")
def labeling_pull(
    out: LabelsOutOpt,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export the annotations and write votes.parquet, pairs.parquet and agreement.json."""
    from unifl.labeling.client import LabelStudioClient, LabelStudioClientError
    from unifl.labeling.pipeline import pull_labels

    labeling = load(params, preset, set_).labeling
    try:
        client = LabelStudioClient.from_config(labeling)
        report = pull_labels(client, labeling, out)
    except (LabelStudioClientError, ValueError, OSError) as exc:
        raise _labeling_failed(exc) from None
    _echo_labels(report)


@stage_app.command("label")
def stage_label(
    pairs: PairsDirOpt,
    out: LabelsOutOpt,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Label pairs with simulated annotators (an export file, or a server if labeling.url is set)."""
    from unifl.labeling.client import LabelStudioClientError
    from unifl.labeling.pipeline import label_pairs

    config = load(params, preset, set_)
    try:
        report = label_pairs(config, pairs, out)
    except (LabelStudioClientError, ValueError, OSError) as exc:
        raise _labeling_failed(exc) from None
    _echo_labels(report)


cluster_app = typer.Typer(help="Running on a Kubernetes cluster.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("check")
def cluster_check(
    needs: Annotated[
        list[str] | None,
        typer.Option(
            "--needs", help="Settings group to check: mlflow, s3, labeling, training (repeatable)."
        ),
    ] = None,
) -> None:
    """Check the ConfigMap/Secret-provided settings of this pod; name every missing key."""
    from unifl.cluster.settings import ClusterSettingsError, load_cluster_settings
    from unifl.tracking.redaction import redact_url_credentials as shown

    try:
        settings = load_cluster_settings(needs=needs or ["mlflow"])
    except (ClusterSettingsError, ValueError) as exc:
        typer.echo(f"error: {shown(str(exc))}", err=True)
        raise typer.Exit(2) from None
    if settings.mlflow:
        typer.echo(f"mlflow: tracking URI {shown(settings.mlflow.tracking_uri)}")
    if settings.s3:
        typer.echo(
            f"s3: endpoint {shown(settings.s3.endpoint_url)}, buckets "
            f"{settings.s3.mlflow_artifacts_bucket} and {settings.s3.task_images_bucket}, "
            "credentials set"
        )
    if settings.labeling:
        typer.echo(f"labeling: Label Studio at {shown(settings.labeling.url)}, token set")
    if settings.training:
        training = settings.training
        selector = ",".join(f"{k}={v}" for k, v in training.gpu_node_selector.items())
        typer.echo(
            f"training: {training.api} with runtime {training.runtime} in namespace "
            f"{training.namespace}, checkpoints on PVC {training.checkpoint_pvc}, GPU nodes "
            f"{selector} tolerating {training.gpu_toleration_key}"
        )


@stage_app.command("curate")
def stage_curate(
    model: Annotated[
        str,
        typer.Option("--model", help="Base model directory or hub id (its text encoder embeds)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory (replaced as a whole).")],
    source: Annotated[
        list[Path] | None,
        typer.Option(
            "--source", help="Prompt file: CSV, JSONL or Parquet (repeatable); none: toy."
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Curate prompts: clean, dedupe, active selection; write prompts.parquet and a report."""
    from unifl.data.prompts import CurationError, PromptSourceError, run_curate_stage
    from unifl.data.selection import SelectionError

    config = load(params, preset, set_)
    try:
        report = run_curate_stage(config, source or [], model, out)
    except (CurationError, PromptSourceError, SelectionError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    dropped = ", ".join(f"{reason}={count}" for reason, count in report.dropped.items() if count)
    typer.echo(
        f"curated {report.output_rows} of {report.input_rows} prompts ({dropped or 'none dropped'})"
    )
    if report.selection:
        selection = report.selection
        typer.echo(
            "mean nearest-neighbour similarity "
            f"{selection['mean_nn_similarity_before']:.3f} -> "
            f"{selection['mean_nn_similarity_selected'] or float('nan'):.3f} "
            f"(tau2={selection['tau2']})"
        )
    typer.echo(f"wrote {out}")


@stage_app.command("generate-pairs")
def stage_generate_pairs(
    model: Annotated[str, typer.Option("--model", help="Model directory or hub id that samples.")],
    prompts: Annotated[
        Path, typer.Option("--prompts", help="Curated prompts (directory or prompts.parquet).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Pairs directory (replaced as a whole).")],
    model_version: Annotated[
        str | None,
        typer.Option("--model-version", help="Recorded in the manifest; default: --model."),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate two images per curated prompt with the model; write PNGs and the pair manifest."""
    from unifl.data.pairs import run_pairs_stage

    config = load(params, preset, set_)
    try:
        report = run_pairs_stage(config, prompts, model, out, model_version)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"generated {report.pairs} pairs ({report.images} images) in {report.seconds:.1f} s")
    typer.echo(f"wrote {out}")


@stage_app.command("validate")
def stage_validate(
    kind: Annotated[
        str, typer.Option("--kind", help="Suite: prompts, pairs, votes or evaluation.")
    ],
    table: Annotated[
        Path, typer.Option("--table", help="Table file (Parquet, CSV, JSONL) or its directory.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Report directory (replaced as a whole).")],
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root", help="Base of relative image paths; default: the table's directory."
        ),
    ] = None,
    expect_column: Annotated[
        list[str] | None,
        typer.Option("--expect-column", help="evaluation: a column that must exist (repeatable)."),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a table with its Great Expectations suite; exit 1 on failure (report in --out)."""
    from unifl.data.validation import DataValidationError, options_from_params, validate

    config = load(params, preset, set_)
    options = options_from_params(config, image_root)
    options.expected_columns = expect_column
    try:
        result = validate(kind, table, out, options)  # type: ignore[arg-type]
    except DataValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"{kind}: {result.evaluated} expectations met on {result.rows} rows; "
        f"report {result.report_html}"
    )


@stage_app.command("reward-train")
def stage_reward_train(
    pairs: Annotated[Path, typer.Option("--pairs", help="Majority pair table (Parquet).")],
    images_root: Annotated[
        Path, typer.Option("--images-root", help="Directory the table's image paths are under.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output: model/, metrics.json, ...")],
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the decoupled reward model on preference pairs; calibrate and save alpha_d."""
    from unifl.feedback.reward_training import train_reward_stage

    config = load(params, preset, set_)
    try:
        result = train_reward_stage(config, pairs, images_root, out)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for key, value in sorted(result.metrics.items()):
        if key.startswith(("val/accuracy", "alpha/")):
            typer.echo(f"{key}: {value:.4f}")
    typer.echo(f"reward model written to {out / 'model'}")


PipelineOpt = Annotated[
    str, typer.Option("--pipeline", help="Which pipeline: full, collect or train.")
]


@app.command("run")
def run_pipeline(
    pipeline: PipelineOpt = "full",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory (default <project.work_dir>/local)."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Pipeline run id; reuse one to resume it.")
    ] = None,
    prompt_source: Annotated[
        str, typer.Option("--prompts", help="Prompt file(s), comma-separated; default: toy.")
    ] = "",
    labels_export: Annotated[
        str, typer.Option("--labels-export", help="Label Studio export instead of simulation.")
    ] = "",
    pairs_uri: Annotated[
        str, typer.Option("--pairs-uri", help="train: pairs of a collect run (default: newest).")
    ] = "",
    prompts_uri: Annotated[
        str,
        typer.Option("--prompts-uri", help="train: prompts of a collect run (default: newest)."),
    ] = "",
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse cached data steps (KFP caching).")
    ] = True,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a pipeline locally with kfp.local (toy world, simulated annotators, MLflow on SQLite).

    Prints the pipeline run id and the log's path as the steps start, then the evaluation, the
    promotion decision, the outputs and the MLflow UI command. An interrupted or failed run
    resumes with the same options and --run-id.
    """
    from unifl.orchestration.local import LocalRunError, run_local
    from unifl.tracking.runs import TrackingError

    config = load(params, preset, set_)
    started: dict[str, object] = {}

    def announce(pipeline_run_id: str, log_file: Path) -> None:
        started.update(run_id=pipeline_run_id, log=log_file)
        typer.echo(f"pipeline run id {pipeline_run_id}; log: {log_file}", err=True)

    try:
        summary = run_local(
            config,
            pipeline,
            out_dir=out,
            pipeline_run_id=run_id,
            prompt_source=prompt_source,
            labels_export=labels_export,
            pairs_uri=pairs_uri,
            prompts_uri=prompts_uri,
            cache=cache,
            on_start=announce,
        )
    except KeyboardInterrupt:
        if started:
            typer.echo(
                f"\ninterrupted: resume with the same options and --run-id {started['run_id']} "
                f"(log: {started['log']})",
                err=True,
            )
        else:
            typer.echo("\ninterrupted before the first step", err=True)
        raise typer.Exit(130) from None
    except (ConfigError, TrackingError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except LocalRunError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary.text())


@app.command("compile")
def compile_pipelines_command(
    out: Annotated[
        Path, typer.Option("--out", help="Directory of the compiled pipeline YAML files.")
    ] = Path("pipelines/compiled"),
    image: Annotated[
        str | None,
        typer.Option("--image", help="Image NAME:TAG of the steps (default unifl:<version>)."),
    ] = None,
    gpu_image: Annotated[
        str | None,
        typer.Option("--gpu-image", help="Image of the GPU steps (default <image>-cuda)."),
    ] = None,
    pipeline: Annotated[
        list[str] | None, typer.Option("--pipeline", help="Only these pipelines (repeatable).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compile the pipelines to YAML for the Kubeflow UI (defaults from the configuration)."""
    from unifl.pipelines.compile import compile_pipelines

    config = load(params, preset, set_)
    names = pipeline or ["full", "collect", "train"]
    unknown = sorted(set(names) - {"full", "collect", "train"})
    if unknown:
        typer.echo(f"error: unknown pipelines {unknown}; expected full, collect, train", err=True)
        raise typer.Exit(2)
    for path in compile_pipelines(config, out, image=image, gpu_image=gpu_image, names=names):
        typer.echo(f"wrote {path}")


@app.command("submit")
def submit_pipeline_command(
    host: Annotated[str, typer.Option("--host", help="Kubeflow Pipelines API URL.")],
    pipeline: PipelineOpt = "full",
    experiment: Annotated[str, typer.Option("--experiment", help="KFP experiment.")] = "unifl",
    run_name: Annotated[str | None, typer.Option("--run-name", help="Name of the run.")] = None,
    arg: Annotated[
        list[str] | None,
        typer.Option("--arg", help="Run parameter name=value, e.g. pefl_steps=500 (repeatable)."),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option("--image", help="Image NAME:TAG of the steps (default pipeline.image)."),
    ] = None,
    gpu_image: Annotated[str | None, typer.Option("--gpu-image", help="GPU image.")] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="Kubeflow profile namespace.")
    ] = None,
    service_account: Annotated[
        str,
        typer.Option(
            "--service-account",
            help="Kubernetes service account of the run's pods ('' for the namespace's default).",
        ),
    ] = "unifl-pipeline",
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Upload the pipeline as a new version and start a run (token from $KFP_TOKEN if set).

    Needs the steps' image: --image or pipeline.image.
    """
    from unifl.orchestration.submit import SubmitError, parse_arguments, submit_pipeline

    config = load(params, preset, set_)
    try:
        submitted = submit_pipeline(
            config,
            host,
            pipeline,
            experiment=experiment,
            run_name=run_name,
            arguments=parse_arguments(arg or []),
            image=image,
            gpu_image=gpu_image,
            namespace=namespace,
            service_account=service_account,
        )
    except (ConfigError, SubmitError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"started run {submitted.run_id}: {submitted.url}")


@stage_app.command("toy-world")
def stage_toy_world(
    out: Annotated[Path, typer.Option("--out", help="Output: base/, segmenter/, data/.")],
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """The toy world as one directory (from the bootstrap cache, trained if missing)."""
    from unifl.orchestration.stage_entry import toy_world_stage

    metrics = toy_world_stage(load(params, preset, set_), out)
    for key, value in sorted(metrics.items()):
        typer.echo(f"{key}: {value:.4f}")
    typer.echo(f"wrote {out}")


BaseOpt = Annotated[
    str, typer.Option("--base", help="Base model: diffusers directory, hub id or toy preset.")
]
RewardDirOpt = Annotated[Path, typer.Option("--reward", help="Decoupled reward model directory.")]
StageOutOpt = Annotated[
    Path,
    typer.Option("--out", help="Output directory (model, lora, metrics; resumes its checkpoints)."),
]
ImagesOpt = Annotated[
    Path, typer.Option("--data", help="Real images with captions and masks (toy data layout).")
]


def _run_feedback_stage(run: object) -> None:
    """Run a feedback stage; exit 2 on bad input, 1 when training stops (NaN, ...)."""
    import os

    from unifl.feedback.trainer import TrainingError

    try:
        result = run()  # type: ignore[operator]
    except TrainingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return
    metrics = result.metrics
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    typer.echo(
        f"{result.stage}: {int(metrics['steps'])} steps{resumed}, "
        f"{metrics['steps_per_second']:.3g} steps/s"
    )
    shown = [k for k in metrics if k.startswith(("final_loss", "final_reward_", "reward_"))]
    typer.echo("  " + ", ".join(f"{k} {metrics[k]:.4g}" for k in shown))
    typer.echo(f"wrote {result.out_dir} (model in {result.model_dir})")


@stage_app.command("pefl")
def stage_pefl(
    base: BaseOpt,
    data: ImagesOpt,
    out: StageOutOpt,
    reward: Annotated[
        Path | None, typer.Option("--reward", help="Reward model directory: adds L_aes.")
    ] = None,
    segmenter: Annotated[
        Path | None,
        typer.Option("--segmenter", help="Toy segmenter directory (pefl.perceptual model 'toy')."),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Perceptual feedback learning (stage 1): L_pefl + L_aes on real images."""
    from unifl.feedback.stages import run_pefl

    config = load(params, preset, set_)
    _run_feedback_stage(
        lambda: run_pefl(config, base, data, out, reward=reward, segmenter=segmenter)
    )


@stage_app.command("decoupled")
def stage_decoupled(
    base: BaseOpt,
    prompts: Annotated[
        Path,
        typer.Option(
            "--prompts", help="Prompts: curated table, toy data set, CSV/JSONL/Parquet or .txt."
        ),
    ],
    reward: RewardDirOpt,
    out: StageOutOpt,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Real images for the MSE regulariser (decoupled.mse_weight).",
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decoupled aesthetic feedback learning: one hinge per reward dimension."""
    from unifl.feedback.stages import run_decoupled

    config = load(params, preset, set_)
    _run_feedback_stage(lambda: run_decoupled(config, base, prompts, reward, out, data=data))


@stage_app.command("adversarial")
def stage_adversarial(
    base: BaseOpt,
    data: ImagesOpt,
    reward: RewardDirOpt,
    out: StageOutOpt,
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Adversarial feedback learning (stage 2): generator and discriminator, for 4-step inference."""
    from unifl.feedback.stages import run_adversarial

    config = load(params, preset, set_)
    _run_feedback_stage(lambda: run_adversarial(config, base, data, reward, out))


@toy_app.command("data")
def toy_data(
    out: Annotated[Path, typer.Option(help="Directory of the data set (replaced whole).")],
    split: Annotated[
        str, typer.Option(help="'train' (toy.num_train, toy.seed) or 'eval' (toy.num_eval).")
    ] = "train",
    params: ParamsOpt = Path("params.yaml"),
    preset: PresetOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a toy data set directory (PNG images and masks, JSONL annotations, manifest)."""
    from unifl.toy.dataset import split_size_and_seed, write_toy_dataset

    toy = load(params, preset, set_).toy
    try:
        count, seed = split_size_and_seed(toy, split)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    manifest = write_toy_dataset(out, count, seed, toy.resolution, toy.min_objects, toy.max_objects)
    typer.echo(f"{out}: {manifest['count']} images, content hash {manifest['content_hash']}")


if __name__ == "__main__":
    app()
