"""Images per second of the sampler, warm-up excluded.

The first call of a model pays one-off costs (lazy allocations, kernel
selection, caches) that say nothing about steady-state speed, so one untimed
warm-up batch runs first. On CUDA the clock is read after a synchronise,
otherwise asynchronous kernels would be timed as free.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Throughput:
    """How long `num_images` images took at `steps` sampling steps."""

    steps: int
    num_images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


def _synchronize(model: Any) -> None:
    device = getattr(model, "device", None)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    guidance_scale: float = 7.5,
    seed: int = 0,
    timestep_spacing: str = "leading",
    batch_size: int = 16,
) -> tuple[Tensor, float]:
    """Generate images for `prompts` with the project's sampler; return them and the seconds."""
    from unifl.models.sampler import generate

    _synchronize(model)
    start = time.perf_counter()
    images = generate(
        model,
        list(prompts),
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        timestep_spacing=timestep_spacing,
        batch_size=batch_size,
    )
    _synchronize(model)
    return images, time.perf_counter() - start


def warm_up(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    guidance_scale: float = 7.5,
    timestep_spacing: str = "leading",
    batch_size: int = 16,
) -> None:
    """One untimed batch at the same settings, so the timed run sees a warm model."""
    timed_generate(
        model, list(prompts)[:batch_size], steps, guidance_scale, 0, timestep_spacing, batch_size
    )


def measure_throughput(
    model: Any,
    prompts: Sequence[str],
    steps: int,
    guidance_scale: float = 7.5,
    timestep_spacing: str = "leading",
    batch_size: int = 16,
    seed: int = 0,
    warmup: bool = True,
) -> Throughput:
    """Images per second of `generate` over `prompts` at `steps` steps, after a warm-up batch."""
    if not prompts:
        raise ValueError("measure_throughput needs at least one prompt")
    if warmup:
        warm_up(model, prompts, steps, guidance_scale, timestep_spacing, batch_size)
    images, seconds = timed_generate(
        model, prompts, steps, guidance_scale, seed, timestep_spacing, batch_size
    )
    return Throughput(steps=steps, num_images=int(images.shape[0]), seconds=seconds)
