"""The toy world's pretrained CLIP: the reward models' backbone, as OpenAI's CLIP is in production.

Production reward models put their heads on a CLIP that contrastive training
on image-caption pairs has already taught which words go with which pixels.
A random toy CLIP has to learn all of that from a few hundred preference
pairs. So the bootstrap pretrains the tiny CLIP (`unifl.models.reward.toy_clip_config`)
the same way on the toy training images and their captions, and saves it as
a CLIP checkpoint directory that `load_pretrained_reward_backbone` loads like
any hub model. On the same labels the detail head generalises clearly better
from it and the layout head a little (`benchmarks/reward_backbone.py`).

Loss: the symmetric InfoNCE of CLIP over a batch's image-caption similarity
matrix, with one change for the toy world: its grammar repeats captions
("a red circle" is drawn many times), so every caption in the batch equal to
an image's own is a positive of that image, with the target probability
shared equally among them (`contrastive_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unifl.models.minibatch import train_on_minibatches

MAX_LOGIT_SCALE = 100.0
"""CLIP clamps its learned temperature so that logits stay at most 100 times the cosine."""


def caption_targets(captions: Sequence[str]) -> torch.Tensor:
    """[N, N] target distribution: row i spread equally over the captions equal to caption i."""
    index = {caption: number for number, caption in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[caption] for caption in captions])
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    captions: Sequence[str],
    logit_scale: torch.Tensor | float,
    negative_text_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised embeddings, equal captions counted as positives.

    `logits = s * normalize(I) @ normalize(T)^T` with `s = min(logit_scale, 100)`
    (the scale itself, not its logarithm); the loss is the mean of the
    cross-entropies of the rows (image to captions) and of the columns
    (caption to images) against `caption_targets(captions)`.

    `negative_text_embeds` [M, P] are hard negatives (NegCLIP): captions that
    match none of the images, appended to every image's row as further wrong
    captions; the caption-to-image direction does not see them.
    """
    if not image_embeds.shape[0] == text_embeds.shape[0] == len(captions):
        raise ValueError(
            f"{image_embeds.shape[0]} images, {text_embeds.shape[0]} texts and "
            f"{len(captions)} captions: give one of each per example"
        )
    scale = torch.as_tensor(logit_scale, dtype=image_embeds.dtype).clamp(max=MAX_LOGIT_SCALE)
    images = F.normalize(image_embeds, dim=-1)
    logits = scale * images @ F.normalize(text_embeds, dim=-1).T
    targets = caption_targets(captions).to(logits.device, logits.dtype)
    to_captions, caption_targets_of_images = logits, targets
    if negative_text_embeds is not None:
        negatives = scale * images @ F.normalize(negative_text_embeds, dim=-1).T
        to_captions = torch.cat([logits, negatives], dim=1)
        caption_targets_of_images = torch.cat([targets, torch.zeros_like(negatives)], dim=1)
    return 0.5 * (
        F.cross_entropy(to_captions, caption_targets_of_images) + F.cross_entropy(logits.T, targets)
    )


def retrieval_accuracy(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str]
) -> tuple[float, float]:
    """Image-to-caption top-1 accuracy over the given set, and its chance level.

    An image counts as right when its most similar caption equals its own
    (a repeated caption is right wherever it sits). Chance: the mean share of
    the set's captions equal to an image's own.
    """
    similarity = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    same = caption_targets(captions) > 0
    best = similarity.argmax(dim=1)
    accuracy = same[torch.arange(len(captions)), best].float().mean().item()
    chance = same.float().mean(dim=1).mean().item()
    return accuracy, chance


def train_toy_clip(
    images: torch.Tensor,
    captions: Sequence[str],
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    eval_images: torch.Tensor | None = None,
    eval_captions: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[Any, Any, dict[str, float]]:
    """Pretrain the tiny toy CLIP contrastively on images in [0, 1] and their captions.

    Returns (CLIPModel in eval mode, its tokenizer, metrics): final_loss (mean of
    the last 10% of steps), seconds, and the image-to-caption retrieval
    accuracy with its chance level on the evaluation set when one is given
    (`eval_retrieval`, `eval_retrieval_chance`), the same for the random
    initialisation (`eval_retrieval_init`). Deterministic for a seed.
    """
    from unifl.models.reward import build_toy_reward_model

    if steps < 1 or batch_size < 2 or learning_rate <= 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 2, learning_rate > 0; "
            f"got {steps}, {batch_size}, {learning_rate}"
        )
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    # The reward model's wrapper holds the preprocessing and the encoders the heads will use.
    wrapper = build_toy_reward_model(image_size=images.shape[-1], seed=seed, head_hidden_dim=1)
    clip = wrapper.backbone
    captions = list(captions)

    def embed(batch_images: torch.Tensor, batch_captions: list[str]):
        tokens = wrapper.tokenize(batch_captions)
        return (
            wrapper.encode_images(batch_images),
            wrapper.encode_text(tokens["input_ids"], tokens["attention_mask"]),
        )

    def evaluate() -> tuple[float, float]:
        clip.eval()
        with torch.no_grad():
            return retrieval_accuracy(*embed(eval_images, eval_captions), eval_captions)

    metrics: dict[str, float] = {}
    evaluating = eval_images is not None and eval_captions is not None
    if evaluating:
        eval_captions = list(eval_captions)
        metrics["eval_retrieval_init"] = evaluate()[0]

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        batch_captions = [captions[i] for i in index.tolist()]
        image_embeds, text_embeds = embed(images[index], batch_captions)
        return contrastive_loss(image_embeds, text_embeds, batch_captions, clip.logit_scale.exp())

    clip.train()
    metrics.update(
        train_on_minibatches(
            clip.parameters(),
            loss_of,
            images.shape[0],
            steps,
            batch_size,
            learning_rate,
            weight_decay=0.01,
            generator=torch.Generator().manual_seed(seed),
            description="toy CLIP",
            progress=progress,
        )
    )
    if evaluating:
        metrics["eval_retrieval"], metrics["eval_retrieval_chance"] = evaluate()
    clip.eval()
    return clip, wrapper.tokenizer, metrics


def save_toy_clip(clip: Any, tokenizer: Any, directory: str | Path) -> None:
    """A CLIP checkpoint directory: model, tokenizer and image processor (size, mean, std)."""
    from transformers import CLIPImageProcessor

    from unifl.models.reward import CLIP_MEAN, CLIP_STD

    directory = Path(directory)
    clip.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = int(clip.config.vision_config.image_size)
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(directory)
