"""Perceptual feedback learning (PeFL): a frozen perceptual model's own loss on the x0 prediction.

For a batch of real (image, caption, annotations):

1. `z0 = VAE.encode(image)` (posterior mode);
2. `z0` is noised to step `T_a = pefl.start_step` of the `trainer.num_inference_steps`
   DDIM schedule (steps counted from the clean end; paper: step 10 of 20);
3. the model denoises without gradients, with classifier-free guidance, down
   to a random step `t` in `[0, pefl.max_step]` (paper: 5);
4. one UNet call with gradients at `t` predicts `x0'`, which the VAE decodes
   (with gradients);
5. `L_pefl = pefl.perceptual_weight * Phi(m(decoded), GT)`, where `Phi` is the
   (weighted sum of the) perceptual models' own losses against the image's
   annotations (`unifl.feedback.perceptual`).

Stage 1's objective is `L1 = L_pefl + pefl.aesthetic_weight * L_aes` when a
reward model is given (`L_aes` as in `unifl.feedback.decoupled`), plus the
optional MSE regulariser `trainer.mse_weight * ||eps_theta(x_t) - eps||^2` on
the same real latents.

Annotations given to the perceptual loss, from the toy-format data set (the
only data layout the project writes: PNG images, semantic and instance label
maps, captions): `semantic_masks` (class ids), `instance_masks` /
`instance_classes` (from the instance map, each instance's class the most
frequent semantic id under it) and `style_images` (the real image itself,
the reference of the Gram-matrix style loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unifl.feedback.decoupled import add_aesthetic_term, resolve_aesthetic_weights
from unifl.feedback.perceptual import (
    INSTANCE_CLASSES,
    INSTANCE_MASKS,
    SEMANTIC_MASKS,
    STYLE_IMAGES,
    instance_targets_from_maps,
)
from unifl.feedback.sampling import noise_latents, sample_step
from unifl.feedback.trainer import FeedbackTrainer, MetricsCallback, StepOutput

if TYPE_CHECKING:
    from unifl.config import Params
    from unifl.feedback.perceptual import PerceptualLoss
    from unifl.models.base import BaseModel
    from unifl.models.reward import DecoupledRewardModel


@dataclass
class ImageBatch:
    """Real images of one micro-batch with their captions and label maps (CPU tensors)."""

    images: Tensor
    """float [B, 3, H, W] in [0, 1]."""
    captions: list[str]
    semantic_masks: Tensor | None
    """long [B, H, W] class ids; None for images without label maps (model samples)."""
    instance_masks: Tensor | None
    """long [B, H, W], 0 background, 1..k the objects; None without label maps."""

    def __len__(self) -> int:
        return len(self.captions)


def collate_images(items: Sequence[Mapping[str, Any]]) -> ImageBatch:
    """Stack `ToyDataset` items (image, caption, semantic_mask, instance_mask) into a batch;
    items without label maps (`ModelSamples`) give a batch without them."""
    if not items:
        raise ValueError("an image batch needs at least one item")

    def stacked(key: str) -> Tensor | None:
        if not all(key in item for item in items):
            return None
        return torch.stack([item[key] for item in items]).long()

    return ImageBatch(
        images=torch.stack([item["image"] for item in items]),
        captions=[str(item["caption"]) for item in items],
        semantic_masks=stacked("semantic_mask"),
        instance_masks=stacked("instance_mask"),
    )


def perceptual_annotations(
    batch: ImageBatch, required: Sequence[str], device: torch.device
) -> dict[str, Any]:
    """The annotations a perceptual loss asks for (`required`), built from the batch."""
    annotations: dict[str, Any] = {}
    needs_masks = {SEMANTIC_MASKS, INSTANCE_MASKS, INSTANCE_CLASSES} & set(required)
    if needs_masks and (batch.semantic_masks is None or batch.instance_masks is None):
        raise ValueError(
            f"the data set has no label maps, needed for {sorted(needs_masks)} "
            "(required by pefl.perceptual)"
        )
    if SEMANTIC_MASKS in required:
        annotations[SEMANTIC_MASKS] = batch.semantic_masks.to(device)
    if INSTANCE_MASKS in required or INSTANCE_CLASSES in required:
        targets = instance_targets_from_maps(batch.instance_masks, batch.semantic_masks)
        annotations.update(targets)
    if STYLE_IMAGES in required:
        annotations[STYLE_IMAGES] = batch.images.to(device)
    unknown = sorted(set(required) - set(annotations))
    if unknown:
        raise ValueError(
            f"the data set has no annotation for {unknown} (required by pefl.perceptual)"
        )
    return annotations


def check_image_data(data: Any, model: BaseModel, where: str) -> None:
    """The data's images must have the model's resolution: PeFL compares pixels with label maps."""
    if len(data) == 0:
        raise ValueError(f"{where}: the data set is empty")
    first = data[0]
    size = tuple(first["image"].shape[-2:])
    if size != (model.image_size, model.image_size):
        raise ValueError(
            f"{where}: images are {size[0]}x{size[1]} px but the model makes "
            f"{model.image_size}x{model.image_size} px images"
        )


class PeflTrainer(FeedbackTrainer):
    """Perceptual feedback learning (stage 1, with L_aes when a reward model is given).

    Args:
        model: the base model to tune (modified in place, see `FeedbackTrainer`).
        data: a map-style data set of dicts (image, caption, semantic_mask,
            instance_mask), e.g. `unifl.toy.dataset.ToyDataset`.
        perceptual_loss: the frozen perceptual model(s) and their loss.
        params: the configuration (`trainer`, `pefl`, `decoupled`, `project`).
        out_dir: checkpoints, model and history.
        reward_model: the decoupled reward model for `L_aes`; None: `L1 = L_pefl`.
    """

    stage_name = "pefl"

    def __init__(
        self,
        model: BaseModel,
        data: Any,
        perceptual_loss: PerceptualLoss,
        params: Params,
        out_dir: str | Path,
        *,
        reward_model: DecoupledRewardModel | None = None,
        metrics_callback: MetricsCallback | None = None,
        progress: bool = True,
    ) -> None:
        config = params.pefl
        steps = params.trainer.num_inference_steps
        if config.start_step >= steps:
            raise ValueError(
                f"pefl.start_step ({config.start_step}) must be below trainer.num_inference_steps "
                f"({steps})"
            )
        if config.max_step > config.start_step:
            raise ValueError(
                f"pefl.max_step ({config.max_step}) must not exceed pefl.start_step "
                f"({config.start_step}): the gradient step lies on the way down from T_a"
            )
        check_image_data(data, model, "pefl data")
        super().__init__(
            model,
            params,
            out_dir,
            steps=config.steps,
            learning_rate=config.learning_rate,
            num_items=len(data),
            metrics_callback=metrics_callback,
            progress=progress,
        )
        self.data_set = data
        self.perceptual_loss = self.frozen(perceptual_loss)
        self.required_annotations = tuple(getattr(perceptual_loss, "required_annotations", ()))
        self.reward_model = None
        self.weights: dict[str, float] = {}
        if reward_model is not None and config.aesthetic_weight > 0:
            self.weights = resolve_aesthetic_weights(params.decoupled.weights, reward_model)
            self.reward_model = self.frozen(reward_model)

    def batch(self, micro_batch: int) -> ImageBatch:
        return collate_images([self.data_set[i] for i in self.data.indices(micro_batch)])

    def compute_loss(self, batch: ImageBatch, generator: torch.Generator) -> StepOutput:
        config = self.params.pefl
        latents = self.encode(batch.images)
        embeds, uncond = self.prompt_embeds(batch.captions)
        grad_step = sample_step(0, config.max_step, generator)
        noise = self.randn(latents.shape, generator)
        noisy = noise_latents(latents, noise, self.schedule.alpha(config.start_step))
        sample = self.feedback(noisy, config.start_step, grad_step, embeds, uncond)
        images = self.decode(sample.x0_latents)
        annotations = perceptual_annotations(batch, self.required_annotations, self.device)
        perceptual = self.perceptual_loss(images, annotations)
        loss = config.perceptual_weight * perceptual
        logs: dict[str, float] = {"pefl": float(perceptual.detach())}
        for name, value in getattr(self.perceptual_loss, "last_terms", {}).items():
            logs[f"pefl_{name}"] = float(value)
        if self.reward_model is not None:
            loss = add_aesthetic_term(
                loss,
                logs,
                self.reward_model,
                images,
                batch.captions,
                self.weights,
                self.params.decoupled.grad_scale,
                config.aesthetic_weight,
            )
        loss = self.add_noise_regulariser(loss, logs, latents, embeds, generator)
        logs.update({"t": grad_step, "timestep": sample.timestep})
        return StepOutput(loss, logs)
