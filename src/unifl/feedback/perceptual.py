"""Perceptual models for perceptual feedback learning (PeFL).

PeFL scores the decoded x0 prediction of the diffusion model with a *frozen*
perceptual model `m` and that model's own training loss against the ground
truth of the real image: `L_pefl = lambda * Phi(m(x0'), GT)`. Any model with a
loss that is differentiable with respect to the input pixels fits the slot, so
everything here implements one small interface, `PerceptualLoss`:

    loss = perceptual_loss(images, annotations)

* `images`: Tensor[N, 3, H, W] with values in [0, 1] (what the VAE decode gives).
* `annotations`: a mapping with the ground truth each model needs, under the
  keys below (`SEMANTIC_MASKS`, `INSTANCE_MASKS`, ...).
* the result is a scalar tensor whose gradient reaches `images` and never the
  perceptual model (its parameters have `requires_grad=False` and it stays in
  eval mode, so dropout and batch-norm statistics do not move either).

Implementations: `SemanticSegmentationLoss` (per-pixel cross-entropy of any
transformers semantic-segmentation model, the paper's layout model),
`InstanceSegmentationLoss` (Mask2Former with its own Hungarian-matched loss,
the paper's structure slot), `StyleGramLoss` (Gram matrices of CNN features,
the paper's style model), `ToySegmenterLoss` (the toy world's segmenter) and
`CombinedPerceptualLoss` (a weighted sum, e.g. structure + style).
`build_perceptual_loss` builds them from the `pefl.perceptual` configuration.

Preprocessing (resize, normalise) is done in torch, not with the image
processors of transformers, because those work on numpy/PIL and would cut the
gradient; the processor is read only for its mean, std and size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from unifl.config import PerceptualModelConfig

SEMANTIC_MASKS = "semantic_masks"
"""LongTensor[N, H, W] of class ids in the perceptual model's label space; 255 = ignore."""
INSTANCE_MASKS = "instance_masks"
"""List (one entry per image) of Tensor[K_i, H, W] binary masks, one per object."""
INSTANCE_CLASSES = "instance_classes"
"""List (one entry per image) of LongTensor[K_i]: the class id of each instance mask."""
STYLE_IMAGES = "style_images"
"""Tensor[N or 1, 3, H', W'] in [0, 1]: the style reference image(s); one is broadcast."""

