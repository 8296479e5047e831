"""CLIP score: image-text agreement measured by a CLIP model.

Convention (as in torchmetrics and most papers since Hessel et al. 2021):
`score = 100 * max(cos(E_image, E_text), 0)` per image, averaged over a set.
The UniFL paper's table prints the cosine itself (e.g. 0.308 for SD1.5 with
ViT-B/32): divide by 100 to compare. Only meaningful with a trained CLIP;
tests use a tiny random one to check the arithmetic, not the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unifl.feedback.perceptual import ImagePreprocessing, load_image_processor

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ClipScoreError(ValueError):
    """Images and prompts do not match, or the CLIP model lacks what the score needs."""


def _features(output: Any) -> Tensor:
    """`get_*_features` returns a tensor in older transformers, an output object in newer."""
    return output if isinstance(output, Tensor) else output.pooler_output


def cosine_to_clip_score(cosine: Tensor) -> Tensor:
    """100 * max(cos, 0): the CLIP-score convention."""
    return 100.0 * cosine.clamp(min=0.0)


@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and (torch) image preprocessing."""

    model: torch.nn.Module
    tokenizer: Any
    preprocessing: ImagePreprocessing

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: Any) -> ClipScorer:
        """`processor`: a CLIPProcessor (tokenizer + image processor) or a tokenizer alone.

        With a tokenizer alone the image size comes from the model's vision config
        and the statistics are CLIP's.
        """
        model.eval().requires_grad_(False)
        tokenizer = getattr(processor, "tokenizer", None) or processor
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None:
            preprocessing = ImagePreprocessing.from_processor(image_processor)
        else:
            size = int(model.config.vision_config.image_size)
            preprocessing = ImagePreprocessing(
                mean=CLIP_MEAN, std=CLIP_STD, size=size, crop=(size, size), mode="bicubic"
            )
        return cls(model, tokenizer, preprocessing)

    @classmethod
    def from_pretrained(cls, source: str | Path, revision: str | None = None) -> ClipScorer:
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(str(source), revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(str(source), revision=revision)
        image_processor = load_image_processor(source, revision)
        scorer = cls.from_model(model, tokenizer)
        if image_processor is not None:
            scorer.preprocessing = ImagePreprocessing.from_processor(image_processor)
        return scorer

    def _max_length(self) -> int:
        text_config = getattr(self.model.config, "text_config", None)
        limits = [getattr(text_config, "max_position_embeddings", None)]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        return min(int(x) for x in limits if x is not None and int(x) < 1_000_000)

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: Sequence[str], batch_size: int = 32) -> Tensor:
        """cos(E_image, E_text) per image/prompt pair, float32 on CPU."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ClipScoreError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        if images.shape[0] != len(prompts):
            raise ClipScoreError(f"{images.shape[0]} images but {len(prompts)} prompts")
        parameter = next(iter(self.model.parameters()))
        cosines = []
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            tokens = self.tokenizer(
                batch_prompts,
                padding=True,
                truncation=True,
                max_length=self._max_length(),
                return_tensors="pt",
            ).to(parameter.device)
            text = _features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
                )
            )
            pixels = self.preprocessing(images[start : start + batch_size].to(parameter.device))
            image = _features(
                self.model.get_image_features(pixel_values=pixels.to(parameter.dtype))
            )
            cosines.append(F.cosine_similarity(image.float(), text.float(), dim=-1).cpu())
        return torch.cat(cosines)

    def __call__(self, images: Tensor, prompts: Sequence[str], batch_size: int = 32) -> Tensor:
        """CLIP score per image (100 * max(cos, 0))."""
        return cosine_to_clip_score(self.cosine(images, prompts, batch_size))


def clip_score(
    clip_model: torch.nn.Module,
    processor: Any,
    images: Tensor,
    prompts: Sequence[str],
    batch_size: int = 32,
) -> Tensor:
    """CLIP score per image, `100 * max(cos, 0)`; average it for the set's score."""
    return ClipScorer.from_model(clip_model, processor)(images, prompts, batch_size)
