"""The toy table: base -> +PeFL -> +decoupled FL -> +adversarial FL in the toy world.

Runs the same library functions as the pipeline, on the bootstrapped toy
world, once for the data (curated prompts, pairs, simulated labels, reward
model) and once per seed for the three UniFL stages, then evaluates every
model at 20 and at 4 steps on the held-out toy captions (at each of
`--sample-seeds`, default 0-4) and prints mean ± std
over seeds of: caption-match, extra objects (object regions beyond the
caption's, which caption-match does not count against an image), each oracle
dimension, held-out reward per dimension, Fréchet distance to real toy images
(toy segmenter features) and images per second. Below the table it checks the directions the paper
claims, against the spread over seeds, and says for each whether it holds.

    python benchmarks/toy_table.py                      # params.yaml, seeds 0 1 2
    python benchmarks/toy_table.py --preset ci --seeds 0 1   # a quick smoke run
    python benchmarks/toy_table.py --jobs 2             # two seeds at a time (one per core)
    python benchmarks/toy_table.py --data-only          # the data and reward model only

Before the stages it prints the labelled pairs per dimension (ties among them)
and the reward model's held-out accuracy per dimension.

Outputs go to `--out` (default runs/toy_table): the tables as Markdown and
JSON, `toy_table.png` (every metric by stage, a line per step count, mean ±
std over seeds), `stage_samples.png` (the first seed's models side by side on
the same captions and noise) and every stage's outputs and sample grids.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from unifl.config import DIMENSIONS, Params, load_params
from unifl.evaluation.charts import mean_std, save_stage_chart

MODELS = ("base", "+PeFL", "+decoupled", "+adversarial")
STEP_COUNTS = (20, 4)
# Sample seeds of every evaluation. A tuned model draws other samples from the same noise,
# so the caption-match change over the base model carries sampling noise beside the
# training seed's; at one sample seed it is as large as PeFL's change (see the README).
SAMPLE_SEEDS = [0, 1, 2, 3, 4]
LOWER_IS_BETTER = ("frechet", "extra_objects")


def metric_columns() -> list[str]:
    names = ["caption_match", "extra_objects", *(f"oracle_{d}" for d in DIMENSIONS)]
    names += [f"reward_{d}" for d in DIMENSIONS]
    return [*names, "frechet", "images_per_second"]


def with_seed(params: Params, seed: int) -> Params:
    copy = params.model_copy(deep=True)
    copy.project.seed = seed
    return copy


def caption_match_by_sample_seed(
    model, segmenter, captions: list[str], params: Params, seeds: list[int], progress: bool
) -> dict[int, float]:
    """Caption-match of `model`'s samples of `captions` at each sample seed (the samples'
    `project.seed`, everything else as `params` says)."""
    from unifl.toy.bootstrap import sample_captions
    from unifl.toy.caption_match import caption_match

    rates = {}
    for seed in seeds:
        samples = sample_captions(model, captions, with_seed(params, seed), progress)
        rates[seed] = caption_match(segmenter, samples, captions).rate
    return rates


def bind_to_bootstrap(out: Path, boot) -> None:
    """Record in `out` the bootstrap its runs stand on (`bootstrap.json`), and refuse an `out`
    that holds runs on another bootstrap or with no record of one: the benchmarks read
    finished runs back, and runs on two base models must not end up in one table."""
    stamp = out / "bootstrap.json"
    wanted = {"config_hash": boot.manifest["config_hash"], "directory": str(boot.directory)}
    if stamp.is_file():
        found = json.loads(stamp.read_text())
        if found.get("config_hash") != wanted["config_hash"]:
            raise SystemExit(
                f"{out} holds runs on the bootstrap {found.get('directory')}, not on this "
                f"configuration's {boot.directory}: remove it or pass another output directory"
            )
        return
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(
            f"{out} holds runs with no record of their bootstrap ({stamp.name}): remove it or "
            "pass another output directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")


def build_data(params: Params, boot, out: Path) -> dict[str, Path]:
    """Curated prompts, pairs from the base model, simulated labels and the reward model
    (read back when `out` holds them for this bootstrap)."""
    from unifl.data.pairs import run_pairs_stage
    from unifl.data.prompts import run_curate_stage
    from unifl.feedback.reward_training import train_reward_stage
    from unifl.labeling.pipeline import label_pairs

    base = boot.base_model_dir
    paths = {
        "prompts": out / "data" / "prompts",
        "pairs": out / "data" / "pairs",
        "labels": out / "data" / "labels",
        "reward": out / "data" / "reward",
    }
    bind_to_bootstrap(out, boot)
    if not (paths["reward"] / "metrics.json").is_file():
        run_curate_stage(params, [], base, paths["prompts"])
        run_pairs_stage(params, paths["prompts"], base, paths["pairs"])
        label_pairs(params, paths["pairs"], paths["labels"])
        train_reward_stage(
            params, paths["labels"] / "pairs.parquet", paths["pairs"], paths["reward"]
        )
    paths["reward"] = paths["reward"] / "model"
    return paths


def data_lines(out: Path) -> list[str]:
    """The labelled pairs per dimension (ties among them) and the reward model's held-out
    accuracy per dimension, as `build_data` left them in `out`."""
    from unifl.data.preferences import read_pairs

    pairs = read_pairs(out / "data" / "labels" / "pairs.parquet")
    reward = json.loads((out / "data" / "reward" / "metrics.json").read_text())
    counts = pairs.groupby("dimension")["tie"].agg(["size", "sum"])
    return [
        "labelled pairs per dimension (ties): "
        + ", ".join(f"{d} {counts.at[d, 'size']} ({counts.at[d, 'sum']})" for d in DIMENSIONS),
        "reward model, held-out accuracy: "
        + ", ".join(f"{d} {reward[f'val/accuracy/{d}']:.2f}" for d in DIMENSIONS),
    ]


def train_stages(params: Params, boot, data: dict[str, Path], out: Path) -> dict[str, Path]:
    """PeFL, then decoupled FL, then adversarial FL, each on the previous model."""
    from unifl.data.prompts import read_prompts
    from unifl.feedback.stages import run_adversarial, run_decoupled, run_pefl

    pefl = run_pefl(
        params,
        boot.base_model_dir,
        boot.train_data_dir,
        out / "pefl",
        reward=data["reward"],
        segmenter=boot.segmenter_dir,
    )
    prompts = list(read_prompts(data["prompts"])["prompt"])
    decoupled = run_decoupled(
        params,
        pefl.model_dir,
        prompts,
        data["reward"],
        out / "decoupled",
        data=boot.train_data_dir,  # real images, for the MSE regulariser (trainer.mse_weight)
    )
    adversarial = run_adversarial(
        params, decoupled.model_dir, boot.train_data_dir, data["reward"], out / "adversarial"
    )
    return {
        "base": boot.base_model_dir,
        "+PeFL": pefl.model_dir,
        "+decoupled": decoupled.model_dir,
        "+adversarial": adversarial.model_dir,
    }


def evaluate(params: Params, boot, reward: Path, model_dir: Path, out: Path) -> dict[str, float]:
    from unifl.evaluation.evaluate import run_evaluation

    result = run_evaluation(
        params,
        model_dir,
        boot.eval_data_dir,
        out,
        segmenter_dir=boot.segmenter_dir,
        reward_dir=reward,
        real_data_dir=boot.eval_data_dir,
        progress=False,
    )
    return {k: float(v) for k, v in result.summary.items() if isinstance(v, int | float)}


def run_seed(
    params: Params, boot, data: dict[str, Path], out: Path, seed: int, with_base: bool
) -> dict:
    """The three stages of one seed and their evaluations, with the base model's when
    `with_base` (it depends on no seed, so one run evaluates it for all):
    ({model: summary}, {model: model directory})."""
    from unifl.models.precision import apply_num_threads

    apply_num_threads(params.project)  # also in a worker process of --jobs
    seeded = with_seed(params, seed)
    run_dir = out / f"seed-{seed}"
    models = train_stages(seeded, boot, data, run_dir)
    summaries = {
        model: evaluate(
            seeded, boot, data["reward"], model_dir, run_dir / f"eval-{model.strip('+')}"
        )
        for model, model_dir in models.items()
        if with_base or model != "base"
    }
    return summaries, models


def save_stage_samples(params: Params, boot, models: dict[str, Path], path: Path) -> Path:
    """One grid of every stage's samples at each evaluated step count: the first
    `evaluate.grid_prompts` held-out captions at seed `evaluate.seeds[0]`, as the
    evaluation draws them."""
    from unifl.evaluation.evaluate import load_eval_prompts, sample_grids
    from unifl.evaluation.grids import save_comparison_grid
    from unifl.models.base import load_base_model

    config = params.evaluate
    prompts = load_eval_prompts(boot.eval_data_dir, limit=config.grid_prompts)["prompt"].tolist()
    loaded = {model: load_base_model(model_dir) for model, model_dir in models.items()}
    grids = sample_grids(loaded, prompts, config)
    rows = {
        f"{model}, {steps} steps": grids[steps][model] for steps in grids for model in grids[steps]
    }
    title = f"training seed {params.project.seed}, sample seed {config.seeds[0]}"
    return save_comparison_grid(rows, prompts, path, title=title)


def run_jobs(function, jobs: list[tuple], workers: int) -> list:
    """`function(*job)` for every job, in order; `workers` > 1 runs them in spawned processes."""
    if workers <= 1:
        return [function(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        return list(pool.map(function, *zip(*jobs, strict=True)))


def run_variants(
    function, common: tuple, seeds: list[int], variants: list, workers: int, *, base_once: bool
) -> dict:
    """`function(*common, seed, variant)` for every seed and variant: {variant: [summary per
    seed]}. With `base_once` the variant None, the base model that depends on no seed, runs
    for the first seed only and its summary serves every seed."""
    jobs = [
        (*common, seed, variant)
        for seed in seeds
        for variant in variants
        if not (base_once and variant is None and seed != seeds[0])
    ]
    results: dict = {variant: [] for variant in variants}
    for job, summary in zip(jobs, run_jobs(function, jobs, workers), strict=True):
        results[job[-1]].append(summary)
    if base_once and None in results:
        results[None] *= len(seeds)
    return results


def variant_dir(variant: str) -> str:
    """A directory name for a variant (comma-separated `K=V` overrides)."""
    return variant.replace("=", "-").replace(",", "_")


def mean_std_text(values: list[float], digits: int = 3) -> str:
    """'mean ± std' of `values`, each with `digits` decimals; a mean that rounds to zero
    prints without a sign (a float difference of two equal means is not -0.000)."""
    mean, std = (round(value, digits) + 0.0 for value in mean_std(values))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_markdown(results: dict[str, list[dict[str, float]]], steps: int) -> str:
    columns = metric_columns()
    lines = [
        f"| {steps} steps | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for model in MODELS:
        cells = []
        for column in columns:
            key = f"{column}_{steps}steps"
            cells.append(mean_std_text([run[key] for run in results[model] if key in run]))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_closed(
    base: list[dict[str, float]], tuned: list[dict[str, float]], metric: str
) -> tuple[float, float, float, float]:
    """(base 4 steps, base 20 steps, tuned 4 steps, share of the base model's 4-vs-20-step gap
    that the tuned model's 4 steps close), means over seeds; the share is NaN without a gap.
    The metrics of LOWER_IS_BETTER are better lower, every other metric higher."""
    better = -1.0 if metric in LOWER_IS_BETTER else 1.0
    base_4 = statistics.fmean(r[f"{metric}_4steps"] for r in base)
    base_20 = statistics.fmean(r[f"{metric}_20steps"] for r in base)
    tuned_4 = statistics.fmean(r[f"{metric}_4steps"] for r in tuned)
    gap = (base_20 - base_4) * better
    share = (tuned_4 - base_4) * better / gap if gap > 0 else math.nan
    return base_4, base_20, tuned_4, share


def shares_per_seed(
    base: list[dict[str, float]], tuned: list[dict[str, float]], metric: str
) -> str:
    """Each tuned run's share of the base model's gap in `metric`, as 'a% / b% / c%'."""
    return " / ".join(f"{gap_closed(base, [run], metric)[3] * 100:.0f}%" for run in tuned)


def direction_checks(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """The paper's directions, each judged against the spread over seeds (mean diff > its std)."""

    def diffs(model_a: str, model_b: str, key: str) -> list[float]:
        return [b[key] - a[key] for a, b in zip(results[model_a], results[model_b], strict=True)]

    def paired(model_a: str, model_b: str, key: str) -> tuple[float, float]:
        return mean_std(diffs(model_a, model_b, key))

    def verdict(ok: bool) -> str:
        return "holds" if ok else "does NOT hold"

    lines = []
    gains = diffs("base", "+PeFL", "caption_match_20steps")
    mean, std = mean_std(gains)
    lines.append(
        f"PeFL raises caption-match (20 steps): {mean:+.3f} ± {std:.3f} (per seed "
        + " / ".join(f"{gain:+.3f}" for gain in gains)
        + f") -> {verdict(mean > std)}"
    )
    for dimension in DIMENSIONS:
        key = f"oracle_{dimension}_20steps"
        mean, std = paired("+PeFL", "+decoupled", key)
        lines.append(
            f"decoupled FL raises oracle {dimension} (20 steps): {mean:+.4f} ± {std:.4f} "
            f"-> {verdict(mean > std)}"
        )
    before = statistics.fmean(r["frechet_20steps"] for r in results["+PeFL"])
    after = statistics.fmean(r["frechet_20steps"] for r in results["+decoupled"])
    lines.append(
        f"decoupled FL keeps Fréchet distance within +10%: {before:.3f} -> {after:.3f} "
        f"({(after / before - 1) * 100:+.1f}%) -> {verdict(after <= 1.1 * before)}"
    )
    for metric in ("frechet", "caption_match"):
        base_4, base_20, tuned_4, closed = gap_closed(
            results["base"], results["+adversarial"], metric
        )
        measured = (
            f"adversarial FL closes the 4-vs-20-step gap in {metric}: base 4 steps {base_4:.3f}, "
            f"base 20 steps {base_20:.3f}, tuned 4 steps {tuned_4:.3f}: "
        )
        if not math.isnan(closed):
            per_seed = shares_per_seed(results["base"], results["+adversarial"], metric)
            lines.append(
                f"{measured}{closed * 100:.0f}% of the gap (per seed {per_seed}) "
                f"-> {verdict(closed >= 0.5)}"
            )
        else:
            lines.append(f"{measured}no gap: the base model's 4 steps are not worse -> not judged")
    return lines


def toy_arguments(parser: argparse.ArgumentParser, seeds: list[int]) -> None:
    """The options every toy-world benchmark takes: configuration and training seeds."""
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)


