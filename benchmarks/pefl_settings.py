"""PeFL from the base model at the params.yaml defaults and at other settings, over seeds.

    python benchmarks/pefl_settings.py --jobs 3
    python benchmarks/pefl_settings.py --jobs 3 \\
        --variant pefl.aesthetic_weight=0 \\
        --variant pefl.perceptual_weight=0.1 \\
        --variant pefl.start_step=10,pefl.max_step=10

PeFL is the toy table's first stage; the table asks it to raise the
caption-match of 20-step samples. This trains the stage from the bootstrapped
base model once per seed and variant (a variant: comma-separated `--set`
overrides on top of `--set`; the defaults always run as the first) on the toy
table's reward model (for `L_aes`), evaluates each result on the held-out toy
captions as the table does (at its sample seeds, `--sample-seeds`), and prints per variant: caption-match at 20 and
4 steps, extra objects (regions beyond the caption's objects), the oracle
dimensions and the Fréchet distance at 20 steps (mean ± std over seeds), the
caption-match change over the base model paired by seed (each seed's too),
the PeFL loss over the first and last 50 steps of training, and over the
whole run the weighted perceptual term against the rest of the loss (`L_aes`
and any regulariser). Outputs go to `--out` (default runs/pefl_settings); a
model already trained there is not trained again, nor an evaluation (the base
model's too) at the same sample seeds repeated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from toy_table import (
    bind_to_bootstrap,
    build_data,
    evaluate,
    evaluation_overrides,
    mean_std,
    mean_std_text,
    run_variants,
    sample_seeds_argument,
    toy_arguments,
    variant_dir,
    with_seed,
)
from unifl.config import DIMENSIONS

DEFAULTS = "defaults"
LOSS_WINDOW = 50  # steps at each end of a run over which the PeFL loss is averaged


def run_one(configs, boot, reward: Path, out: Path, seed: int, variant: str | None) -> dict:
    """Evaluate the base model (`variant` None) or train PeFL at one variant and evaluate it;
    `configs` maps each variant to its configuration."""
    from unifl.feedback.stages import run_pefl
    from unifl.models.precision import apply_num_threads

    params = configs[variant]
    apply_num_threads(params.project)  # also in a worker process of --jobs
    seeded = with_seed(params, seed)
    run_dir = out / f"seed-{seed}"
    if variant is None:
        return finished_evaluation(run_dir / "eval-base", seeded.evaluate.seeds) or evaluate(
            seeded, boot, reward, boot.base_model_dir, run_dir / "eval-base"
        )
    name = variant_dir(variant)
    model_dir = run_dir / name / "model"
    if not (model_dir / "model_index.json").is_file():
        run_pefl(
            seeded,
            boot.base_model_dir,
            boot.train_data_dir,
            run_dir / name,
            reward=reward,
            segmenter=boot.segmenter_dir,
            progress=False,
        )
    summary = finished_evaluation(run_dir / f"eval-{name}", seeded.evaluate.seeds) or evaluate(
        seeded, boot, reward, model_dir, run_dir / f"eval-{name}"
    )
    return summary | loss_terms(run_dir / name / "history.csv", seeded.pefl.perceptual_weight)


def finished_evaluation(out: Path, sample_seeds: list[int]) -> dict[str, float] | None:
    """The summary of the evaluation in `out` when it sampled at `sample_seeds`, else None."""
    record = out / "evaluation.json"
    if not record.is_file() or json.loads(record.read_text())["settings"]["seeds"] != sample_seeds:
        return None
    return json.loads((out / "metrics.json").read_text())


def loss_terms(history: Path, perceptual_weight: float) -> dict[str, float]:
    """From a run's history: the PeFL loss averaged over its first and last LOSS_WINDOW steps,
    and over the whole run the weighted perceptual term and the rest of the training loss
    (`L_aes` and any regulariser)."""
    import pandas as pd

    rows = pd.read_csv(history).sort_values("step")
    perceptual = perceptual_weight * float(rows["pefl"].mean())
    return {
        "pefl_first": float(rows.head(LOSS_WINDOW)["pefl"].mean()),
        "pefl_last": float(rows.tail(LOSS_WINDOW)["pefl"].mean()),
        "perceptual_term": perceptual,
        "other_terms": float(rows["loss"].mean()) - perceptual,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        help="comma-separated stage.key=value overrides trained beside the defaults",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/pefl_settings"))
    parser.add_argument("--data", type=Path, default=Path("runs/toy_table"))
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each")
    sample_seeds_argument(parser)
    args = parser.parse_args(argv)

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world

    overrides = evaluation_overrides(args)
    params = load_params(args.params, preset=args.preset, overrides=overrides)
    # Each variant's configuration, loaded before any training so that a bad override fails
    # first; every variant shares the defaults' bootstrap and data.
    configs = {None: params, DEFAULTS: params} | {
        v: load_params(args.params, preset=args.preset, overrides=overrides + v.split(","))
        for v in args.variants
    }
    apply_num_threads(params.project)
    boot = bootstrap_toy_world(params)
    bind_to_bootstrap(args.out, boot)
    reward = build_data(params, boot, args.data)["reward"]
    variants: list[str | None] = [None, DEFAULTS, *args.variants]
    common = (configs, boot, reward, args.out)
    results = run_variants(run_one, common, args.seeds, variants, args.jobs, base_once=True)

    def cell(variant: str | None, key: str, digits: int = 3) -> str:
        return mean_std_text([run[key] for run in results[variant]], digits)

    print(
        f"PeFL from the base model: {len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), "
        f"{params.pefl.steps} steps, evaluated at sample seeds "
        f"{' '.join(map(str, params.evaluate.seeds))}; variants on top of the defaults"
    )
    columns = ["caption_match_20steps", "caption_match_4steps", "extra_objects_20steps"]
    columns += [f"oracle_{d}_20steps" for d in DIMENSIONS] + ["frechet_20steps"]
    print(
        "| model | "
        + " | ".join(c.replace("_20steps", "").replace("_4", " 4") for c in columns)
        + " | caption-match change (20 steps), per seed | PeFL loss first / last 50 steps"
        + " | weighted PeFL term / other loss terms, mean over training |"
    )
    print("|" + "---|" * (len(columns) + 4))
    for variant in variants:
        name = "base" if variant is None else f"+PeFL, {variant}"
        cells = [cell(variant, c, 4 if c.startswith("oracle") else 3) for c in columns]
        change = trend = terms = ""
        if variant is not None:
            diffs = [
                run["caption_match_20steps"] - base["caption_match_20steps"]
                for base, run in zip(results[None], results[variant], strict=True)
            ]
            mean, std = mean_std(diffs)
            change = f"{mean:+.3f} ± {std:.3f} ({' / '.join(f'{d:+.3f}' for d in diffs)})"
            trend = f"{cell(variant, 'pefl_first')} / {cell(variant, 'pefl_last')}"
            terms = f"{cell(variant, 'perceptual_term')} / {cell(variant, 'other_terms')}"
        print(f"| {name} | " + " | ".join(cells) + f" | {change} | {trend} | {terms} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
