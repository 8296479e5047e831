"""Seconds per training step of the toy UNet by batch size and process count.

    python benchmarks/unet_step.py                                   # batches 32 48 64, 1 and 2 processes
    python benchmarks/unet_step.py --batches 16 32 --processes 1 --steps 200

The bootstrap trains the toy UNet data-parallel, one process of one thread
per core with at least `MIN_SAMPLES_PER_PROCESS` samples of each batch
(`unifl.toy.bootstrap.training_processes`). This times `train_denoiser` (one
process) and `train_denoiser_in_processes` (several) on the bootstrap's
own training images from its base model, each for `--steps` and for a
quarter of them: the difference divided by the steps between is the time of
one step, without starting the processes and loading the model. With
`--threads` above 1 the one-process rows run on that many torch threads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from toy_table import toy_arguments


def timed_run(boot, images, captions, params, batch: int, processes: int, steps: int) -> float:
    """Wall seconds of `steps` UNet steps of `batch` samples on `processes` processes."""
    from unifl.models.base import load_base_model
    from unifl.toy.bootstrap import train_denoiser, train_denoiser_in_processes

    training = {
        "steps": steps,
        "batch_size": batch,
        "learning_rate": params.bootstrap.unet_learning_rate,
        "caption_dropout": params.bootstrap.caption_dropout,
        "timestep_sampling": params.bootstrap.timestep_sampling,
        "logit_normal": (params.bootstrap.logit_normal_mean, params.bootstrap.logit_normal_std),
        "seed": params.project.seed,
    }
    model = load_base_model(boot.base_model_dir)
    if processes == 1:
        started = time.perf_counter()
        train_denoiser(model, images, captions, progress=False, **training)
        return time.perf_counter() - started
    scratch = Path(tempfile.mkdtemp(prefix="unifl-unet-step-"))
    try:
        started = time.perf_counter()
        train_denoiser_in_processes(
            model, scratch, images, captions, processes, params.project, False, **training
        )
        return time.perf_counter() - started
    finally:
        shutil.rmtree(scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 8:
        parser.error("--steps must be at least 8")

    import torch

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads
    from unifl.toy.bootstrap import bootstrap_toy_world
    from unifl.toy.dataset import load_toy_arrays

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    boot = bootstrap_toy_world(params)
    train = load_toy_arrays(boot.train_data_dir)
    images, captions = train.image_tensor(), train.captions
    short = args.steps // 4
    print(
        f"toy UNet training step ({boot.base_model_dir}): seconds a step from {args.steps} "
        f"against {short} steps, one thread a process of several, {args.threads} in one alone"
    )
    print(f"  {'batch':>5} {'processes':>9} {'samples each':>12} {'s / step':>9} {'wall':>8}")
    for batch in args.batches:
        for processes in args.processes:
            if batch % processes:
                continue
            torch.set_num_threads(args.threads if processes == 1 else 1)
            run = (boot, images, captions, params, batch, processes)
            long_s, short_s = timed_run(*run, args.steps), timed_run(*run, short)
            per_step = (long_s - short_s) / (args.steps - short)
            print(
                f"  {batch:5d} {processes:9d} {batch // processes:12d} {per_step:9.4f} "
                f"{long_s:7.1f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
