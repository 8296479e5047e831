"""The 4-vs-20-step gap at each classifier-free guidance scale, before and after adversarial FL.

    python benchmarks/few_step_guidance.py                    # toy table's adversarial models
    python benchmarks/few_step_guidance.py --jobs 2 --scales 1.5 3 7.5
    python benchmarks/few_step_guidance.py --models runs/exp/seed-0/adversarial/model

The toy table samples 4 and 20 steps at one guidance scale (`evaluate.guidance_scale`,
7.5). Trailing DDIM in 4 steps extrapolates the guided noise prediction over
steps of 250 timesteps, so the scale changes 4-step samples far more than
20-step ones. This evaluates the bootstrapped base model at 4 and 20 steps,
and each tuned model (default: `runs/toy_table/seed-*/adversarial/model`) at
4 steps, at every scale on the held-out toy captions. It prints caption-match,
Fréchet distance and extra objects per scale, and the share of the base
model's 4-vs-20-step gap at that scale that the tuned models' 4 steps close
(the toy table's criterion, which the table applies at
`evaluate.guidance_scale` only). At `evaluate.guidance_scale` it also splits
the samples by their caption's background (dark, bright, gray, striped,
noisy): caption-match, the share of samples in which no caption object is
found, extra objects and the lighting oracle of each, for the base model at 20
and 4 steps and the tuned models at 4 (pooled over models).
Outputs go to `--out` (default runs/few_step_guidance).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from toy_table import bind_to_bootstrap, build_data, evaluate, gap_closed, mean_std, run_jobs

METRICS = ("caption_match", "frechet", "extra_objects")
BACKGROUND_MEANS = ("extra_objects", "oracle_lighting")  # beside caption-match, per background


def by_background(evaluations: dict[str, list[Path]], steps: dict[str, int]) -> str:
    """Per caption background, each row's samples (its evaluations' `per_sample.parquet` at
    `steps[row]` steps, pooled): how many, caption-match, the share with no caption object
    found, extra objects and oracle lighting, as a text table."""
    import pandas as pd

    from unifl.toy.world import parse_caption

    header = f"{'background':<12}{'samples':<16}{'n':>6}{'caption_match':>15}{'none found':>12}"
    header += "".join(f"{column:>17}" for column in BACKGROUND_MEANS)
    frames = {}
    for row, directories in evaluations.items():
        samples = pd.concat([pd.read_parquet(d / "per_sample.parquet") for d in directories])
        samples = samples[samples["steps"] == steps[row]]
        frames[row] = samples.assign(
            background=[parse_caption(prompt).background for prompt in samples["prompt"]]
        )
    lines = [header]
    for background in sorted(set().union(*(set(f["background"]) for f in frames.values()))):
        for row, samples in frames.items():
            part = samples[samples["background"] == background]
            cells = f"{len(part):>6}{part['caption_match'].mean():>15.3f}"
            cells += f"{(part['caption_match'] == 0).mean():>12.3f}"
            cells += "".join(f"{part[column].mean():>17.3f}" for column in BACKGROUND_MEANS)
            lines.append(f"{background:<12}{row:<16}{cells}")
    return "\n".join(lines)


def run_one(params, boot, reward: Path, model_dir: Path | None, scale: float, out: Path) -> dict:
    """Evaluate the base model (`model_dir` None, at 4 and 20 steps) or a tuned one (4 steps)."""
    from unifl.models.precision import apply_num_threads

    apply_num_threads(params.project)  # also in a worker process of --jobs
    scaled = params.model_copy(deep=True)
    scaled.evaluate.guidance_scale = scale
    scaled.evaluate.steps = [4, 20] if model_dir is None else [4]
    return evaluate(scaled, boot, reward, model_dir or boot.base_model_dir, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 3.0, 5.0, 7.5])
    parser.add_argument("--models", type=Path, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/few_step_guidance"))
    parser.add_argument("--data", type=Path, default=Path("runs/toy_table"))
    parser.add_argument("--jobs", type=int, default=1, help="evaluations side by side")
    args = parser.parse_args(argv)

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    models = args.models or sorted(args.data.glob("seed-*/adversarial/model"))
    if not models:
        parser.error(
            f"no tuned models under {args.data}/seed-*/adversarial/model: run toy_table.py"
        )
    missing = [str(m) for m in models if not m.is_dir()]
    if missing:
        parser.error(f"not a model directory: {', '.join(missing)}")
    boot = bootstrap_toy_world(params)
    bind_to_bootstrap(args.out, boot)
    reward = build_data(params, boot, args.data)["reward"]
    scales = sorted(set(args.scales) | {params.evaluate.guidance_scale})
    variants: list[Path | None] = [None, *models]
    jobs = [
        (params, boot, reward, v, s, args.out / f"cfg-{s:g}" / ("base" if v is None else str(i)))
        for s in scales
        for i, v in enumerate(variants)
    ]
    summaries = run_jobs(run_one, jobs, args.jobs)
    results: dict[float, dict[str, list[dict]]] = {s: {"base": [], "tuned": []} for s in scales}
    for job, summary in zip(jobs, summaries, strict=True):
        results[job[4]]["base" if job[3] is None else "tuned"].append(summary)

    print(f"4-vs-20-step gap by guidance scale: base model and {len(models)} tuned models")
    for model in models:
        print(f"  tuned: {model}")
    header = f"{'scale':>6}{'base 20 steps':>16}{'base 4 steps':>16}{'tuned 4 steps':>18}{'gap closed':>12}"
    for metric in METRICS:
        print(f"\n{metric}\n{header}")
        for scale in scales:
            base, tuned = results[scale]["base"], results[scale]["tuned"]
            base_4, base_20, _, share = gap_closed(base, tuned, metric)
            mean, std = mean_std([run[f"{metric}_4steps"] for run in tuned])
            closed = "no gap" if math.isnan(share) else f"{share * 100:+.0f}%"
            print(
                f"{scale:>6g}{base_20:>16.3f}{base_4:>16.3f}"
                f"{f'{mean:.3f} ± {std:.3f}':>18}{closed:>12}"
            )
    scale = params.evaluate.guidance_scale
    runs = {job[5]: job[3] for job in jobs if job[4] == scale}
    base = [out for out, model in runs.items() if model is None]
    tuned = [out for out, model in runs.items() if model is not None]
    print(f"\nby caption background at guidance {scale:g}")
    print(
        by_background(
            {"base 20 steps": base, "base 4 steps": base, "tuned 4 steps": tuned},
            {"base 20 steps": 20, "base 4 steps": 4, "tuned 4 steps": 4},
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
