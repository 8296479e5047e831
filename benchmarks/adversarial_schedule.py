"""Adversarial FL on the 20-step schedule against the few-step sampler's own, from the base model.

    python benchmarks/adversarial_schedule.py                 # seeds 0 1, schedules 20 and 4
    python benchmarks/adversarial_schedule.py --jobs 2        # two runs at a time (one per core)
    python benchmarks/adversarial_schedule.py --schedules 20 8 4 --seeds 0 1 2
    python benchmarks/adversarial_schedule.py --schedules 4 --seeds 0 1 2 --start runs/toy_table

The adversarial stage denoises without gradients down to its gradient step on
a schedule of `adversarial.schedule_steps` DDIM steps. The paper draws the
steps from the 20-step schedule; this package's default is the 4-step
trailing schedule that few-step inference uses, so that the generator and
the discriminator see the states that 4-step sampling passes through.

For each seed this trains the adversarial stage from the bootstrapped base
model once per schedule (everything else from params.yaml, on the toy
table's reward model) and evaluates the base model and each result on the
held-out toy captions. It prints, at 4 and at 20 steps, caption-match,
Fréchet distance and extra objects (mean ± std over seeds), and the share of
the base model's 4-vs-20-step gap that each schedule closes (the toy table's
criterion), on the mean and per seed; the oracle color and lighting (what the
stage keeps of decoupled FL's gains); the UNet's median gradient norm and how
often it was clipped; the training's seconds; and, over the first and the last
100 steps, the generator's L_G, its L_aes (times decoupled.grad_scale) and the
color reward of its x0 predictions.
With `--start` the stage starts from the decoupled model of a finished toy
table's run of the same seed, as the table's adversarial stage does, so a
setting can be tried on the table's own starting point without training
PeFL and decoupled FL again; the gap is still the base model's.
Outputs go to `--out` (default runs/adversarial_schedule).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toy_table import (
    bind_to_bootstrap,
    build_data,
    evaluate,
    gap_closed,
    mean_std_text,
    run_variants,
    shares_per_seed,
    toy_arguments,
    with_seed,
)

METRICS = ("caption_match", "frechet", "extra_objects")
ORACLES = (
    "oracle_color",
    "oracle_lighting",
)  # printed beside them: what the stage keeps of decoupled FL
TREND_WINDOW = 100  # steps at each end of a run over which the history's columns are averaged
LOSS_TERMS = ("g_loss", "aes", "reward_color")  # L_G, L_aes (times grad_scale), the color reward


def run_one(
    params, boot, reward: Path, out: Path, start: Path | None, seed: int, schedule: int | None
) -> dict:
    """Evaluate the base model (`schedule` None) or train and evaluate one schedule, from the
    base model or, with `start`, from that toy table's decoupled model of the same seed."""
    from unifl.feedback.stages import run_adversarial
    from unifl.models.precision import apply_num_threads

    apply_num_threads(params.project)  # also in a worker process of --jobs
    seeded = with_seed(params, seed)
    run_dir = out / f"seed-{seed}"
    if schedule is None:
        return evaluate(seeded, boot, reward, boot.base_model_dir, run_dir / "eval-base")
    seeded.adversarial.schedule_steps = schedule
    stage_dir = run_dir / f"adversarial-{schedule}"
    model = boot.base_model_dir if start is None else decoupled_model(start, seed)
    result = run_adversarial(seeded, model, boot.train_data_dir, reward, stage_dir, progress=False)
    summary = evaluate(seeded, boot, reward, result.model_dir, run_dir / f"eval-{schedule}")
    return summary | history_figures(stage_dir / "history.csv", params.trainer.max_grad_norm)


def decoupled_model(table: Path, seed: int) -> Path:
    """The decoupled model that a toy table's run of `seed` wrote."""
    return table / f"seed-{seed}" / "decoupled" / "model"


