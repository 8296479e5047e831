"""Decoupled FL by the dimensions it trains: which of them move the samples away from the real images.

    python benchmarks/decoupled_drift.py --start runs/toy_table --jobs 3
    python benchmarks/decoupled_drift.py --start runs/toy_table --groups detail color+lighting

The toy table's decoupled FL raises the four oracle dimensions and, with
them, the 20-step samples' Fréchet distance to the real held-out images. For
each seed this trains decoupled FL again from that toy table's PeFL model
(the table's own starting point, on the table's reward model and prompts)
once per group of dimensions, with weight 1 on the group's dimensions and 0
on the others (everything else from params.yaml), and evaluates the PeFL
model and each result at 20 steps on the held-out toy captions. It prints the
real held-out images' oracle means beside the models' (the layout oracle
reads the toy segmenter's masks, for real and generated images alike), each
group's oracle and reward changes over the PeFL model (mean ± std over
seeds) and its Fréchet distance against the PeFL model's. A dimension whose
oracle the preferences push past the real images' level moves the samples
away from them however well the stage works.
Outputs go to `--out` (default runs/decoupled_drift).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toy_table import (
    bind_to_bootstrap,
    evaluate,
    mean_std,
    mean_std_text,
    run_variants,
    toy_arguments,
    with_seed,
)
from unifl.config import DIMENSIONS

HINGE_WINDOW = 100  # first steps of the table's decoupled runs whose rewards are set against alpha


def pefl_model(table: Path, seed: int) -> Path:
    """The PeFL model that a toy table's run of `seed` wrote."""
    return table / f"seed-{seed}" / "pefl" / "model"


def run_one(params, boot, table: Path, out: Path, seed: int, group: str | None) -> dict:
    """Evaluate the table's PeFL model (`group` None) or train decoupled FL on `group`'s
    dimensions ("color+lighting") from it and evaluate the result."""
    from unifl.data.prompts import read_prompts
    from unifl.feedback.stages import run_decoupled
    from unifl.models.precision import apply_num_threads

    apply_num_threads(params.project)  # also in a worker process of --jobs
    seeded = with_seed(params, seed)
    run_dir = out / f"seed-{seed}"
    reward = table / "data" / "reward" / "model"
    if group is None:
        return evaluate(seeded, boot, reward, pefl_model(table, seed), run_dir / "eval-pefl")
    dimensions = group.split("+")
    seeded.decoupled.weights = {d: (1.0 if d in dimensions else 0.0) for d in DIMENSIONS}
    prompts = list(read_prompts(table / "data" / "prompts")["prompt"])
    result = run_decoupled(
        seeded,
        pefl_model(table, seed),
        prompts,
        reward,
        run_dir / f"decoupled-{group}",
        data=boot.train_data_dir,
        progress=False,
    )
    return evaluate(seeded, boot, reward, result.model_dir, run_dir / f"eval-{group}")


def real_metrics(boot) -> dict[str, float]:
    """The evaluation's per-image toy metrics of the real held-out images, averaged (the layout
    oracle on the segmenter's masks, as for generated images), and their single-object share."""
    from unifl.evaluation.evaluate import CAPTION_OBJECTS, image_metrics
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.dataset import images_to_tensor, load_toy_arrays

    arrays = load_toy_arrays(boot.eval_data_dir)
    metrics = image_metrics(
        images_to_tensor(arrays.images),
        arrays.captions,
        segmenter=ToySegmenter.load(boot.segmenter_dir),
    )
    summary = {f"oracle_{d}_20steps": float(metrics[f"oracle_{d}"].mean()) for d in DIMENSIONS}
    summary["single_object"] = float((metrics[CAPTION_OBJECTS] == 1).float().mean())
    return summary


def single_object_share(prompts: list[str]) -> float:
    """The share of toy prompts that name one object."""
    from unifl.toy.world import parse_caption

    return sum(len(parse_caption(p).objects) == 1 for p in prompts) / len(prompts)


