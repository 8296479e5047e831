"""The toy perceptual model: a small U-shaped fully-convolutional semantic segmenter.

It plays the part of DeepLab / SOLO in perceptual feedback learning: PeFL
decodes the diffusion model's x0 prediction and back-propagates the
segmenter's own training loss (`ToySegmenter.loss`) against the ground-truth
mask into the diffusion model, so the loss is differentiable with respect to
the images. The same model measures generated images (caption-match, layout)
and supplies features for a Frechet distance (`ToySegmenter.features`).

Architecture (width w, any input side divisible by 4)::

    stem   conv-GN-SiLU x2      3 -> w       H
    down1  stride-2 conv, conv  w -> 2w      H/2
    down2  stride-2 conv, dilated conv 2w -> 4w  H/4
    up1    upsample, concat down1, conv x2  -> 2w  H/2
    up0    upsample, concat stem,  conv x2  -> w   H
    head   1x1 conv             w -> classes H
    object_head  linear over the object-pooled [down2 upsampled, up0] features

Learning curve (4000 toy images, batch 32, AdamW 3e-3): colours are right
within ~50 steps, shapes only after ~150-250 steps; by 400-800 steps
held-out object pixels are ~99% right.

Training adds noise, blur, colour jitter and horizontal flips so the model
still reads the blurry, noisy images a young diffusion model produces.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from unifl.io import atomic_directory, write_json
from unifl.models.minibatch import train_on_minibatches
from unifl.toy.world import CLASS_NAMES, NUM_SEMANTIC_CLASSES

SEGMENTER_FORMAT = "unifl-toy-segmenter/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _conv_block(
    in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    groups = math.gcd(out_channels, 8)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
    )


class ToySegmenter(nn.Module):
    """Per-pixel semantic classes of the toy world (class ids of `unifl.toy.world.CLASS_NAMES`).

    Args:
        num_classes: output classes; default 13 (background + 3 shapes x 4 colours).
        width: channels of the full-resolution stage (16: ~0.1 M parameters).
        background_weight: weight of the background class in the cross-entropy
            loss, the others weigh 1; background covers ~85% of a toy image,
            so 0.25 keeps the loss (and PeFL's gradient) on the objects.
    """

    def __init__(
        self,
        num_classes: int = NUM_SEMANTIC_CLASSES,
        width: int = 16,
        background_weight: float = 0.25,
        object_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 2 or width < 4:
            raise ValueError(f"need num_classes >= 2 and width >= 4, got {num_classes}, {width}")
        if background_weight <= 0 or object_weight < 0:
            raise ValueError(
                f"need background_weight > 0 and object_weight >= 0, got "
                f"{background_weight} and {object_weight}"
            )
        self.num_classes = num_classes
        self.width = width
        self.background_weight = background_weight
        self.object_weight = object_weight
        self.stem = _conv_block(3, width)
        self.down1 = _conv_block(width, 2 * width, stride=2)
        self.down2 = _conv_block(2 * width, 4 * width, stride=2, dilation=2)
        self.up1 = _conv_block(6 * width, 2 * width)
        self.up0 = _conv_block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.object_head = nn.Linear(5 * width, num_classes)
        class_weights = torch.ones(num_classes)
        class_weights[0] = background_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    @property
    def feature_dim(self) -> int:
        """Length of `features` vectors: pooled bottleneck (4w) and last decoder stage (w)."""
        return 5 * self.width

    def config(self) -> dict[str, Any]:
        return {
            "format": SEGMENTER_FORMAT,
            "num_classes": self.num_classes,
            "width": self.width,
            "background_weight": self.background_weight,
            "object_weight": self.object_weight,
            "class_names": list(CLASS_NAMES[: self.num_classes])
            if self.num_classes == NUM_SEMANTIC_CLASSES
            else None,
        }

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ValueError(
                f"image height and width must be divisible by 4, got {tuple(images.shape[-2:])}"
            )

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check(images)
        x = images * 2.0 - 1.0
        stem = self.stem(x)
        down1 = self.down1(stem)
        bottleneck = self.down2(down1)
        up1 = self.up1(
            torch.cat([F.interpolate(bottleneck, scale_factor=2.0, mode="nearest"), down1], 1)
        )
        up0 = self.up0(torch.cat([F.interpolate(up1, scale_factor=2.0, mode="nearest"), stem], 1))
        return self.head(up0), bottleneck, up0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, C, H, W] of images [N, 3, H, W] in [0, 1]."""
        return self._run(images)[0]

    def loss(self, images: torch.Tensor, semantic_masks: torch.Tensor) -> torch.Tensor:
        """The training loss against masks [N, H, W]: pixel term + object_weight * object term.

        pixel term: class-weighted per-pixel cross-entropy.
        object term: for every object class present in an image, the feature
        map (last decoder stage and upsampled bottleneck) is averaged over that
        class's pixels and `object_head` must name the class (cross-entropy,
        mean over objects). It judges each object as a whole, like the mask
        classification of SOLO or Mask2Former, so the feedback it gives a
        generator is about whole objects, not only their pixels.

        Differentiable with respect to `images`; this is the loss perceptual
        feedback learning back-propagates into the diffusion model.
        """
        if semantic_masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"semantic masks {tuple(semantic_masks.shape)} do not match images {tuple(images.shape)}"
            )
        masks = semantic_masks.long()
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= self.num_classes):
            raise ValueError(
                f"semantic mask values must lie in [0, {self.num_classes}), "
                f"got {int(masks.min())}..{int(masks.max())}"
            )
        logits, bottleneck, up0 = self._run(images)
        pixel = F.cross_entropy(logits, masks, weight=self.class_weights.to(logits.dtype))
        if self.object_weight == 0:
            return pixel
        return pixel + self.object_weight * self._object_loss(masks, bottleneck, up0)

    def _object_loss(
        self, masks: torch.Tensor, bottleneck: torch.Tensor, up0: torch.Tensor
    ) -> torch.Tensor:
        one_hot = F.one_hot(masks, self.num_classes)[..., 1:].to(up0.dtype)  # [N, H, W, K]
        pixels = one_hot.sum(dim=(1, 2))  # [N, K]
        scale = up0.shape[-1] // bottleneck.shape[-1]
        feature_map = torch.cat(
            [F.interpolate(bottleneck, scale_factor=float(scale), mode="nearest"), up0], dim=1
        )
        pooled = torch.einsum("nchw,nhwk->nkc", feature_map, one_hot)
        present = pixels > 0
        if not bool(present.any()):
            return feature_map.sum() * 0.0
        object_features = pooled[present] / pixels[present].unsqueeze(-1)
        targets = torch.arange(1, self.num_classes, device=masks.device).expand_as(pixels)[present]
        return F.cross_entropy(self.object_head(object_features), targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class per pixel, long [N, H, W]."""
        return self(images).argmax(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [N, 5w]: bottleneck and last decoder stage, averaged over the image.

        The same feature map the object term pools over objects, here pooled
        over the whole image (for a Frechet distance between image sets).
        """
        _, bottleneck, up0 = self._run(images)
        return torch.cat([bottleneck.mean(dim=(2, 3)), up0.mean(dim=(2, 3))], dim=1)

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors; the directory appears whole or not at all."""
        with atomic_directory(directory) as tmp:
            state = {
                name: tensor.detach().cpu().contiguous()
                for name, tensor in self.state_dict().items()
            }
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": SEGMENTER_FORMAT})
            write_json(tmp / CONFIG_NAME, self.config())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ToySegmenter:
        """Load a segmenter saved by `save`, in eval mode."""
        root = Path(directory)
        config_path = root / CONFIG_NAME
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{config_path}: no toy segmenter config here") from None
        if config.get("format") != SEGMENTER_FORMAT:
            raise ValueError(
                f"{config_path}: 'format' must be {SEGMENTER_FORMAT!r}, got {config.get('format')!r}"
            )
        try:
            model = cls(
                config["num_classes"],
                config["width"],
                config["background_weight"],
                config["object_weight"],
            )
        except KeyError as exc:
            raise ValueError(f"{config_path}: missing field {exc.args[0]!r}") from None
        weights_path = root / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: missing segmenter weights")
        try:
            model.load_state_dict(load_file(str(weights_path)))
        except RuntimeError as exc:
            raise ValueError(f"{weights_path}: weights do not fit {config_path}: {exc}") from None
        return model.to(device).eval()


# ----------------------------------------------------------------------------- data helpers


def as_image_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float [N, 3, H, W] in [0, 1] from that, or from uint8 numpy [N, H, W, 3]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"numpy images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        return torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2).contiguous()
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"image tensors must be float [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    return images


def as_mask_tensor(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Long [N, H, W] from a numpy array or tensor of class ids."""
    tensor = torch.from_numpy(np.asarray(masks)) if isinstance(masks, np.ndarray) else masks
    if tensor.ndim != 3:
        raise ValueError(f"semantic masks must be [N, H, W], got shape {tuple(tensor.shape)}")
    return tensor.long()


# ----------------------------------------------------------------------------- augmentation


def _gaussian_kernels(sigmas: torch.Tensor, radius: int = 2) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, colour jitter, blur and noise of a batch (masks follow the flips).

    Strengths (per image): horizontal flip p=0.5; brightness +-0.1, contrast
    x[0.75, 1.25], per-channel gain x[0.9, 1.1]; Gaussian blur sigma in
    [0.3, 1.2] with p=0.5; Gaussian noise std in [0, 0.1] with p=0.5.
    """
    count = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=generator)

    flip = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None], masks.flip(-1), masks)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(0.75, 1.25, 1, 1, 1)
    brightness = uniform(-0.1, 0.1, 1, 1, 1)
    gain = uniform(0.9, 1.1, 3, 1, 1)
    images = ((images - mean) * contrast + mean + brightness) * gain

    blur = torch.rand(count, generator=generator) < 0.5
    kernels = _gaussian_kernels(uniform(0.3, 1.2)).repeat_interleave(3, dim=0)  # [N*3, 5]
    channels = images.reshape(1, count * 3, *images.shape[-2:])
    blurred = F.conv2d(
        F.pad(channels, (2, 2, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=count * 3
    )
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, 2, 2), mode="replicate"), kernels[:, None, :, None], groups=count * 3
    )
    images = torch.where(blur[:, None, None, None], blurred.reshape_as(images), images)

    noisy = (torch.rand(count, generator=generator) < 0.5).float()
    noise_std = uniform(0.0, 0.1, 1, 1, 1) * noisy[:, None, None, None]
    images = images + noise_std * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0), masks


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate_segmenter(
    model: ToySegmenter,
    images: torch.Tensor | np.ndarray,
    semantic_masks: torch.Tensor | np.ndarray,
    batch_size: int = 256,
) -> dict[str, float]:
    """Pixel accuracy, accuracy on object pixels and on background, mean IoU of object classes.

    Mean IoU averages the object classes that occur in the masks or the predictions.
    """
    images = as_image_tensor(images)
    masks = as_mask_tensor(semantic_masks)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(model.num_classes, model.num_classes, dtype=torch.long)
    for start in range(0, images.shape[0], batch_size):
        predicted = model.predict(images[start : start + batch_size].to(device)).cpu()
        target = masks[start : start + batch_size]
        confusion += torch.bincount(
            (target * model.num_classes + predicted).flatten(), minlength=model.num_classes**2
        ).view(model.num_classes, model.num_classes)
    model.train(was_training)
    correct = confusion.diag().float()
    total = confusion.sum().clamp_min(1)
    object_total = confusion[1:].sum().clamp_min(1)
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    seen = union[1:] > 0
    iou = correct[1:][seen] / union[1:][seen].float()
    return {
        "pixel_accuracy": float(correct.sum() / total),
        "object_pixel_accuracy": float(correct[1:].sum() / object_total),
        "background_accuracy": float(correct[0] / confusion[0].sum().clamp_min(1)),
        "mean_iou": float(iou.mean()) if iou.numel() else 0.0,
    }


def train_segmenter(
    images: torch.Tensor | np.ndarray,
    semantic_masks: torch.Tensor | np.ndarray,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    width: int = 16,
    augment: bool = True,
    eval_images: torch.Tensor | np.ndarray | None = None,
    eval_masks: torch.Tensor | np.ndarray | None = None,
) -> tuple[ToySegmenter, dict[str, float]]:
    """Train a `ToySegmenter` from scratch on (images, semantic masks) with AdamW.

    Deterministic for a seed (initialisation, batches and augmentation use
    their own generators; the global RNG is left as it was). Returns the model
    in eval mode and metrics: final_loss (mean of the last 10% of steps),
    seconds, images_per_second, `evaluate_segmenter` on the first 512
    training images (prefix ``train_``) and, when evaluation data is given,
    on it (prefix ``eval_``).
    """
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"need steps >= 0, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}"
        )
    images = as_image_tensor(images)
    masks = as_mask_tensor(semantic_masks)
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"semantic masks {tuple(masks.shape)} do not match images {tuple(images.shape)}"
        )
    if int(masks.max()) >= NUM_SEMANTIC_CLASSES or int(masks.min()) < 0:
        raise ValueError(f"semantic mask values must lie in [0, {NUM_SEMANTIC_CLASSES})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToySegmenter(NUM_SEMANTIC_CLASSES, width)
    generator = torch.Generator().manual_seed(seed)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        batch_images, batch_masks = images[index], masks[index]
        if augment:
            batch_images, batch_masks = augment_batch(batch_images, batch_masks, generator)
        return model.loss(batch_images, batch_masks)

    model.train()
    metrics = train_on_minibatches(
        model.parameters(),
        loss_of,
        images.shape[0],
        steps,
        batch_size,
        lr,
        weight_decay=1e-4,
        generator=generator,
        description="toy segmenter",
        progress=progress,
    )
    model.eval()
    seconds = metrics["seconds"]
    metrics["images_per_second"] = steps * batch_size / seconds if seconds > 0 else 0.0
    train_metrics = evaluate_segmenter(model, images[:512], masks[:512])
    metrics.update({f"train_{k}": v for k, v in train_metrics.items()})
    if eval_images is not None and eval_masks is not None:
        eval_metrics = evaluate_segmenter(model, eval_images, eval_masks)
        metrics.update({f"eval_{k}": v for k, v in eval_metrics.items()})
    return model, metrics