IGNORE_INDEX = 255
"""Mask value that takes no part in the loss (COCO-Stuff / ADE convention)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Annotations = Mapping[str, Any]


class PerceptualLossError(ValueError):
    """Images or annotations given to a perceptual loss have the wrong shape or values."""


def freeze(module: nn.Module) -> nn.Module:
    """Put `module` in eval mode with no trainable parameters; return it."""
    module.eval()
    module.requires_grad_(False)
    return module


def check_images(images: Tensor, owner: str) -> None:
    """Raise a `PerceptualLossError` unless `images` is a float Tensor[N, 3, H, W]."""
    if not isinstance(images, Tensor):
        raise PerceptualLossError(f"{owner}: images must be a Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise PerceptualLossError(
            f"{owner}: images must have shape [N, 3, H, W], got {list(images.shape)}"
        )
    if not images.is_floating_point():
        raise PerceptualLossError(f"{owner}: images must be floating point in [0, 1]")


@dataclass(frozen=True)
class ImagePreprocessing:
    """Differentiable resize, centre crop and normalisation of images in [0, 1].

    `size` is either `(height, width)` or an int, the length of the shortest
    edge (aspect ratio kept); None keeps the input size. `size_divisor` rounds
    the resized height and width up to a multiple (Mask2Former needs 32).
    `crop` is an optional centre crop `(height, width)` after the resize.
    `flip_channels` gives the model BGR (MobileViT / DeepLabV3 checkpoints).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size: tuple[int, int] | int | None = None
    size_divisor: int = 1
    crop: tuple[int, int] | None = None
    mode: str = "bilinear"
    flip_channels: bool = False

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) that `resize` gives for an input of this size."""
        if self.size is None:
            out_h, out_w = height, width
        elif isinstance(self.size, int):
            scale = self.size / min(height, width)
            out_h, out_w = round(height * scale), round(width * scale)
        else:
            out_h, out_w = self.size
        if self.size_divisor > 1:
            out_h = math.ceil(out_h / self.size_divisor) * self.size_divisor
            out_w = math.ceil(out_w / self.size_divisor) * self.size_divisor
        return out_h, out_w

    def resize(self, images: Tensor) -> Tensor:
        out_h, out_w = self.output_size(images.shape[-2], images.shape[-1])
        if (out_h, out_w) != tuple(images.shape[-2:]):
            downsampling = out_h < images.shape[-2] or out_w < images.shape[-1]
            images = F.interpolate(
                images,
                size=(out_h, out_w),
                mode=self.mode,
                align_corners=False,
                antialias=downsampling,
            )
        if self.crop is not None:
            crop_h, crop_w = self.crop
            top = max((images.shape[-2] - crop_h) // 2, 0)
            left = max((images.shape[-1] - crop_w) // 2, 0)
            images = images[..., top : top + crop_h, left : left + crop_w]
        return images

    def __call__(self, images: Tensor) -> Tensor:
        images = self.resize(images)
        if self.flip_channels:
            images = images.flip(-3)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    @classmethod
    def from_processor(
        cls, processor: Any | None, image_size: int | tuple[int, int] | None = None
    ) -> ImagePreprocessing:
        """Read mean, std, size, size divisor and crop from a transformers image processor.

        Missing attributes fall back to ImageNet statistics and the input size.
        A processor that does not normalise (`do_normalize` False or None, as MobileViT's)
        gives mean 0 and std 1; `do_flip_channel_order` gives `flip_channels`.
        `image_size` overrides the processor's size (e.g. to keep a small
        input small instead of upsampling it to 512 px).
        """
        if processor is not None and hasattr(processor, "image_processor"):
            processor = processor.image_processor
        mean: tuple[float, ...] = IMAGENET_MEAN
        std: tuple[float, ...] = IMAGENET_STD
        size: tuple[int, int] | int | None = None
        crop: tuple[int, int] | None = None
        size_divisor = 1
        flip_channels = False
        if processor is not None:
            if getattr(processor, "image_mean", None) is not None:
                mean = _three(processor.image_mean)
            if getattr(processor, "image_std", None) is not None:
                std = _three(processor.image_std)
            if not getattr(processor, "do_normalize", True):
                mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            flip_channels = bool(getattr(processor, "do_flip_channel_order", False))
            size = _size_of(getattr(processor, "size", None))
            if getattr(processor, "do_center_crop", False):
                crop_size = _size_of(getattr(processor, "crop_size", None))
                if isinstance(crop_size, tuple):
                    crop = crop_size
            size_divisor = int(getattr(processor, "size_divisor", None) or 1)
        if image_size is not None:
            size = image_size if isinstance(image_size, int) else tuple(image_size)  # type: ignore[assignment]
            crop = None
        return cls(
            mean=mean,
            std=std,
            size=size,
            size_divisor=size_divisor,
            crop=crop,
            flip_channels=flip_channels,
        )


def _three(value: Any) -> tuple[float, ...]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    return tuple(values)


def _size_of(size: Any) -> tuple[int, int] | int | None:
    """A processor's `size` (dict, SizeDict or int) as (h, w), a shortest edge, or None."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    height, width = size.get("height"), size.get("width")
    if height and width:
        return int(height), int(width)
    shortest = size.get("shortest_edge")
    return int(shortest) if shortest else None


