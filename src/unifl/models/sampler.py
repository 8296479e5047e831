"""Text-to-image sampling: DDIM (eta 0) with classifier-free guidance.

Why DDIM and not the diffusers pipelines: UniFL's stages reason about the
20-step DDIM schedule (noise real latents to step T_a, denoise to step t, take
one step with gradients), and the evaluation compares 20-step against 4-step
"trailing" inference. Sampling with the same scheduler, the same
`encode_prompt` and the same `predict_noise` as training keeps those numbers
comparable; a second code path through a pipeline would not.

Choices:
- The model's scheduler is never mutated: each call builds a DDIM scheduler
  from its config with the requested `timestep_spacing` ("leading" as SD
  trains, "trailing" for few-step inference so that the first step starts at
  t=999, "linspace").
- Determinism independent of batching: the initial noise of prompt i comes
  from its own CPU generator seeded from (seed, i) (`prompt_seed`), and eta 0
  makes the rest deterministic. The same prompt list and seed give the same
  images whatever `batch_size` is (up to float rounding of batched kernels).
- Guidance: one UNet call on [uncond; cond]; with `guidance_scale == 1` the
  unconditional pass is skipped, since its weight would be zero.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from unifl.io import atomic_path
from unifl.models.base import (
    BaseModel,
    decode_latents,
    encode_prompt,
    predict_noise,
    unconditional_embeds,
)

TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def ddim_scheduler(scheduler: DDIMScheduler, steps: int, spacing: str = "leading") -> DDIMScheduler:
    """A fresh DDIM scheduler from `scheduler`'s config, set to `steps` steps with `spacing`."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    if steps < 1 or steps > scheduler.config.num_train_timesteps:
        raise ValueError(
            f"steps must be in [1, {scheduler.config.num_train_timesteps}], got {steps}"
        )
    fresh = DDIMScheduler.from_config(scheduler.config, timestep_spacing=spacing)
    fresh.set_timesteps(steps)
    return fresh


def ddim_timesteps(scheduler: DDIMScheduler, steps: int, spacing: str = "leading") -> list[int]:
    """The scheduler timesteps (high to low) of a `steps`-step DDIM run with `spacing`."""
    return [int(t) for t in ddim_scheduler(scheduler, steps, spacing).timesteps]


def prompt_seed(seed: int, index: int) -> int:
    """The noise seed of prompt `index` under run seed `seed` (well mixed, 63 bits)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, index])
    return int(state.generate_state(1, dtype=np.uint64)[0]) >> 1


def initial_noise(model: BaseModel, count: int, seed: int, start: int = 0) -> torch.Tensor:
    """Initial latents of prompts `start..start+count-1`, float32 on the model's device."""
    shape = (model.latent_channels, model.latent_size, model.latent_size)
    noise = [
        torch.randn(shape, generator=torch.Generator().manual_seed(prompt_seed(seed, index)))
        for index in range(start, start + count)
    ]
    return torch.stack(noise).to(model.device)


@torch.no_grad()
def generate(
    model: BaseModel,
    prompts: list[str],
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    timestep_spacing: str = "leading",
    batch_size: int = 16,
    negative_prompt: str = "",
    progress: bool = False,
    first_index: int = 0,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] (float32, CPU) for `prompts`, DDIM with eta 0.

    Each prompt's initial noise is drawn from `seed` and its index, counted from
    `first_index`: a list sampled in parts gets the images of one call.
    """
    if isinstance(prompts, str):
        raise TypeError("generate takes a list of prompts, not a single string")
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1, got {guidance_scale}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scheduler = ddim_scheduler(model.scheduler, steps, timestep_spacing)
    use_guidance = guidance_scale != 1.0
    batches = [
        list(range(i, min(i + batch_size, len(prompts))))
        for i in range(0, len(prompts), batch_size)
    ]
    bar = tqdm(
        total=len(batches) * len(scheduler.timesteps),
        desc=f"sampling {len(prompts)} prompts",
        disable=not progress,
        leave=False,
    )
    images = []
    for indices in batches:
        embeds = encode_prompt(model, [prompts[i] for i in indices])
        if use_guidance:
            embeds = embeds.with_unconditional(
                unconditional_embeds(model, len(indices), negative_prompt)
            )
        latents = initial_noise(model, len(indices), seed, start=first_index + indices[0])
        latents = latents * scheduler.init_noise_sigma
        for timestep in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if use_guidance else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            noise_pred = predict_noise(model, model_input, timestep, embeds)
            if use_guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, timestep, latents, eta=0.0).prev_sample
            bar.update(1)
        images.append(decode_latents(model, latents).cpu())
    bar.close()
    return torch.cat(images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> RGB PIL images (rounded to 8 bits)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(item) for item in array]


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def save_images(images: torch.Tensor, directory: str | Path, names: Sequence[str]) -> list[Path]:
    """Write each image as PNG `directory/name` (".png" added when missing), atomically.

    Names must be plain file names, one per image, without duplicates.
    """
    if len(names) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(names)} names")
    files = [name if name.lower().endswith(".png") else f"{name}.png" for name in names]
    for name in files:
        if not _SAFE_NAME.match(name):
            raise ValueError(
                f"image name {name!r} must be a plain file name (letters, digits, ._-)"
            )
    if len(set(files)) != len(files):
        raise ValueError("image names must be unique")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for picture, name in zip(to_pil(images), files, strict=True):
        path = folder / name
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
        paths.append(path)
    return paths