def hinge_lines(table: Path, seeds: list[int]) -> list[str]:
    """Per seed, the range over gradient steps t of the mean reward of the x0 predictions that
    the table's decoupled run scored in its first HINGE_WINDOW steps, beside alpha_d."""
    import json

    import pandas as pd

    config = json.loads((table / "data" / "reward" / "model" / "reward_config.json").read_text())
    lines = []
    for seed in seeds:
        history = table / f"seed-{seed}" / "decoupled" / "history.csv"
        rows = pd.read_csv(history).sort_values("step").head(HINGE_WINDOW)
        by_step = rows.groupby("t")[[f"reward_{d}" for d in DIMENSIONS]].mean()
        cells = ", ".join(
            f"{d} {by_step[f'reward_{d}'].min():.2f} to {by_step[f'reward_{d}'].max():.2f} "
            f"(alpha {config['alphas'][d]:.2f})"
            for d in DIMENSIONS
        )
        lines.append(f"  seed {seed}: {cells}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument(
        "--groups",
        nargs="*",
        default=["+".join(DIMENSIONS), "color+lighting", "layout+detail"],
        help="dimension groups trained one at a time, dimensions joined by '+'",
    )
    parser.add_argument(
        "--start", type=Path, required=True, help="a finished toy table's output directory"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/decoupled_drift"))
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each")
    args = parser.parse_args(argv)
    for group in args.groups:
        unknown = sorted(set(group.split("+")) - set(DIMENSIONS))
        if unknown:
            parser.error(f"--groups {group}: unknown dimensions {unknown}; known: {DIMENSIONS}")
    missing = [
        str(path)
        for path in (
            *(pefl_model(args.start, s) for s in args.seeds),
            args.start / "data" / "reward" / "model",
            args.start / "data" / "prompts",
            *(args.start / f"seed-{s}" / "decoupled" / "history.csv" for s in args.seeds),
        )
        if not path.exists()
    ]
    if missing:
        parser.error(f"--start {args.start}: missing {', '.join(missing)}")

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    params.evaluate.steps = [20]
    apply_num_threads(params.project)
    boot = bootstrap_toy_world(params)
    bind_to_bootstrap(args.start, boot)
    bind_to_bootstrap(args.out, boot)
    variants: list[str | None] = [None, *args.groups]
    common = (params, boot, args.start, args.out)
    results = run_variants(run_one, common, args.seeds, variants, args.jobs, base_once=False)
    real = real_metrics(boot)
    from unifl.data.prompts import read_prompts

    prompts = list(read_prompts(args.start / "data" / "prompts")["prompt"])

    oracle_keys = [f"oracle_{d}_20steps" for d in DIMENSIONS]
    print(
        f"decoupled FL by trained dimensions: {len(args.seeds)} seeds "
        f"({' '.join(map(str, args.seeds))}), {params.decoupled.steps} steps from the PeFL "
        f"models of {args.start}; 20-step samples of the held-out captions"
    )
    header = "".join(f"{'oracle ' + d:>18}" for d in DIMENSIONS)
    print(f"{'images':<40}{header}{'frechet':>18}")
    print(f"{'real held-out images':<40}" + "".join(f"{real[k]:>18.4f}" for k in oracle_keys))

    def cell(variant: str | None, key: str) -> str:
        return mean_std_text([run[key] for run in results[variant]], digits=4)

    for variant in variants:
        name = "PeFL model" if variant is None else f"+decoupled {variant}"
        keys = [*oracle_keys, "frechet_20steps"]
        print(f"{name:<40}" + "".join(f"{cell(variant, k):>18}" for k in keys))
    print(
        f"the table's decoupled FL on its training prompts, first {HINGE_WINDOW} steps: mean "
        "reward of the scored x0 predictions by gradient step t, lowest to highest"
    )
    print("\n".join(hinge_lines(args.start, args.seeds)))
    print(
        f"prompts naming one object: training prompts {single_object_share(prompts):.1%}, "
        f"held-out captions {real['single_object']:.1%}"
    )
    before = mean_std([r["frechet_20steps"] for r in results[None]])[0]
    if args.groups:
        print("change over the PeFL model, paired by seed (mean ± std):")
    for variant in args.groups:

        def change(key: str, variant: str = variant) -> str:
            diffs = [b[key] - a[key] for a, b in zip(results[None], results[variant], strict=True)]
            mean, std = mean_std(diffs)
            return f"{key.removesuffix('_20steps')} {mean:+.4f} ± {std:.4f}"

        after = mean_std([r["frechet_20steps"] for r in results[variant]])[0]
        rewards = ", ".join(change(f"reward_{d}_20steps") for d in variant.split("+"))
        print(
            f"  {variant}: "
            + ", ".join(change(k) for k in oracle_keys)
            + f"; {rewards}; frechet {before:.3f} -> {after:.3f} ({(after / before - 1) * 100:+.1f}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
