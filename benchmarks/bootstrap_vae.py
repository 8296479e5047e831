"""The toy base model trained on the latents of VAEs trained for different step counts,
and at other settings of its own training.

    python benchmarks/bootstrap_vae.py                            # bootstrap.vae_steps 600 and 1800
    python benchmarks/bootstrap_vae.py --vae-steps 600 1200 --seeds 0 1
    python benchmarks/bootstrap_vae.py --vae-steps 600 --variant bootstrap.text_encoder=scratch
    python benchmarks/bootstrap_vae.py --vae-steps 600 --variant bootstrap.text_encoder=scratch --sample-seeds 0 1 2 3 4

A VAE trained longer reconstructs the toy images better, and PeFL needs the
perceptual model to read the decoded images; but the UNet then has other
latents to learn in the same budget. For each `bootstrap.vae_steps` given,
the bootstrap of that setting (trained when it is not cached) supplies its
VAE and segmenter; at each seed a UNet and text encoder start from the toy
preset's initialisation of that seed and train on that VAE's latents with
the bootstrap's own recipe (`unifl.toy.bootstrap.train_base_model`, on the
bootstrap's processes). With the seed of the bootstrap's `project.seed`
this is the bootstrap's own base model, bit for bit on one machine. Each
base model samples the held-out captions at `sampling.steps` (the samples'
seed is `project.seed` for every UNet seed), and prints:
per VAE, its reconstructions' caption-match and segmenter loss (the ceiling
it leaves the samples); per seed, the base model's caption-match, extra
objects and final UNet loss; and the caption-match change of every row over
the first, paired by seed. One UNet seed moves caption-match by up to 0.05, so
a single seed cannot tell two VAEs apart. A `--variant` (comma-separated
`--set` overrides) changes only the base model's own training (for example
`bootstrap.text_encoder`, `bootstrap.unet_learning_rate`): each VAE's
bootstrap stays the one of the configuration without it, and every variant
adds a row per VAE. The samples' seed moves caption-match by a few
hundredths as well: `--sample-seeds` scores every base model on the samples
of several seeds (each seed's rate kept in its metrics) and averages them.
Outputs go to `--out` (default runs/bootstrap_vae; under `--set` overrides,
a subdirectory named after them), and a base model already trained there
with the same configuration is read back (one trained with another, for
example before a default changed, is an error that names the settings that
differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from toy_table import (
    caption_match_by_sample_seed,
    mean_std_text,
    toy_arguments,
    variant_dir,
    with_seed,
)
from unifl.config import Params, load_params


def vae_floor(boot, held_out) -> dict[str, float]:
    """Caption-match and segmenter loss of the bootstrap VAE's reconstructions of `held_out`."""
    import torch

    from unifl.models.base import decode_latents, encode_images, load_base_model
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.caption_match import caption_match

    model = load_base_model(boot.base_model_dir)
    segmenter = ToySegmenter.load(boot.segmenter_dir)
    images = held_out.image_tensor()
    with torch.no_grad():
        reconstructions = decode_latents(model, encode_images(model, images))
        loss = float(segmenter.loss(reconstructions, held_out.semantic_tensor().long()))
    rate = caption_match(segmenter, reconstructions, held_out.captions).rate
    return {"caption_match": rate, "segmenter_loss": loss}


def config_difference(found: dict, wanted: dict) -> str:
    """The settings in which two bootstrap configurations differ, as 'section.key: found -> wanted'."""
    changes = []
    for section in sorted(set(found) | set(wanted)):
        a, b = found.get(section), wanted.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += [
                f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}"
                for key in sorted(set(a) | set(b))
                if a.get(key) != b.get(key)
            ]
        elif a != b:
            changes.append(f"{section}: {a!r} -> {b!r}")
    return "; ".join(changes) or "no configuration recorded"


def sample_seed_rates(
    params: Params,
    boot,
    held_out,
    out: Path,
    metrics: dict,
    sample_seeds: list[int],
    progress: bool,
) -> list[float]:
    """Caption-match of the base model in `out` at each sample seed (the samples' `project.seed`);
    the rates not yet in its metrics are measured and added there."""
    from unifl.io import write_json
    from unifl.models.base import load_base_model
    from unifl.models.segmenter import ToySegmenter

    rates = metrics.setdefault(
        "caption_match_by_sample_seed", {str(params.project.seed): metrics["caption_match"]}
    )
    missing = [seed for seed in sample_seeds if str(seed) not in rates]
    if missing:
        model = load_base_model(out / "base")
        segmenter = ToySegmenter.load(boot.segmenter_dir)
        found = caption_match_by_sample_seed(
            model, segmenter, held_out.captions, params, missing, progress
        )
        rates.update({str(seed): rate for seed, rate in found.items()})
        write_json(out / "metrics.json", metrics)
    return [rates[str(seed)] for seed in sample_seeds]


