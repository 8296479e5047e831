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
    """Load the configuration or exit with the error's message (no traceback)."""
    try:
        return load_params(params, preset=preset, overrides=overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(
    params: ParamsOpt = Path("params.yaml"), preset: PresetOpt = None, set_: SetOpt = None
) -> None:
    """Print the resolved configuration."""
    from unifl.config import params_to_yaml

    typer.echo(params_to_yaml(load(params, preset, set_)))


@config_app.command("describe")
def config_describe() -> None:
    """Print every field with its default and description."""
    from unifl.config import describe_params

    typer.echo(describe_params())


# Commands of the stages are added below, one function each, by the modules' owners.


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


if __name__ == "__main__":
    app()
