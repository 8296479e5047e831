"""Decoupled aesthetic feedback learning: one hinge per aesthetic dimension.

From pure noise and a prompt `c`, the model denoises without gradients (with
classifier-free guidance) down to a random late step `t` in
`[0, decoupled.max_step]` of the `trainer.num_inference_steps` DDIM schedule
(counted from the clean end), takes one UNet call with gradients, predicts
`x0'` and decodes it. Every reward head scores the image and

    L_aes = grad_scale * sum_d w_d * mean relu(alpha_d - r_d(x0', c))

with `alpha_d` calibrated by reward training and saved with the reward model
(`DecoupledRewardModel.alphas`) and `w_d`, `grad_scale` from `decoupled`.
`grad_scale` (ImageReward's 1e-3) is part of `L_aes` wherever it appears, in
stage 1 (`L1 = L_pefl + L_aes`) and stage 2 (`L2 = L_G + L_D + L_aes`) too, so
that `L_aes` is one quantity and the stage weights are relative to it.

Prompts come from the curated (actively selected) prompt table, or any prompt
list. The optional MSE regulariser needs real latents: give `regulariser_data`
(a toy-format image directory) when its weight is above 0 (`decoupled.mse_weight`,
else `trainer.mse_weight`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unifl.feedback.losses import aesthetic_hinge_loss
from unifl.feedback.sampling import sample_step
from unifl.feedback.trainer import (
    DataStream,
    FeedbackTrainer,
    MetricsCallback,
    StepOutput,
    derive_seed,
)

if TYPE_CHECKING:
    from unifl.config import Params
    from unifl.feedback.pefl import ImageBatch
    from unifl.models.base import BaseModel
    from unifl.models.reward import DecoupledRewardModel


def resolve_aesthetic_weights(
    weights: Mapping[str, float], reward_model: DecoupledRewardModel
) -> dict[str, float]:
    """`decoupled.weights` checked against the reward model; dimensions of weight 0 are dropped."""
    unknown = sorted(set(weights) - set(reward_model.dimensions))
    if unknown:
        raise ValueError(
            f"decoupled.weights names dimensions {unknown} that the reward model does not score "
            f"(it has {list(reward_model.dimensions)})"
        )
    used = {dim: float(w) for dim, w in weights.items() if w != 0}
    if not used:
        raise ValueError("decoupled.weights: every weight is 0, so L_aes would be empty")
    return used


def aesthetic_feedback(
    reward_model: DecoupledRewardModel,
    images: Tensor,
    prompts: Sequence[str],
    weights: Mapping[str, float],
    grad_scale: float,
) -> tuple[Tensor, dict[str, float]]:
    """`L_aes` (with `grad_scale`) of decoded images, and per-dimension rewards and hinges to log."""
    rewards = reward_model(images, prompts=list(prompts), dimensions=list(weights))
    hinge, terms = aesthetic_hinge_loss(rewards, reward_model.alphas, weights)
    logs: dict[str, float] = {}
    for dim in weights:
        logs[f"reward_{dim}"] = float(rewards[dim].detach().float().mean())
        logs[f"hinge_{dim}"] = float(terms[dim].detach())
    return grad_scale * hinge, logs


def add_aesthetic_term(
    loss: Tensor,
    logs: dict[str, float],
    reward_model: DecoupledRewardModel,
    images: Tensor,
    prompts: Sequence[str],
    weights: Mapping[str, float],
    grad_scale: float,
    weight: float,
) -> Tensor:
    """`loss + weight * L_aes` of a stage that adds the aesthetic objective to its own (PeFL,
    adversarial); the rewards, hinges and the term go to `logs`."""
    aesthetic, reward_logs = aesthetic_feedback(reward_model, images, prompts, weights, grad_scale)
    logs.update(reward_logs)
    logs["aes"] = float(aesthetic.detach())
    return loss + weight * aesthetic


@dataclass
class PromptBatch:
    """Prompts of one micro-batch, and real images for the MSE regulariser when it is on."""

    prompts: list[str]
    regulariser: ImageBatch | None = None


class DecoupledTrainer(FeedbackTrainer):
    """Decoupled aesthetic feedback learning on a prompt set (see the module docstring).

    Args:
        model: the base model to tune (modified in place, see `FeedbackTrainer`).
        reward_model: the decoupled reward model; frozen.
        prompts: the training prompts.
        params: the configuration (`trainer`, `decoupled`, `project`).
        out_dir: checkpoints, model and history.
        regulariser_data: real images with captions for the MSE regulariser.
    """

    stage_name = "decoupled"

    def __init__(
        self,
        model: BaseModel,
        reward_model: DecoupledRewardModel,
        prompts: Sequence[str],
        params: Params,
        out_dir: str | Path,
        *,
        regulariser_data: Any | None = None,
        metrics_callback: MetricsCallback | None = None,
        progress: bool = True,
    ) -> None:
        config = params.decoupled
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("decoupled feedback learning needs at least one prompt")
        steps = params.trainer.num_inference_steps
        if config.max_step >= steps:
            raise ValueError(
                f"decoupled.max_step ({config.max_step}) must be below trainer.num_inference_steps "
                f"({steps})"
            )
        mse_weight = params.mse_weight(self.stage_name)
        if mse_weight > 0 and regulariser_data is None:
            raise ValueError(
                f"the MSE regulariser (weight {mse_weight}: decoupled.mse_weight, else "
                "trainer.mse_weight) needs real images: pass regulariser_data (CLI: --data)"
            )
        super().__init__(
            model,
            params,
            out_dir,
            steps=config.steps,
            learning_rate=config.learning_rate,
            num_items=len(prompts),
            metrics_callback=metrics_callback,
            progress=progress,
        )
        self.prompts = prompts
        self.weights = resolve_aesthetic_weights(config.weights, reward_model)
        self.reward_model = self.frozen(reward_model)
        self.regulariser_data = regulariser_data
        self.regulariser_stream = None
        if regulariser_data is not None and self.mse_weight > 0:
            self.regulariser_stream = DataStream(
                len(regulariser_data),
                self.config.batch_size,
                derive_seed(self.seed, 0x3E6),
                self.process_index,
                self.accelerator.num_processes,
            )

    def batch(self, micro_batch: int) -> PromptBatch:
        prompts = [self.prompts[i] for i in self.data.indices(micro_batch)]
        regulariser = None
        if self.regulariser_stream is not None:
            from unifl.feedback.pefl import collate_images

            indices = self.regulariser_stream.indices(micro_batch)
            regulariser = collate_images([self.regulariser_data[i] for i in indices])
        return PromptBatch(prompts, regulariser)

    def compute_loss(self, batch: PromptBatch, generator: torch.Generator) -> StepOutput:
        config = self.params.decoupled
        embeds, uncond = self.prompt_embeds(batch.prompts)
        start = self.schedule.num_steps - 1
        grad_step = sample_step(0, config.max_step, generator)
        noise = self.randn(self.latent_shape(len(batch.prompts)), generator)
        sample = self.feedback(noise, start, grad_step, embeds, uncond)
        images = self.decode(sample.x0_latents)
        loss, logs = aesthetic_feedback(
            self.reward_model, images, batch.prompts, self.weights, config.grad_scale
        )
        logs.update({"aes": float(loss.detach()), "t": grad_step, "timestep": sample.timestep})
        if batch.regulariser is not None:
            latents = self.encode(batch.regulariser.images)
            real_embeds, _ = self.prompt_embeds(batch.regulariser.captions)
            loss = self.add_noise_regulariser(loss, logs, latents, real_embeds, generator)
        return StepOutput(loss, logs)
