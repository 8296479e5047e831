"""The sampling math of feedback learning: noise, denoise without gradients, one step with.

Every UniFL stage makes the model produce an x0 prediction with gradients:

* perceptual FL (PeFL) and adversarial FL start from *real* latents, noised to
  step `T_a` of a short DDIM schedule (paper: 20 steps, `T_a = 10`);
* decoupled aesthetic FL starts from *pure noise*;

then denoise without gradients (with classifier-free guidance) down to a random
step `t`, and call the UNet with gradients at `t` to predict `x0'`, which the VAE
decodes for a perceptual or reward model.

Steps are counted from the clean end: step `k` of an `N`-step schedule is the
`k`-th smallest of the scheduler's timesteps, so step 0 is the last denoising
step and step `N - 1` the first (noisiest). The UNet is always given the
*scheduler timestep* `schedule.timesteps[k]` (e.g. 951, 901, ... for SD's
20-step leading schedule), never the step index `k`: passing the index is a
known bug of a ReFL reference implementation and a test guards against it.

The DDIM update is written here on `alphas_cumprod` (eta = 0) rather than
through `DDIMScheduler.step` so that it is differentiable, batched, and used
identically in the no-grad and the gradient part.

In the no-grad part a LoRA UNet runs with its adapters folded into the base
weights (`merged_lora`): a LoRA layer otherwise adds about ten operations to
each projection it wraps (SDXL: 13.6k instead of 8.0k per UNet call,
`python benchmarks/feedback_step.py --op-counts`), and at batch 1 on a GPU a
step is bound by launching operations rather than by arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unifl.models.base import BaseModel, PromptEmbeds, decode_latents, predict_noise


@dataclass(frozen=True)
class FeedbackSchedule:
    """A short DDIM schedule seen from the clean end (step 0 is the last step)."""

    timesteps: Tensor
    """Scheduler timesteps in ascending order: `timesteps[k]` is step `k`."""
    alphas_cumprod: Tensor
    """`abar` of the scheduler's training schedule, indexed by timestep."""
    final_alpha_cumprod: float
    """`abar` after the last step (the scheduler's `final_alpha_cumprod`)."""

    @classmethod
    def from_scheduler(
        cls, scheduler, num_inference_steps: int = 20, spacing: str | None = None
    ) -> FeedbackSchedule:
        """Build the schedule the scheduler would use for `num_inference_steps` steps."""
        from diffusers import DDIMScheduler

        config = dict(scheduler.config)
        if spacing is not None:
            config["timestep_spacing"] = spacing
        ddim = DDIMScheduler.from_config(config)
        ddim.set_timesteps(num_inference_steps)
        ascending = ddim.timesteps.flip(0).to(torch.long)
        return cls(
            timesteps=ascending,
            alphas_cumprod=ddim.alphas_cumprod.to(torch.float64),
            final_alpha_cumprod=float(ddim.final_alpha_cumprod),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, step: int) -> int:
        """The scheduler timestep of step `step` (what the UNet is given)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside the {self.num_steps}-step schedule")
        return int(self.timesteps[step])

    def alpha(self, step: int) -> float:
        """`abar` at step `step`."""
        return float(self.alphas_cumprod[self.timestep(step)])

    def alpha_after(self, step: int) -> float:
        """`abar` of the latents that step `step` produces (step `step - 1`, or final)."""
        return self.final_alpha_cumprod if step == 0 else self.alpha(step - 1)


def noise_latents(latents: Tensor, noise: Tensor, alpha_cumprod: float | Tensor) -> Tensor:
    """Forward diffusion `x_t = sqrt(abar) x0 + sqrt(1 - abar) eps` (`abar` one number, or one
    per row broadcast over the latents)."""
    return alpha_cumprod**0.5 * latents + (1.0 - alpha_cumprod) ** 0.5 * noise


def predict_x0(latents: Tensor, noise_pred: Tensor, alpha_cumprod: float) -> Tensor:
    """The x0 prediction `(x_t - sqrt(1 - abar) eps) / sqrt(abar)`."""
    return (latents - (1.0 - alpha_cumprod) ** 0.5 * noise_pred) / alpha_cumprod**0.5


def ddim_step(
    latents: Tensor, noise_pred: Tensor, alpha_cumprod: float, alpha_cumprod_prev: float
) -> Tensor:
    """One deterministic DDIM update (eta = 0) from `abar` to `abar_prev`."""
    x0 = predict_x0(latents, noise_pred, alpha_cumprod)
    return alpha_cumprod_prev**0.5 * x0 + (1.0 - alpha_cumprod_prev) ** 0.5 * noise_pred


def guided_noise(
    model: BaseModel,
    latents: Tensor,
    timestep: int,
    embeds: PromptEmbeds,
    uncond_embeds: PromptEmbeds | None,
    guidance_scale: float,
) -> Tensor:
    """Noise prediction with classifier-free guidance (skipped at scale 1)."""
    if guidance_scale == 1.0 or uncond_embeds is None:
        return predict_noise(model, latents, timestep, embeds)
    both = embeds.with_unconditional(uncond_embeds)
    eps_uncond, eps_cond = predict_noise(
        model, torch.cat([latents, latents]), timestep, both
    ).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@contextmanager
def merged_lora(module: nn.Module) -> Iterator[None]:
    """Fold the active LoRA adapters in `module` into their base weights, for no-grad calls.

    The base weights are copied first and restored from the copies on exit, so
    that merging and unmerging leave no rounding behind in bf16 weights. Outside
    the context every layer runs unmerged again, as training needs.
    """
    from peft.tuners.lora import LoraLayer

    layers = [
        layer
        for layer in module.modules()
        if isinstance(layer, LoraLayer) and not layer.merged and not layer.disable_adapters
    ]
    originals = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, originals, strict=True):
                if layer.merged:  # unmerge resets the layer's state; the copy, its weight
                    layer.unmerge()
                layer.get_base_layer().weight.copy_(original)


@torch.no_grad()
def denoise(
    model: BaseModel,
    latents: Tensor,
    schedule: FeedbackSchedule,
    start: int,
    stop: int,
    embeds: PromptEmbeds,
    uncond_embeds: PromptEmbeds | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Denoise latents at step `start` down to step `stop` (no gradients).

    Runs the steps `start, start - 1, ..., stop + 1`; `start == stop` is a no-op.
    """
    if stop > start:
        raise ValueError(f"cannot denoise from step {start} up to step {stop}")
    if start == stop:
        return latents
    with merged_lora(model.unet):
        for step in range(start, stop, -1):
            eps = guided_noise(
                model, latents, schedule.timestep(step), embeds, uncond_embeds, guidance_scale
            )
            latents = ddim_step(latents, eps, schedule.alpha(step), schedule.alpha_after(step))
    return latents