def sample_seeds_argument(parser: argparse.ArgumentParser) -> None:
    """`--sample-seeds`: the evaluations' sample seeds (`evaluate.seeds`), default SAMPLE_SEEDS."""
    parser.add_argument(
        "--sample-seeds",
        type=int,
        nargs="+",
        default=SAMPLE_SEEDS,
        help="sample seeds of every evaluation (evaluate.seeds; a --set of it wins)",
    )


def evaluation_overrides(args: argparse.Namespace) -> list[str]:
    """`args.overrides` after the `evaluate.seeds` of `--sample-seeds`, so a --set wins."""
    return [f"evaluate.seeds=[{','.join(map(str, args.sample_seeds))}]", *args.overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_table"))
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds trained side by side, one process each"
    )
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="stop after the prompts, pairs, labels and reward model, and print their figures",
    )
    sample_seeds_argument(parser)
    args = parser.parse_args(argv)

    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world

    params = load_params(args.params, preset=args.preset, overrides=evaluation_overrides(args))
    apply_num_threads(params.project)
    started = time.perf_counter()
    boot = bootstrap_toy_world(params)
    data = build_data(params, boot, args.out)
    data_report = data_lines(args.out)
    print("\n".join(data_report), flush=True)
    if args.data_only:
        return 0
    results: dict[str, list[dict[str, float]]] = {model: [] for model in MODELS}
    jobs = [(params, boot, data, args.out, seed, seed == args.seeds[0]) for seed in args.seeds]
    per_seed = run_jobs(run_seed, jobs, args.jobs)
    for summaries, _ in per_seed:
        for model, summary in summaries.items():
            results[model].append(summary)
    results["base"] *= len(args.seeds)  # one evaluation, paired with every seed

    training_seeds = " ".join(map(str, args.seeds))
    sample_seeds = " ".join(map(str, params.evaluate.seeds))
    report = [
        f"toy table: {len(args.seeds)} seeds ({training_seeds}), "
        f"evaluated at sample seeds {sample_seeds}, "
        f"bootstrap {boot.directory}, {time.perf_counter() - started:.0f} s",
        "",
        *data_report,
        "",
        *(table_markdown(results, steps) + "\n" for steps in STEP_COUNTS),
        *direction_checks(results),
    ]
    text = "\n".join(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "toy_table.md").write_text(text + "\n")
    (args.out / "toy_table.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    metrics = ["caption_match", "extra_objects", "frechet", *(f"oracle_{d}" for d in DIMENSIONS)]
    metrics += [f"reward_{d}" for d in DIMENSIONS]
    chart = save_stage_chart(
        results, metrics, STEP_COUNTS, args.out / "toy_table.png",
        title=f"toy table, mean ± std over training seeds {training_seeds}, sample seeds {sample_seeds}",
        lower_is_better=LOWER_IS_BETTER,
    )  # fmt: skip
    grid = save_stage_samples(
        with_seed(params, args.seeds[0]), boot, per_seed[0][1], args.out / "stage_samples.png"
    )
    print(f"\nchart: {chart}\nsamples of every stage: {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