def train_base(
    params: Params, boot, train, held_out, seed: int, out: Path, progress: bool
) -> dict[str, float]:
    """A base model of `seed` on the bootstrap's VAE, trained on `train` and evaluated on
    `held_out` (toy arrays) in `out`, whose metrics record the configuration it was trained
    with: a run found there is read back only when that is this one."""
    from unifl.io import atomic_directory, write_json
    from unifl.models.base import load_base_model
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.bootstrap import (
        bootstrap_config,
        sample_captions,
        train_base_model,
        untrained_model,
    )
    from unifl.toy.caption_match import caption_match

    config = json.loads(json.dumps(bootstrap_config(with_seed(params, seed))))
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("config") != config:
            raise SystemExit(
                f"{out}: trained with another configuration than this run's "
                f"({config_difference(metrics.get('config') or {}, config)}); "
                "remove it or pass another --out"
            )
        return metrics

    started = time.perf_counter()
    with atomic_directory(out) as tmp:
        model = untrained_model(params, seed)
        model.vae = load_base_model(boot.base_model_dir).vae
        model, unet, _ = train_base_model(
            model, tmp / "base", train.image_tensor(), train.captions,
            with_seed(params, seed), boot.clip_dir, progress,
        )  # fmt: skip
        samples = sample_captions(model, held_out.captions, params, progress)
        match = caption_match(ToySegmenter.load(boot.segmenter_dir), samples, held_out.captions)
        metrics = {
            "caption_match": match.rate,
            "extra_objects": float(match.extra_objects.mean()),
            "unet_loss": unet["unet_loss"],
            "seconds": time.perf_counter() - started,
            "config": config,
        }
        write_json(tmp / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument("--vae-steps", type=int, nargs="+", default=[600, 1800])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="comma-separated overrides of the base model's own training, beside the defaults",
    )
    parser.add_argument(
        "--sample-seeds",
        type=int,
        nargs="+",
        default=None,
        help="score every base model on the samples of these seeds and average them "
        "(default: project.seed alone)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bootstrap_vae"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world
    from unifl.toy.dataset import load_toy_arrays

    def config(steps: int, variant: str | None) -> Params:
        extra = [] if variant is None else variant.split(",")
        overrides = [*args.overrides, f"bootstrap.vae_steps={steps}", *extra]
        return load_params(args.params, preset=args.preset, overrides=overrides)

    # Every configuration loads before any training, so that a bad override fails first.
    variants: list[str | None] = [None, *args.variant]
    configs = {(steps, v): config(steps, v) for steps in args.vae_steps for v in variants}
    # Runs under other --set overrides (for example other defaults) keep their own directory.
    root = args.out / variant_dir(",".join(args.overrides)) if args.overrides else args.out
    started = time.perf_counter()
    rows = []
    for steps in args.vae_steps:
        # The VAE's bootstrap is the one of the configuration without a variant.
        params = configs[steps, None]
        apply_num_threads(params.project)
        boot = bootstrap_toy_world(params, progress=not args.no_progress)
        train = load_toy_arrays(boot.train_data_dir)
        held_out = load_toy_arrays(boot.eval_data_dir)
        floor = vae_floor(boot, held_out)
        for variant in variants:
            name = f"vae-{steps}" + ("" if variant is None else f"_{variant_dir(variant)}")
            runs = [
                train_base(
                    configs[steps, variant], boot, train, held_out, seed,
                    root / name / f"seed-{seed}", progress=not args.no_progress,
                )
                for seed in args.seeds
            ]  # fmt: skip
            rates = [run["caption_match"] for run in runs]
            if args.sample_seeds:
                rates = [
                    statistics.fmean(sample_seed_rates(
                        configs[steps, variant], boot, held_out, root / name / f"seed-{seed}",
                        run, args.sample_seeds, progress=not args.no_progress,
                    ))
                    for seed, run in zip(args.seeds, runs, strict=True)
                ]  # fmt: skip
            label = steps if variant is None else f"{steps}, {variant}"
            rows.append((label, boot.directory, floor, runs, rates))

    seeds = " ".join(map(str, args.seeds))
    sampled = (
        f"the mean over sample seeds {' '.join(map(str, args.sample_seeds))}"
        if args.sample_seeds
        else f"sample seed {params.project.seed}"
    )
    print(
        f"base models on each VAE's latents: seeds {seeds}, {params.bootstrap.unet_steps} UNet "
        f"steps, {params.sampling.steps}-step samples of the held-out captions ({sampled}), "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(
        "| bootstrap.vae_steps[, variant] | reconstructions: caption-match | segmenter loss | base "
        "caption-match per seed | mean ± std | extra objects | final UNet loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for steps, _, floor, runs, rates in rows:
        print(
            f"| {steps} | {floor['caption_match']:.3f} | {floor['segmenter_loss']:.3f} | "
            + " / ".join(f"{rate:.3f}" for rate in rates)
            + f" | {mean_std_text(rates)} | "
            + mean_std_text([run["extra_objects"] for run in runs])
            + f" | {mean_std_text([run['unet_loss'] for run in runs], 4)} |"
        )
    first_steps, _, _, _, first = rows[0]
    for steps, directory, _, _, rates in rows[1:]:
        changes = [rate - base for rate, base in zip(rates, first, strict=True)]
        print(
            f"caption-match change, {steps} over {first_steps}, paired by seed: "
            f"{mean_std_text(changes)} ("
            + " / ".join(f"{change:+.3f}" for change in changes)
            + f"); bootstrap {directory}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
