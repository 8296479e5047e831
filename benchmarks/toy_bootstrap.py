"""Bootstrap time, peak memory and sample quality of the toy world, against a random-init model.

    python benchmarks/toy_bootstrap.py                 # params.yaml defaults (targets: <= 8 min, <= 4 GiB)
    python benchmarks/toy_bootstrap.py --seeds 0 1 2   # three training seeds, one after the other
    python benchmarks/toy_bootstrap.py --preset ci     # the tiny test preset
    python benchmarks/toy_bootstrap.py --seeds 0 1 2 --cached   # measure the cached ones again
    python benchmarks/toy_bootstrap.py --seeds 0 1 2 --cached --sample-seeds 0 1 2 3 4
    python benchmarks/toy_bootstrap.py --seeds 0 1 2 --baseline bootstrap.vae_decoder_steps=0

Trains the bootstrap from scratch (`--force`) in a child process, into this
configuration's cache directory, which `make run` then reuses. The child's
wall time and the peak resident memory of it and the worker processes it
spawns (sampled every 0.2 s) are what this prints, then measures in the
same run the caption-match rate (the toy segmenter finds each captioned object
with its shape and colour) of 20-step samples of the trained base model, of a
randomly initialised model of the same preset (the baseline: near chance), and
of the real held-out toy images (the ceiling the segmenter allows) and of their
reconstructions by the trained VAE (the ceiling the VAE allows). Next to
each rate it prints its chance level: the same images scored against another
image's caption. With several `--seeds` (`project.seed`: the weights' and the
samples' seed) every seed is trained from scratch and the rates are printed
per seed and as mean ± std: the spread over seeds is the noise a single
figure carries. With `--set bootstrap.unet_ema_decay=D` it also prints the
weight average's caption-match against the last weights of the same
training (the bootstrap's own check, from its manifest), paired by seed.
Below the rates it sorts each image set's missed caption objects into wrong
shape and wrong colour (`unifl.toy.caption_match`). `--cached` measures
the bootstraps already in the cache instead of training them again. The
samples' seed moves one base model's caption-match by a few hundredths:
`--sample-seeds` also scores each trained base model on the samples of
several seeds and prints their mean per training seed and over them.
It also prints the toy CLIP's image-to-caption retrieval on the held-out
images against its random initialisation and chance (from the manifest).
`--baseline K=V` (repeatable) also measures, for every seed, the bootstrap
with those overrides on top (cached, or trained when missing; its times are not
printed) on the same captions and sample seeds, and prints each caption-match
row's change over it, paired by seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unifl.toy.caption_match import CaptionMatch


def run_bootstrap(
    out_dir: Path, params: str, preset: str | None, overrides: list[str]
) -> tuple[float, float]:
    """Run the bootstrap from scratch; its wall time and the peak resident memory of its processes."""
    command = [
        sys.executable,
        "-m",
        "unifl.cli",
        "toy",
        "bootstrap",
        "--force",
        "--out",
        str(out_dir),
    ]
    command += ["--params", params]
    if preset:
        command += ["--preset", preset]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.2)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return time.perf_counter() - started, peak / 2**30


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now (the bootstrap spawns workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def measure_rates(
    params, out: Path, sample_seeds: list[int] | None = None
) -> tuple[dict[str, tuple[float, float, CaptionMatch]], dict[int, float]]:
    """{image set: (caption-match with own captions, with another image's caption, the
    own-caption match with its misses by kind)}, and the trained base model's caption-match
    on the samples of each of `sample_seeds` (that of `project.seed` from the samples above)."""
    import torch

    from toy_table import caption_match_by_sample_seed
    from unifl.models.base import decode_latents, encode_images, load_base_model
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.bootstrap import sample_captions, untrained_model
    from unifl.toy.caption_match import caption_match
    from unifl.toy.dataset import load_toy_arrays

    segmenter = ToySegmenter.load(out / "segmenter")
    evaluation = load_toy_arrays(out / "data" / "eval")
    captions = evaluation.captions
    # Chance level of each image set: its caption-match against another image's caption
    # (captions rotated by one). Images that show their own caption's objects score far
    # above it; noise that the segmenter reads as scattered shapes scores the same on both.
    rotated = captions[1:] + captions[:1]

    def rates_of(images: torch.Tensor) -> tuple[float, float, CaptionMatch]:
        own = caption_match(segmenter, images, captions)
        return own.rate, caption_match(segmenter, images, rotated).rate, own

    real = evaluation.image_tensor()
    trained = load_base_model(out / "base")
    with torch.no_grad():
        reconstructed = decode_latents(trained, encode_images(trained, real))
    rates = {
        "real held-out images (ceiling)": rates_of(real),
        "trained VAE's reconstructions of them": rates_of(reconstructed),
    }
    models = {
        "trained base model": trained,
        "random-init model (baseline)": untrained_model(params, params.project.seed),
    }
    for name, model in models.items():
        with torch.no_grad():
            images = sample_captions(model, captions, params, progress=False)
        rates[f"{name}, {params.sampling.steps} steps"] = rates_of(images)
    own_seed = params.project.seed
    others = [seed for seed in sample_seeds or [] if seed != own_seed]
    by_seed = caption_match_by_sample_seed(trained, segmenter, captions, params, others, False)
    by_seed[own_seed] = rates[f"trained base model, {params.sampling.steps} steps"][0]
    return rates, {seed: by_seed[seed] for seed in sample_seeds or []}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="training seeds (default: project.seed)"
    )
    parser.add_argument(
        "--cached",
        action="store_true",
        help="measure the bootstraps already cached for these seeds (training only missing "
        "ones); wall time is then the manifest's total_s, peak memory the manifest's largest "
        "process",
    )
    parser.add_argument(
        "--sample-seeds",
        type=int,
        nargs="+",
        default=None,
        help="also score each trained base model on the samples of these seeds and average them",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="K=V",
        help="also measure the bootstraps with these overrides and print the change over them, "
        "paired by seed",
    )
    args = parser.parse_args(argv)

    import statistics

    from toy_table import mean_std_text
    from unifl.config import load_params
    from unifl.toy.bootstrap import bootstrap_toy_world, default_directory

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    seeds = args.seeds or [params.project.seed]
    runs = []
    by_sample_seed: dict[int, dict[int, float]] = {}
    for seed in seeds:
        overrides = [*args.overrides, f"project.seed={seed}"]
        seeded = load_params(args.params, preset=args.preset, overrides=overrides)
        # The fresh bootstrap replaces this configuration's cache entry, so `make run` reuses it.
        out = default_directory(seeded)
        if args.cached:
            out = bootstrap_toy_world(seeded).directory
            manifest = json.loads((out / "manifest.json").read_text())
            wall = manifest["timings"]["total_s"]
            peak_gib = max(manifest["peak_rss_gib"], manifest["peak_rss_child_gib"])
        else:
            wall, peak_gib = run_bootstrap(out, args.params, args.preset, overrides)
            manifest = json.loads((out / "manifest.json").read_text())
        rates, by_sample_seed[seed] = measure_rates(seeded, out, args.sample_seeds)
        runs.append((seed, wall, peak_gib, manifest, rates))
    baselines = {}
    for seed in seeds if args.baseline else []:
        overrides = [*args.overrides, *args.baseline, f"project.seed={seed}"]
        based = load_params(args.params, preset=args.preset, overrides=overrides)
        baselines[seed] = measure_rates(
            based, bootstrap_toy_world(based).directory, args.sample_seeds
        )

    how = "cached, times from the manifests" if args.cached else "from scratch"
    print(f"toy bootstrap {how} ({args.preset or args.params}), {os.cpu_count()} CPU cores")
    for seed, wall, peak_gib, manifest, _ in runs:
        processes = manifest["config"]["processes"]
        print(f"  seed {seed}")
        print(f"    wall time          {wall / 60:6.2f} min   (target <= 8 min)")
        whose = "its largest process" if args.cached else "all its processes"
        print(f"    peak memory        {peak_gib:6.2f} GiB   (target <= 4 GiB; {whose})")
        print(f"    processes          {processes:6d}       (training the UNet together)")
        for stage, seconds in manifest["timings"].items():
            print(f"      {stage:<16} {seconds:7.1f} s")
    captions = params.toy.num_eval
    print(f"caption-match on {captions} held-out captions (target: trained >= 0.50)")
    columns = "".join(f"{f'seed {seed}':>14}" for seed, *_ in runs)
    summary = f"{'mean ± std':>16}" if len(runs) > 1 else ""
    print(f"  {'':<42}{columns}{summary}   (chance: against another image's caption)")
    for name in runs[0][4]:
        values = [rates[name] for *_, rates in runs]
        cells = "".join(f"{rate:8.3f} ({chance:.3f})" for rate, chance, _ in values)
        if len(runs) > 1:
            own = [rate for rate, _, _ in values]
            cells += f"  {statistics.fmean(own):.3f} ± {statistics.stdev(own):.3f}"
        print(f"  {name:<42}{cells}")
    print(
        "  missed caption objects: wrong shape (their colour there as another shape) / "
        "wrong colour (their shape there in another colour), as shares of all objects"
    )
    for name in runs[0][4]:
        matches = [rates[name][2] for *_, rates in runs]
        cells = "".join(
            f"{match.wrong_shape / match.total:8.3f} / {match.wrong_colour / match.total:.3f}"
            for match in matches
        )
        print(f"  {name:<42}{cells}")
    if args.sample_seeds:
        print(
            f"trained base model, {params.sampling.steps} steps, on the samples of seeds "
            f"{' '.join(map(str, args.sample_seeds))}: caption-match per sample seed and mean"
        )
        means = []
        for seed, rates in by_sample_seed.items():
            means.append(statistics.fmean(rates.values()))
            cells = " / ".join(f"{rate:.3f}" for rate in rates.values())
            print(f"  {f'seed {seed}':<10}{cells}   mean {means[-1]:.3f}")
        if len(means) > 1:
            print(
                f"  {'mean ± std over training seeds':<42}"
                f"{statistics.fmean(means):.3f} ± {statistics.stdev(means):.3f}"
            )
    if all("clip_eval_retrieval" in manifest["metrics"] for *_, manifest, _ in runs):
        print(
            f"toy CLIP (the reward backbone, {params.bootstrap.clip_steps} contrastive steps): "
            f"image-to-caption top-1 on the {captions} held-out images"
        )
        for name, key in (
            ("pretrained", "clip_eval_retrieval"),
            ("random init (baseline)", "clip_eval_retrieval_init"),
            ("chance", "clip_eval_retrieval_chance"),
        ):
            cells = "".join(f"{manifest['metrics'][key]:14.3f}" for *_, manifest, _ in runs)
            print(f"  {name:<42}{cells}")
    if baselines:
        print(
            f"caption-match change over the baseline ({', '.join(args.baseline)}), paired by seed"
        )

        def print_changes(name: str, changes: list[float]) -> None:
            cells = "".join(f"{change:+14.3f}" for change in changes)
            spread = f"  {mean_std_text(changes)}" if len(changes) > 1 else ""
            print(f"  {name:<42}{cells}{spread}")

        for name in runs[0][4]:
            print_changes(
                name, [rates[name][0] - baselines[seed][0][name][0] for seed, *_, rates in runs]
            )
        if args.sample_seeds:
            print_changes(
                "trained base model, mean of sample seeds",
                [
                    statistics.fmean(by_sample_seed[seed].values())
                    - statistics.fmean(baselines[seed][1].values())
                    for seed in seeds
                ],
            )
    last_key = "caption_match_base_20_steps_last_weights"
    checks = [manifest["metrics"] for *_, manifest, _ in runs]
    if all(last_key in check for check in checks):
        print(
            f"weight average (bootstrap.unet_ema_decay {params.bootstrap.unet_ema_decay}) against "
            "the last weights of the same training, caption-match in the bootstrap's own check:"
        )
        for name, key in (("last weights", last_key), ("average", "caption_match_base_20_steps")):
            values = [check[key] for check in checks]
            cells = "".join(f"{value:14.3f}" for value in values)
            if len(values) > 1:
                cells += f"  {statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
            print(f"  {name:<42}{cells}")
        gains = [check["caption_match_base_20_steps"] - check[last_key] for check in checks]
        spread = f" ± {statistics.stdev(gains):.3f}" if len(gains) > 1 else ""
        print(f"  {'average - last weights, paired':<42}{statistics.fmean(gains):+14.3f}{spread}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
