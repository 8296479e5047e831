"""Bootstrap time, peak memory and sample quality of the toy world, against a random-init model.

    python benchmarks/toy_bootstrap.py                 # params.yaml defaults (targets: <= 8 min, <= 4 GiB)
    python benchmarks/toy_bootstrap.py --preset ci     # the tiny test preset

Trains the bootstrap from scratch (never the cache) in a child process, whose
wall time and peak resident memory are what this prints, then measures in the
same run the caption-match rate (the toy segmenter finds each captioned object
with its shape and colour) of 20-step samples of the trained base model, of a
randomly initialised model of the same preset (the baseline: near chance), and
of the real held-out toy images (the ceiling the segmenter allows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_bootstrap(out_dir: Path, params: str, preset: str | None, overrides: list[str]) -> float:
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
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import torch

    from unifl.config import load_params
    from unifl.models.base import load_base_model
    from unifl.models.sampler import generate
    from unifl.models.segmenter import ToySegmenter
    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.caption_match import caption_match
    from unifl.toy.dataset import load_toy_arrays

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bootstrap"
        wall = run_bootstrap(out, args.params, args.preset, args.overrides)
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        manifest = json.loads((out / "manifest.json").read_text())

        segmenter = ToySegmenter.load(out / "segmenter")
        evaluation = load_toy_arrays(out / "data" / "eval")
        captions = evaluation.captions
        sampling = params.sampling
        rates = {
            "real held-out images (ceiling)": caption_match(
                segmenter, evaluation.image_tensor(), captions
            ).rate
        }
        models = {
            "trained base model": load_base_model(out / "base"),
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
            rates[f"{name}, {sampling.steps} steps"] = caption_match(
                segmenter, images, captions
            ).rate

    print(f"toy bootstrap from scratch ({args.preset or args.params}), {os.cpu_count()} CPU cores")
    print(f"  wall time            {wall / 60:6.2f} min   (target <= 8 min)")
    print(f"  peak memory          {peak_gib:6.2f} GiB   (target <= 4 GiB)")
    for stage, seconds in manifest["timings"].items():
        print(f"    {stage:<18} {seconds:7.1f} s")
    print(f"caption-match on {len(captions)} held-out captions (target: trained >= 0.50)")
    for name, rate in rates.items():
        print(f"  {name:<42} {rate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