def load_image_processor(source: str | Path, revision: str | None = None) -> Any | None:
    """The image processor saved with a checkpoint, or None when it has none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(source), revision=revision)
    except (OSError, ValueError):
        return None


class PerceptualLoss(nn.Module, ABC):
    """A frozen perceptual model and its own loss against ground-truth annotations.

    Call it as `loss = perceptual_loss(images, annotations)`. Subclasses set
    `required_annotations` (checked before any compute, so a missing key is a
    clear error instead of a KeyError deep inside) and implement `compute`.
    The wrapped models are frozen on construction and stay in eval mode even
    when a trainer calls `.train()` on a module that contains this one.
    """

    required_annotations: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        for module in self.children():
            module.eval()
        return self

    def forward(self, images: Tensor, annotations: Annotations) -> Tensor:
        check_images(images, type(self).__name__)
        missing = [key for key in self.required_annotations if key not in annotations]
        if missing:
            raise PerceptualLossError(
                f"{type(self).__name__} needs annotation(s) {missing}; "
                f"got keys {sorted(annotations)}"
            )
        return self.compute(images, annotations)

    @abstractmethod
    def compute(self, images: Tensor, annotations: Annotations) -> Tensor:
        """The scalar loss; `images` and the required keys are already checked."""

    def _model_dtype(self, module: nn.Module) -> torch.dtype:
        for parameter in module.parameters():
            return parameter.dtype
        return torch.float32


def _semantic_masks(annotations: Annotations, images: Tensor, owner: str) -> Tensor:
    masks = annotations[SEMANTIC_MASKS]
    if not isinstance(masks, Tensor):
        raise PerceptualLossError(f"{owner}: '{SEMANTIC_MASKS}' must be a Tensor[N, H, W]")
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != images.shape[0]:
        raise PerceptualLossError(
            f"{owner}: '{SEMANTIC_MASKS}' must have shape [N={images.shape[0]}, H, W], "
            f"got {list(masks.shape)}"
        )
    if masks.is_floating_point():
        raise PerceptualLossError(f"{owner}: '{SEMANTIC_MASKS}' must hold integer class ids")
    return masks.long().to(images.device)


def masked_cross_entropy(logits: Tensor, masks: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean per-pixel cross-entropy over the pixels whose label is not `ignore_index`.

    Logits are bilinearly resized to the mask size first (segmentation heads
    predict at a fraction of the input resolution). With no labelled pixel at
    all the loss is 0 (still connected to the graph) rather than NaN, so one
    unlabelled image cannot poison a training step.
    """
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    num_classes = logits.shape[1]
    valid = masks != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    out_of_range = valid & ((masks < 0) | (masks >= num_classes))
    if bool(out_of_range.any()):
        bad = int(masks[out_of_range][0])
        raise PerceptualLossError(
            f"'{SEMANTIC_MASKS}' holds class id {bad}, outside [0, {num_classes}) of the model "
            f"(use {ignore_index} for pixels to ignore)"
        )
    return F.cross_entropy(logits.float(), masks, ignore_index=ignore_index)


