"""Milliseconds a step to average the toy UNet's gradients over its data-parallel processes.

    python benchmarks/gradient_average.py                 # 2 processes, 300 steps
    python benchmarks/gradient_average.py --processes 2 --steps 500

The bootstrap trains the toy UNet and text encoder in two processes and
averages their gradients every step (`unifl.toy.bootstrap.SharedGradients`,
through shared memory). This times that averaging on gradients of the
bootstrap model's parameter shapes against, in the same run, an all-reduce
over gloo (TCP), which the bootstrap used before, and checks that both give
the same bits. Compare the figures with a step's time, `benchmarks/unet_step.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path


def _timed_process(rank, gradients, rendezvous, shapes, steps, results):
    import torch
    import torch.distributed as dist

    from unifl.toy.bootstrap import flatten_gradients, set_flat_gradients

    torch.set_num_threads(1)
    processes = gradients.processes
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=processes
    )
    try:
        generator = torch.Generator().manual_seed(rank)
        parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        loss = torch.rand((), generator=generator)

        def own_gradients() -> None:
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad

        def gloo_average() -> float:
            own_gradients()
            flat = flatten_gradients(parameters, loss)
            dist.all_reduce(flat)
            return set_flat_gradients(parameters, flat / processes)

        def shared_average() -> float:
            own_gradients()
            return gradients.average(rank, parameters, loss)

        seconds = {}
        for name, average in (("gloo all-reduce", gloo_average), ("shared memory", shared_average)):
            for _ in range(10):
                average()
            dist.barrier()
            started = time.perf_counter()
            for _ in range(steps):
                average()
            seconds[name] = (time.perf_counter() - started) / steps
            dist.barrier()
        gloo_average()
        reference = [p.grad.clone() for p in parameters]
        shared_average()
        same = all(torch.equal(p.grad, r) for p, r in zip(parameters, reference, strict=True))
        if rank == 0:
            results.update(seconds=seconds, same_bits=same)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--preset", default="toy-sd15", help="the toy preset whose shapes to use")
    args = parser.parse_args(argv)

    import torch.multiprocessing as mp

    from unifl.models.toy_presets import build_toy_model
    from unifl.toy.bootstrap import SharedGradients, denoiser_parameters

    shapes = [tuple(p.shape) for p in denoiser_parameters(build_toy_model(args.preset)).values()]
    size = sum(math.prod(shape) for shape in shapes)
    gradients = SharedGradients(size + 1, args.processes)
    with tempfile.TemporaryDirectory(prefix="unifl-average-") as scratch, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _timed_process,
            args=(gradients, Path(scratch) / "rendezvous", shapes, args.steps, results),
            nprocs=args.processes,
            join=True,
        )
        seconds, same = dict(results["seconds"]), results["same_bits"]
    print(
        f"{args.preset}: averaging {size:,} gradient values ({len(shapes)} tensors) over "
        f"{args.processes} processes, one thread each, {args.steps} steps"
    )
    for name, value in seconds.items():
        print(f"  {name:<16} {value * 1000:7.2f} ms a step")
    print(f"  the same bits as the all-reduce: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