def history_figures(history: Path, max_grad_norm: float) -> dict[str, float]:
    """From a run's history: the discriminator's mean logit on generated images over the first
    and the last TREND_WINDOW steps, and its accuracy over the last (whether it runs away from
    the generator); the generator's loss terms and color reward (LOSS_TERMS) over the first and
    the last TREND_WINDOW steps; the UNet's median gradient norm and the share of steps clipped to
    `max_grad_norm`; and the seconds its steps took, summed, which a run resumed at its end
    keeps (its metrics.json then times the resumed run)."""
    import pandas as pd

    rows = pd.read_csv(history).sort_values("step")
    first, last = rows.head(TREND_WINDOW), rows.tail(TREND_WINDOW)
    terms = {  # nan where the run logged no such column (no L_aes)
        f"{term}_{end}": float(window[term].mean()) if term in rows else float("nan")
        for term in LOSS_TERMS
        for end, window in (("first", first), ("last", last))
    }
    return terms | {
        "d_fake_first": float(first["d_fake"].mean()),
        "d_fake_last": float(last["d_fake"].mean()),
        "d_accuracy_last": float(last["d_accuracy"].mean()),
        "unet_grad_norm": float(rows["grad_norm_unet"].median()),
        "unet_clipped": float((rows["grad_norm_unet"] > max_grad_norm).mean()),
        "train_seconds": float(rows["seconds"].sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0, 1])
    parser.add_argument("--schedules", type=int, nargs="+", default=[20, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/adversarial_schedule"))
    parser.add_argument("--data", type=Path, default=Path("runs/toy_table"))
    parser.add_argument(
        "--start",
        type=Path,
        default=None,
        help="a toy table's output: start each seed from its decoupled model, as the table does",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each")
    args = parser.parse_args(argv)
    if args.start is not None:
        models = (decoupled_model(args.start, s) for s in args.seeds)
        missing = [str(m) for m in models if not (m / "model_index.json").is_file()]
        if missing:
            parser.error(f"--start {args.start}: no decoupled model at {', '.join(missing)}")

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    boot = bootstrap_toy_world(params)
    for directory in (args.out, args.start):
        if directory is not None:
            bind_to_bootstrap(directory, boot)
    reward = build_data(params, boot, args.data)["reward"]
    variants: list[int | None] = [None, *args.schedules]
    common = (params, boot, reward, args.out, args.start)
    results = run_variants(run_one, common, args.seeds, variants, args.jobs, base_once=True)

    def cell(variant: int | None, key: str) -> str:
        return mean_std_text([run[key] for run in results[variant]])

    print(
        f"adversarial FL by training schedule: {len(args.seeds)} seeds "
        f"({' '.join(map(str, args.seeds))}), {params.adversarial.steps} steps, "
        f"discriminator lr {params.adversarial.discriminator_learning_rate:g}, "
        f"from {'the base model' if args.start is None else f'the decoupled models of {args.start}'}"
    )
    header = "".join(f"{f'{m} {n}':>20}" for m in METRICS for n in (4, 20))
    print(f"{'model':<30}{header}{'gap closed (4 steps)':>52}")
    for variant in variants:
        name = "base" if variant is None else f"+adversarial, {variant}-step schedule"
        cells = "".join(f"{cell(variant, f'{m}_{n}steps'):>20}" for m in METRICS for n in (4, 20))
        closed = ""
        if variant is not None:
            shares = (
                f"{metric} {gap_closed(results[None], results[variant], metric)[3] * 100:+.0f}%"
                for metric in METRICS
            )
            closed = "  " + ", ".join(shares)
        print(f"{name:<30}{cells}{closed:>52}")
        if variant is not None:
            per_seed = (
                f"{metric} {shares_per_seed(results[None], results[variant], metric)}"
                for metric in METRICS
            )
            print(f"{'':<30}gap closed per seed: " + ", ".join(per_seed))
        oracles = (f"{m} {cell(variant, f'{m}_{n}steps')} ({n})" for m in ORACLES for n in (4, 20))
        print(f"{'':<30}" + ", ".join(oracles))
    for variant in args.schedules:
        first, last, accuracy = (
            cell(variant, key) for key in ("d_fake_first", "d_fake_last", "d_accuracy_last")
        )
        print(
            f"{variant}-step schedule: discriminator logit on generated images, first "
            f"{TREND_WINDOW} steps {first}, last {TREND_WINDOW} {last}; accuracy over the last "
            f"{TREND_WINDOW} {accuracy}; UNet gradient norm (median) "
            f"{cell(variant, 'unet_grad_norm')}, clipped on {cell(variant, 'unet_clipped')} of the "
            f"steps; training {cell(variant, 'train_seconds')} s"
        )
        terms = (
            f"{term} {cell(variant, f'{term}_first')} -> {cell(variant, f'{term}_last')}"
            for term in LOSS_TERMS
        )
        print(f"{'':<30}first -> last {TREND_WINDOW} steps: " + ", ".join(terms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
