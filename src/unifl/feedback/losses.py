"""The loss terms of UniFL's stages, as plain functions of tensors.

Stage 1 (quality) minimises `L1 = L_pefl + L_aes`; stage 2 (acceleration)
`L2 = L_G + L_D + L_aes`. The perceptual term `L_pefl` is the perceptual
model's own loss (`unifl.feedback.perceptual`); the others live here:

* `aesthetic_hinge_loss`: decoupled aesthetic feedback,
  `L_aes = sum_d w_d * mean_i relu(alpha_d - r_d(x0'_i, c_i))`. The hinge stops
  pushing a dimension once its reward reaches `alpha_d`, which is what keeps
  the generator from chasing one reward head to saturation (reward hacking).
* `generator_adversarial_loss`: `L_G = -mean r_a(x0', c)`, the paper's
  generator objective (the raw discriminator score, not the non-saturating
  `-log sigmoid`).
* `discriminator_loss`: `L_D = -mean log sigmoid(r_a(x0)) - mean log(1 - sigmoid(r_a(x0')))`,
  binary cross-entropy with real images labelled 1 and the model's x0' labelled 0,
  computed from logits for numerical stability.
* `noise_prediction_mse`: the pre-training objective `||eps_theta(x_t, t, c) - eps||^2`,
  used as an optional regulariser on real latents.

Reductions are means over the batch, so the scale of a term does not depend
on the batch size and gradient accumulation averages like a bigger batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


class FeedbackLossError(ValueError):
    """Inputs of a feedback loss do not fit together; the message names the dimension or shape."""


def aesthetic_hinge_loss(
    rewards: Mapping[str, Tensor],
    alphas: Mapping[str, float],
    weights: Mapping[str, float],
) -> tuple[Tensor, dict[str, Tensor]]:
    """`L_aes = sum_d w_d * mean_i relu(alpha_d - r_d_i)` and its per-dimension hinge means.

    `weights` names the dimensions that take part (config `decoupled.weights`);
    each needs a reward and an alpha. The returned terms are the *unweighted*
    hinge means, for logging.
    """
    if not weights:
        raise FeedbackLossError("decoupled.weights names no dimension: L_aes would be empty")
    total: Tensor | None = None
    terms: dict[str, Tensor] = {}
    for dim, weight in weights.items():
        if dim not in rewards:
            raise FeedbackLossError(
                f"decoupled.weights names dimension {dim!r} but the reward model scores "
                f"{sorted(rewards)}"
            )
        if dim not in alphas:
            raise FeedbackLossError(f"no alpha for dimension {dim!r} (alphas: {sorted(alphas)})")
        reward = rewards[dim]
        if reward.ndim != 1:
            raise FeedbackLossError(
                f"rewards of {dim!r} must be one per image [N], got shape {tuple(reward.shape)}"
            )
        hinge = F.relu(float(alphas[dim]) - reward.float()).mean()
        terms[dim] = hinge
        weighted = float(weight) * hinge
        total = weighted if total is None else total + weighted
    assert total is not None
    return total, terms


def generator_adversarial_loss(fake_scores: Tensor) -> Tensor:
    """`L_G = -mean r_a(x0', c)`: the generator raises the discriminator's score of its x0'."""
    if fake_scores.ndim != 1:
        raise FeedbackLossError(
            f"discriminator scores must be one per image [N], got {tuple(fake_scores.shape)}"
        )
    return -fake_scores.float().mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """`L_D`: binary cross-entropy, real images labelled 1 and generated x0' labelled 0.

    Each side is averaged over its own images and the two means are added, so
    `L_D = -mean log sigmoid(real) - mean log(1 - sigmoid(fake))` exactly.
    """
    for name, logits in (("real", real_logits), ("fake", fake_logits)):
        if logits.ndim != 1:
            raise FeedbackLossError(
                f"{name} discriminator logits must be one per image [N], got {tuple(logits.shape)}"
            )
    real = real_logits.float()
    fake = fake_logits.float()
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def noise_prediction_mse(noise_pred: Tensor, noise: Tensor) -> Tensor:
    """The diffusion pre-training loss: mean squared error of the predicted noise (in fp32)."""
    if noise_pred.shape != noise.shape:
        raise FeedbackLossError(
            f"noise prediction {tuple(noise_pred.shape)} and noise {tuple(noise.shape)} differ"
        )
    return F.mse_loss(noise_pred.float(), noise.float())