class SemanticSegmentationLoss(PerceptualLoss):
    """Per-pixel cross-entropy of a transformers semantic-segmentation model.

    Works with any model whose output has `.logits` of shape [N, classes, h, w]
    (SegFormer, DPT, UperNet, MobileViT/DeepLabV3, BEiT, ...). Mask class ids
    must be in the model's label space; `ignore_index` pixels do not count.
    """

    required_annotations = (SEMANTIC_MASKS,)

    def __init__(
        self,
        model: nn.Module,
        preprocessing: ImagePreprocessing | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.model = freeze(model)
        self.preprocessing = preprocessing or ImagePreprocessing()
        self.ignore_index = ignore_index

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        revision: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> SemanticSegmentationLoss:
        """Load a checkpoint (directory or hub id) and its image processor's statistics."""
        from transformers import AutoModelForSemanticSegmentation

        model = AutoModelForSemanticSegmentation.from_pretrained(str(source), revision=revision)
        processor = load_image_processor(source, revision)
        # The label maps cover the whole image: a centre crop would misalign them.
        preprocessing = replace(ImagePreprocessing.from_processor(processor, image_size), crop=None)
        return cls(model, preprocessing, ignore_index)

    def logits(self, images: Tensor) -> Tensor:
        pixel_values = self.preprocessing(images).to(self._model_dtype(self.model))
        return self.model(pixel_values=pixel_values).logits

    def compute(self, images: Tensor, annotations: Annotations) -> Tensor:
        masks = _semantic_masks(annotations, images, type(self).__name__)
        return masked_cross_entropy(self.logits(images), masks, self.ignore_index)


def instance_targets_from_maps(
    instance_maps: Tensor, semantic_maps: Tensor, class_offset: int = 0
) -> dict[str, list[Tensor]]:
    """`INSTANCE_MASKS` / `INSTANCE_CLASSES` from label maps, the way toy data stores them.

    `instance_maps` [N, H, W] number the objects of each image 1..k (0 is
    background); each object's class is the most frequent `semantic_maps`
    value under it, minus `class_offset` (1 maps the toy classes, whose 0 is
    background, onto a model that has no background class).
    """
    if instance_maps.shape != semantic_maps.shape or instance_maps.ndim != 3:
        raise PerceptualLossError(
            f"instance and semantic maps must both be [N, H, W], got {list(instance_maps.shape)} "
            f"and {list(semantic_maps.shape)}"
        )
    masks, classes = [], []
    for instance_map, semantic_map in zip(instance_maps.long(), semantic_maps.long(), strict=True):
        ids = [int(i) for i in torch.unique(instance_map) if int(i) != 0]
        image_masks = [instance_map == i for i in ids]
        image_classes = [
            int(torch.mode(semantic_map[mask]).values) - class_offset for mask in image_masks
        ]
        if any(value < 0 for value in image_classes):
            raise PerceptualLossError(
                f"an instance lies on semantic class {min(image_classes) + class_offset}, below "
                f"class_offset {class_offset}"
            )
        shape = instance_map.shape
        masks.append(torch.stack(image_masks).float() if ids else torch.zeros(0, *shape))
        classes.append(torch.tensor(image_classes, dtype=torch.long))
    return {INSTANCE_MASKS: masks, INSTANCE_CLASSES: classes}


class InstanceSegmentationLoss(PerceptualLoss):
    """Mask2Former's own loss (Hungarian matching + mask, dice and class terms).

    The ground truth is given per image as binary instance masks and their
    class ids, exactly what `Mask2FormerForUniversalSegmentation` takes as
    `mask_labels` / `class_labels`; masks are resized (nearest) to the
    preprocessed resolution. The loss includes the auxiliary decoder-layer
    terms when the model's config has `use_auxiliary_loss`. Mask2Former samples
    points at random inside its loss: seed torch for reproducible values.
    """

    required_annotations = (INSTANCE_MASKS, INSTANCE_CLASSES)

    def __init__(self, model: nn.Module, preprocessing: ImagePreprocessing | None = None) -> None:
        super().__init__()
        self.model = freeze(model)
        self.preprocessing = preprocessing or ImagePreprocessing(size_divisor=32)
        self.num_labels = int(getattr(model.config, "num_labels", 0)) or None

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        revision: str | None = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> InstanceSegmentationLoss:
        from transformers import Mask2FormerForUniversalSegmentation

        model = Mask2FormerForUniversalSegmentation.from_pretrained(str(source), revision=revision)
        processor = load_image_processor(source, revision)
        preprocessing = ImagePreprocessing.from_processor(processor, image_size)
        # Whole-image masks, as for semantic segmentation: no crop.
        preprocessing = replace(
            preprocessing, size_divisor=max(32, preprocessing.size_divisor), crop=None
        )
        return cls(model, preprocessing)

    def _targets(
        self, annotations: Annotations, images: Tensor, size: tuple[int, int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        owner = type(self).__name__
        masks, classes = annotations[INSTANCE_MASKS], annotations[INSTANCE_CLASSES]
        if len(masks) != images.shape[0] or len(classes) != images.shape[0]:
            raise PerceptualLossError(
                f"{owner}: need one '{INSTANCE_MASKS}' and one '{INSTANCE_CLASSES}' entry per "
                f"image ({images.shape[0]}), got {len(masks)} and {len(classes)}"
            )
        mask_labels, class_labels = [], []
        for index, (image_masks, image_classes) in enumerate(zip(masks, classes, strict=True)):
            image_masks = torch.as_tensor(image_masks)
            image_classes = torch.as_tensor(image_classes).long().reshape(-1)
            if image_masks.ndim != 3 or image_masks.shape[0] != image_classes.shape[0]:
                raise PerceptualLossError(
                    f"{owner}: image {index}: '{INSTANCE_MASKS}' must be [K, H, W] with K equal to "
                    f"the {image_classes.shape[0]} class ids, got {list(image_masks.shape)}"
                )
            if self.num_labels is not None and image_classes.numel() > 0:
                bad = (image_classes < 0) | (image_classes >= self.num_labels)
                if bool(bad.any()):
                    raise PerceptualLossError(
                        f"{owner}: image {index}: class id {int(image_classes[bad][0])} is outside "
                        f"[0, {self.num_labels}) of the model"
                    )
            resized = image_masks.float()
            if image_masks.shape[0] > 0 and tuple(image_masks.shape[-2:]) != size:
                resized = F.interpolate(resized[None], size=size, mode="nearest")[0]
            elif image_masks.shape[0] == 0:
                resized = resized.new_zeros((0, *size))
            mask_labels.append(resized.to(images.device))
            class_labels.append(image_classes.to(images.device))
        return mask_labels, class_labels

    def compute(self, images: Tensor, annotations: Annotations) -> Tensor:
        pixel_values = self.preprocessing(images).to(self._model_dtype(self.model))
        size = (pixel_values.shape[-2], pixel_values.shape[-1])
        mask_labels, class_labels = self._targets(annotations, images, size)
        output = self.model(
            pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels
        )
        return output.loss


def gram_matrix(features: Tensor) -> Tensor:
    """Gram matrices of feature maps [N, C, H, W] -> [N, C, C], divided by C*H*W.

    The division makes layers of different sizes comparable and the value
    independent of the image resolution, so a style reference need not have
    the generated image's size.
    """
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w).float()
    return flat @ flat.transpose(1, 2) / (c * h * w)


def gram_style_loss(
    features: Sequence[Tensor],
    style_features: Sequence[Tensor],
    layer_weights: Sequence[float] | None = None,
) -> Tensor:
    """`sum_l w_l * mean_n ||Gram(F_l(x_n)) - Gram(F_l(s_n))||_F^2`.

    One style reference (batch 1) is compared with every image; otherwise
    image n is compared with reference n.
    """
    if len(features) != len(style_features):
        raise PerceptualLossError(
            f"gram_style_loss: {len(features)} image layers but {len(style_features)} style layers"
        )
    weights = list(layer_weights) if layer_weights is not None else [1.0] * len(features)
    total = features[0].new_zeros((), dtype=torch.float32)
    for weight, feature, style_feature in zip(weights, features, style_features, strict=True):
        difference = gram_matrix(feature) - gram_matrix(style_feature)
        total = total + weight * difference.pow(2).sum(dim=(1, 2)).mean()
    return total


FeatureMaps = Callable[[Tensor], list[Tensor]]
"""Images [N, 3, H, W] in [0, 1] -> the chosen layers' feature maps [N, C_l, H_l, W_l]."""


class TransformersFeatureMaps(nn.Module):
    """Feature maps of a transformers CNN (ResNet, ConvNeXt, ...) from its hidden states.

    `layers` index `hidden_states` (0 is the stem/embedding output, i the
    output of stage i); the default takes every stage. Only 4-D hidden
    states (convolutional feature maps) are accepted.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] = (),
        preprocessing: ImagePreprocessing | None = None,
    ) -> None:
        super().__init__()
        self.model = freeze(model)
        self.preprocessing = preprocessing or ImagePreprocessing()
        num_stages = len(getattr(model.config, "depths", ()) or ()) or None
        self.layers = tuple(layers) or tuple(range(1, (num_stages or 4) + 1))

    def train(self, mode: bool = True) -> TransformersFeatureMaps:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        dtype = next(iter(self.model.parameters())).dtype
        output = self.model(
            pixel_values=self.preprocessing(images).to(dtype), output_hidden_states=True
        )
        hidden_states = output.hidden_states
        maps = []
        for layer in self.layers:
            if not -len(hidden_states) <= layer < len(hidden_states):
                raise PerceptualLossError(
                    f"style layer {layer} does not exist: the model has {len(hidden_states)} "
                    "hidden states"
                )
            state = hidden_states[layer]
            if state.ndim != 4:
                raise PerceptualLossError(
                    f"style layer {layer} is not a convolutional feature map "
                    f"(shape {list(state.shape)})"
                )
            maps.append(state)
        return maps


VGG16_LAYERS: dict[str, int] = {
    "relu1_2": 3,
    "relu2_2": 8,
    "relu3_3": 15,
    "relu4_3": 22,
    "relu5_3": 29,
}
"""Index in `torchvision.models.vgg16().features` of the usual style layers."""


class VGG16FeatureMaps(nn.Module):
    """VGG16 (torchvision) feature maps at named ReLU layers, the paper's style network.

    torchvision is optional: it is imported here only, and a clear error says
    so when it is missing. Weights come from `weights_path` (a state dict of
    `torchvision.models.vgg16`) or, without it, torchvision's ImageNet weights
    (downloaded into its cache on first use).
    """

    def __init__(
        self,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"),
        weights_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        try:
            import torchvision
        except ImportError as exc:
            raise PerceptualLossError(
                "the VGG16 style model needs torchvision, which is not installed; "
                "use a transformers CNN (e.g. a ResNet checkpoint) as the style model instead"
            ) from exc
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown:
            raise PerceptualLossError(
                f"unknown VGG16 layer(s) {unknown}; known: {sorted(VGG16_LAYERS)}"
            )
        if weights_path is not None:
            vgg = torchvision.models.vgg16()
            vgg.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        else:
            vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        indices = [VGG16_LAYERS[name] for name in layers]
        self.features = freeze(vgg.features[: max(indices) + 1])
        self.indices = indices
        self.preprocessing = ImagePreprocessing()

    def train(self, mode: bool = True) -> VGG16FeatureMaps:
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        hidden = self.preprocessing(images)
        maps = []
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in self.indices:
                maps.append(hidden)
        return maps


class StyleGramLoss(PerceptualLoss):
    """Gram-matrix style loss on frozen CNN features against style reference image(s).

    `feature_maps` turns images into the chosen layers' feature maps
    (`TransformersFeatureMaps` or `VGG16FeatureMaps`). The references come
    in the annotations under `STYLE_IMAGES`; their Gram matrices are computed
    without gradients (they are targets).
    """

    required_annotations = (STYLE_IMAGES,)

    def __init__(
        self, feature_maps: nn.Module, layer_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.feature_maps = freeze(feature_maps)
        self.layer_weights = tuple(layer_weights) if layer_weights is not None else None

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        layers: Sequence[int | str] = (),
        revision: str | None = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> StyleGramLoss:
        """`source` "torchvision:vgg16" (optionally "torchvision:vgg16:/path/state.pt")
        or a transformers CNN checkpoint (directory or hub id)."""
        text = str(source)
        if text.startswith("torchvision:"):
            parts = text.split(":", 2)
            if parts[1] != "vgg16":
                raise PerceptualLossError(f"style model {text!r}: only torchvision:vgg16 is known")
            weights_path = parts[2] if len(parts) == 3 and parts[2] else None
            if layers:
                return cls(VGG16FeatureMaps([str(layer) for layer in layers], weights_path))
            return cls(VGG16FeatureMaps(weights_path=weights_path))
        from transformers import AutoModel

        if any(not isinstance(layer, int) for layer in layers):
            raise PerceptualLossError(
                f"style model {text!r}: layers of a transformers CNN are hidden-state indices "
                f"(integers), got {list(layers)}"
            )
        model = AutoModel.from_pretrained(text, revision=revision)
        processor = load_image_processor(source, revision)
        preprocessing = ImagePreprocessing.from_processor(processor, image_size)
        return cls(TransformersFeatureMaps(model, [int(x) for x in layers], preprocessing))

    def compute(self, images: Tensor, annotations: Annotations) -> Tensor:
        style = annotations[STYLE_IMAGES]
        check_images(style, f"{type(self).__name__} '{STYLE_IMAGES}'")
        if style.shape[0] not in (1, images.shape[0]):
            raise PerceptualLossError(
                f"{type(self).__name__}: '{STYLE_IMAGES}' must hold 1 or N={images.shape[0]} "
                f"images, got {style.shape[0]}"
            )
        with torch.no_grad():
            style_features = self.feature_maps(style.to(images.device, images.dtype))
        return gram_style_loss(self.feature_maps(images), style_features, self.layer_weights)


class ToySegmenterLoss(PerceptualLoss):
    """The toy world's segmenter (`unifl.models.segmenter.ToySegmenter`) and its own loss.

    The segmenter's `.loss(images, semantic_masks)` is its pixel-wise
    cross-entropy, the same loss it was trained with, so this is the toy
    analogue of the paper's structure model.
    """

    required_annotations = (SEMANTIC_MASKS,)

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(segmenter, "loss", None)):
            raise PerceptualLossError(
                f"ToySegmenterLoss needs a segmenter with a .loss(images, masks) method, got "
                f"{type(segmenter).__name__}"
            )
        self.segmenter = freeze(segmenter)

    @classmethod
    def from_pretrained(cls, source: str | Path) -> ToySegmenterLoss:
        """Load a segmenter directory written by `ToySegmenter.save`."""
        from unifl.models.segmenter import ToySegmenter

        return cls(ToySegmenter.load(source))

    def compute(self, images: Tensor, annotations: Annotations) -> Tensor:
        masks = _semantic_masks(annotations, images, type(self).__name__)
        return self.segmenter.loss(images, masks)


class CombinedPerceptualLoss(PerceptualLoss):
    """Weighted sum of named perceptual losses, e.g. structure + style.

    `terms(images, annotations)` gives each unweighted term (for logging);
    calling the module gives `sum_k weight_k * term_k`. After each call the
    detached unweighted terms are kept in `last_terms`.
    """

    def __init__(self, losses: Mapping[str, PerceptualLoss], weights: Mapping[str, float]) -> None:
        super().__init__()
        if not losses:
            raise PerceptualLossError("CombinedPerceptualLoss needs at least one term")
        if set(losses) != set(weights):
            raise PerceptualLossError(
                f"terms {sorted(losses)} and weights {sorted(weights)} must name the same losses"
            )
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {name: float(weights[name]) for name in losses}
        self.required_annotations = tuple(
            sorted({key for loss in losses.values() for key in loss.required_annotations})
        )
        self.last_terms: dict[str, float] = {}

    def forward(self, images: Tensor, annotations: Annotations) -> Tensor:
        check_images(images, type(self).__name__)
        for name, loss in self.losses.items():
            missing = [key for key in loss.required_annotations if key not in annotations]
            if missing:
                raise PerceptualLossError(
                    f"perceptual term {name!r} ({type(loss).__name__}) needs annotation(s) "
                    f"{missing}; got keys {sorted(annotations)}"
                )
        return self.compute(images, annotations)

    def terms(self, images: Tensor, annotations: Annotations) -> dict[str, Tensor]:
        return {name: loss(images, annotations) for name, loss in self.losses.items()}

    def compute(self, images: Tensor, annotations: Annotations) -> Tensor:
        terms = self.terms(images, annotations)
        self.last_terms = {name: float(value.detach()) for name, value in terms.items()}
        total = images.new_zeros((), dtype=torch.float32)
        for name, value in terms.items():
            total = total + self.weights[name] * value
        return total


def build_perceptual_loss(
    specs: PerceptualModelConfig | Mapping[str, Any] | Sequence[Any],
    *,
    toy_segmenter: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> CombinedPerceptualLoss:
    """Build the (combined) perceptual loss of the `pefl.perceptual` configuration.

    Each spec names a `kind` (toy_segmenter, semantic_segmentation,
    instance_segmentation, style_gram), a `model` (a directory or hub id;
    for the toy segmenter "toy" means the bootstrapped one, passed here as
    `toy_segmenter`), a `weight`, and optionally `layers` and `image_size`.
    The result is always a `CombinedPerceptualLoss`, so callers log terms the
    same way whatever the configuration.
    """
    from unifl.config import PerceptualModelConfig

    if isinstance(specs, PerceptualModelConfig | Mapping):
        specs = [specs]
    configs = [
        spec
        if isinstance(spec, PerceptualModelConfig)
        else PerceptualModelConfig.model_validate(spec)
        for spec in specs
    ]
    losses: dict[str, PerceptualLoss] = {}
    weights: dict[str, float] = {}
    for index, config in enumerate(configs):
        name = config.name or config.kind
        if name in losses:
            raise PerceptualLossError(
                f"pefl.perceptual[{index}]: a term named {name!r} exists already; give it a `name`"
            )
        losses[name] = _build_one(config, index, toy_segmenter)
        weights[name] = config.weight
    combined = CombinedPerceptualLoss(losses, weights)
    if device is not None:
        combined.to(device)
    return combined


def _build_one(
    config: PerceptualModelConfig, index: int, toy_segmenter: nn.Module | None
) -> PerceptualLoss:
    where = f"pefl.perceptual[{index}] ({config.kind}, model {config.model!r})"
    if config.kind == "toy_segmenter" and config.model == "toy":
        if toy_segmenter is None:
            raise PerceptualLossError(
                f"{where}: model 'toy' means the bootstrapped toy segmenter; pass it as "
                "toy_segmenter= or give the segmenter's directory"
            )
        return ToySegmenterLoss(toy_segmenter)
    if config.model == "toy":
        raise PerceptualLossError(f"{where}: this kind needs a checkpoint directory or hub id")
    try:
        if config.kind == "toy_segmenter":
            return ToySegmenterLoss.from_pretrained(config.model)
        if config.kind == "semantic_segmentation":
            return SemanticSegmentationLoss.from_pretrained(
                config.model, config.revision, config.image_size, config.ignore_index
            )
        if config.kind == "instance_segmentation":
            return InstanceSegmentationLoss.from_pretrained(
                config.model, config.revision, config.image_size
            )
        return StyleGramLoss.from_pretrained(
            config.model, config.layers, config.revision, config.image_size
        )
    except (OSError, ValueError) as exc:
        raise PerceptualLossError(f"{where}: cannot load the model: {exc}") from exc