@dataclass
class FeedbackSample:
    """The model's x0 prediction at one step, with gradients, and what produced it."""

    x0_latents: Tensor
    """Predicted clean latents (with gradients to the trainable UNet parameters)."""
    images: Tensor | None
    """`x0_latents` decoded to pixels in [0, 1] (with gradients), if decoded."""
    noise_pred: Tensor
    """The UNet's noise prediction at the gradient step."""
    step: int
    """The step of the gradient call (counted from the clean end)."""
    timestep: int
    """The scheduler timestep the UNet was given at the gradient step."""


def feedback_sample(
    model: BaseModel,
    latents: Tensor,
    schedule: FeedbackSchedule,
    start: int,
    grad_step: int,
    embeds: PromptEmbeds,
    uncond_embeds: PromptEmbeds | None = None,
    guidance_scale: float = 1.0,
    grad_guidance_scale: float = 1.0,
    truncate: int = 1,
    gradient_checkpointing: bool = False,
    decode: bool = True,
) -> FeedbackSample:
    """Denoise from `start` to `grad_step` and predict x0 with gradients.

    `latents` are at step `start` (noised real latents, or pure noise). The last
    `truncate` UNet calls (K, truncated back-propagation) keep gradients; the
    ones before run under `torch.no_grad`. `guidance_scale` applies to the
    no-grad part; `grad_guidance_scale` to the calls with gradients (1: the
    conditional prediction alone, half the cost).
    """
    if not 0 <= grad_step <= start < schedule.num_steps:
        raise ValueError(
            f"need 0 <= grad_step ({grad_step}) <= start ({start}) < {schedule.num_steps}"
        )
    if truncate < 1:
        raise ValueError(f"truncate must be >= 1, got {truncate}")
    first_grad = min(start, grad_step + truncate - 1)
    latents = denoise(
        model, latents, schedule, start, first_grad, embeds, uncond_embeds, guidance_scale
    ).detach()

    def unet_call(x: Tensor, step: int) -> Tensor:
        return guided_noise(
            model, x, schedule.timestep(step), embeds, uncond_embeds, grad_guidance_scale
        )

    def call(x: Tensor, step: int) -> Tensor:
        if gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(unet_call, x, step, use_reentrant=False)
        return unet_call(x, step)

    for step in range(first_grad, grad_step, -1):
        eps = call(latents, step)
        latents = ddim_step(latents, eps, schedule.alpha(step), schedule.alpha_after(step))
    eps = call(latents, grad_step)
    x0 = predict_x0(latents, eps, schedule.alpha(grad_step))
    images = decode_latents(model, x0) if decode else None
    return FeedbackSample(
        x0_latents=x0,
        images=images,
        noise_pred=eps,
        step=grad_step,
        timestep=schedule.timestep(grad_step),
    )


def sample_step(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """A random step in `[low, high]` (inclusive), drawn from `generator`."""
    if high < low:
        raise ValueError(f"empty step range [{low}, {high}]")
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())
