"""Fréchet distance between two image sets in the feature space of a pluggable extractor.

FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}), the Fréchet (Wasserstein-2)
distance between two Gaussians fitted to the features. With Inception-v3
features this is FID; here the extractor is any callable images -> [N, D]:
the toy segmenter's `.features` in the toy world, a transformers vision
backbone (`BackboneFeatureExtractor`) in production. Values from different
extractors are not comparable with each other or with published FIDs.

Numerics: the trace of the matrix square root is computed from the
eigenvalues of the symmetric product `S_a^{1/2} S_b S_a^{1/2}` (same spectrum as
`S_a S_b`, but symmetric positive semi-definite, so no complex parts and no
failure on singular matrices, unlike a general `sqrtm`). With fewer samples
than feature dimensions the covariances are singular; `eps` is added to their
diagonals so the result stays finite and continuous. It biases FD by O(eps * D).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unifl.feedback.perceptual import ImagePreprocessing, load_image_processor

FeatureExtractor = Callable[[Tensor], Tensor]
"""Images [N, 3, H, W] in [0, 1] -> features [N, D] (anything that flattens to it)."""

DEFAULT_EPS = 1e-6


class FrechetError(ValueError):
    """Features cannot give a Fréchet distance (too few samples, shapes differ, NaNs)."""


def _as_float64(features: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else features
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise FrechetError(f"{name}: features must be [N, D], got shape {list(array.shape)}")
    if array.shape[0] < 2:
        raise FrechetError(
            f"{name}: need at least 2 samples for a covariance, got {array.shape[0]}"
        )
    if not np.isfinite(array).all():
        raise FrechetError(f"{name}: features contain NaN or inf")
    return array


def gaussian_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    array = _as_float64(features, "features")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((S_a S_b)^{1/2}) for symmetric positive semi-definite S_a, S_b."""
    root_a = _symmetric_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance_from_statistics(
    mean_a: np.ndarray,
    cov_a: np.ndarray,
    mean_b: np.ndarray,
    cov_b: np.ndarray,
    eps: float = DEFAULT_EPS,
) -> float:
    """Fréchet distance of N(mean_a, cov_a) and N(mean_b, cov_b); `eps` is added to both diagonals."""
    mean_a, mean_b = np.atleast_1d(mean_a), np.atleast_1d(mean_b)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape:
        raise FrechetError(f"feature dimensions differ: {mean_a.shape[0]} and {mean_b.shape[0]}")
    offset = eps * np.eye(cov_a.shape[0])
    cov_a, cov_b = cov_a + offset, cov_b + offset
    difference = mean_a - mean_b
    value = difference @ difference + np.trace(cov_a) + np.trace(cov_b)
    value -= 2.0 * trace_sqrt_product(cov_a, cov_b)
    # Rounding can leave a tiny negative value for identical distributions.
    return float(max(value, 0.0))


def frechet_distance(
    features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray, eps: float = DEFAULT_EPS
) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    array_a = _as_float64(features_a, "features_a")
    array_b = _as_float64(features_b, "features_b")
    if array_a.shape[1] != array_b.shape[1]:
        raise FrechetError(f"feature dimensions differ: {array_a.shape[1]} and {array_b.shape[1]}")
    mean_a, cov_a = gaussian_statistics(array_a)
    mean_b, cov_b = gaussian_statistics(array_b)
    return frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, eps)


def callable_device(function: Any) -> torch.device | None:
    """The device of the module behind `function` (a module or a bound method), if any."""
    owner = getattr(function, "__self__", function)
    if isinstance(owner, torch.nn.Module):
        for parameter in owner.parameters():
            return parameter.device
    return None


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 64) -> Tensor:
    """Features [N, D] (float32, CPU) of images [N, 3, H, W], computed in batches.

    Images are moved to the extractor's device when it is a module or a method
    of one (e.g. `segmenter.features`)."""
    if images.shape[0] == 0:
        raise FrechetError("no images to extract features from")
    device = callable_device(extractor)
    batches = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        features = extractor(batch.to(device) if device is not None else batch)
        batches.append(features.reshape(features.shape[0], -1).float().cpu())
    return torch.cat(batches)


def preprocessing_from_config(config: Any, image_size: int | None = None) -> ImagePreprocessing:
    """Preprocessing for a checkpoint saved without an image processor.

    Transformer backbones (ViT, CLIP) accept only their configured input size,
    so images are resized to `image_size` or the config's (square); CNNs
    without one keep the input size. CLIP checkpoints get CLIP's statistics,
    others ImageNet's.
    """
    vision_config = getattr(config, "vision_config", None) or config
    size = image_size or getattr(vision_config, "image_size", None)
    if getattr(config, "model_type", "") in ("clip", "clip_vision_model"):
        from unifl.evaluation.clip_score import CLIP_MEAN, CLIP_STD

        return ImagePreprocessing(
            mean=CLIP_MEAN, std=CLIP_STD, size=(size, size) if size else None, mode="bicubic"
        )
    return ImagePreprocessing(size=(int(size), int(size)) if size else None)


class BackboneFeatureExtractor(torch.nn.Module):
    """Pooled features of a transformers vision model (production Fréchet features).

    Uses `get_image_features` when the model has it (CLIP-style models: the
    projected image embedding), otherwise `pooler_output`, otherwise the mean
    of `last_hidden_state` over positions. Preprocessing follows the model's
    image processor (resize, crop, normalise), in torch.
    """

    def __init__(self, model: torch.nn.Module, preprocessing: ImagePreprocessing) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocessing = preprocessing

    @classmethod
    def from_pretrained(
        cls, source: str | Path, revision: str | None = None, image_size: int | None = None
    ) -> BackboneFeatureExtractor:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(source), revision=revision)
        processor = load_image_processor(source, revision)
        if processor is not None:
            return cls(model, ImagePreprocessing.from_processor(processor, image_size))
        return cls(model, preprocessing_from_config(model.config, image_size))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        dtype = next(iter(self.model.parameters())).dtype
        pixel_values = self.preprocessing(images).to(dtype)
        if hasattr(self.model, "get_image_features"):
            output: Any = self.model.get_image_features(pixel_values=pixel_values)
            pooled = output if isinstance(output, Tensor) else output.pooler_output
        else:
            output = self.model(pixel_values=pixel_values)
            pooled = getattr(output, "pooler_output", None)
            if pooled is None:
                hidden = output.last_hidden_state
                pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)
        return pooled.reshape(pooled.shape[0], -1).float()
