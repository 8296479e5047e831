"""Bootstrap time, peak memory and sample quality of the toy world, against a random-init model.

    python benchmarks/toy_bootstrap.py                 # params.yaml defaults (targets: <= 8 min, <= 4 GiB)
    python benchmarks/toy_bootstrap.py --preset ci     # the tiny test preset

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
image's caption.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import torch

    from unifl.config import load_params
    from unifl.models.base import decode_latents, encode_images, load_base_model
    from unifl.models.sampler import generate
    from unifl.models.segmenter import ToySegmenter
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import default_directory
    from unifl.toy.caption_match import caption_match
    from unifl.toy.dataset import load_toy_arrays

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    # The fresh bootstrap replaces this configuration's cache entry, so `make run` reuses it.
    out = default_directory(params)
    wall, peak_gib = run_bootstrap(out, args.params, args.preset, args.overrides)
    manifest = json.loads((out / "manifest.json").read_text())

    segmenter = ToySegmenter.load(out / "segmenter")
    evaluation = load_toy_arrays(out / "data" / "eval")
    captions = evaluation.captions
    sampling = params.sampling
    # Chance level of each image set: its caption-match against another image's caption
    # (captions rotated by one). Images that show their own caption's objects score far
    # above it; noise that the segmenter reads as scattered shapes scores the same on both.
    rotated = captions[1:] + captions[:1]
    real = evaluation.image_tensor()
    rates = {
        "real held-out images (ceiling)": (
            caption_match(segmenter, real, captions).rate,
            caption_match(segmenter, real, rotated).rate,
        )
    }
    trained = load_base_model(out / "base")
    with torch.no_grad():
        reconstructed = decode_latents(trained, encode_images(trained, real))
    rates["trained VAE's reconstructions of them"] = (
        caption_match(segmenter, reconstructed, captions).rate,
        caption_match(segmenter, reconstructed, rotated).rate,
    )
    models = {
        "trained base model": trained,
        "random-init model (baseline)": build_toy_model(
            f"toy-{params.bootstrap.family}", params.toy.resolution, params.project.seed
        ),
    }
    for name, model in models.items():
        with torch.no_grad():
            images = generate(
                model,
                captions,
                steps=sampling.steps,
                guidance_scale=sampling.guidance_scale,
                seed=params.project.seed,
            )
        rates[f"{name}, {sampling.steps} steps"] = (
            caption_match(segmenter, images, captions).rate,
            caption_match(segmenter, images, rotated).rate,
        )

    print(f"toy bootstrap from scratch ({args.preset or args.params}), {os.cpu_count()} CPU cores")
    print(f"  wall time            {wall / 60:6.2f} min   (target <= 8 min)")
    print(f"  peak memory          {peak_gib:6.2f} GiB   (target <= 4 GiB; all its processes)")
    print(
        f"  processes            {manifest['config']['processes']:6d}       (training the UNet together)"
    )
    for stage, seconds in manifest["timings"].items():
        print(f"    {stage:<18} {seconds:7.1f} s")
    print(f"caption-match on {len(captions)} held-out captions (target: trained >= 0.50)")
    print(f"  {'':<42} {'own captions':>12} {'chance':>8}")
    for name, (rate, chance) in rates.items():
        print(f"  {name:<42} {rate:12.3f} {chance:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
