"""Decoupled aesthetic reward model: one CLIP backbone, one scoring head per dimension.

UniFL trains one reward model per aesthetic dimension (color, layout, detail,
lighting) and, during decoupled feedback learning, scores *every* x0' with all
of them: `L_aes = sum_d w_d * relu(alpha_d - r_d(x0', c))`.

Design choice: one shared backbone with K small heads, not K separate models.

* Cost in the feedback loop. The reward is evaluated on every optimisation
  step, on decoded images that carry gradients back into the UNet. With K
  separate CLIP models the forward pass, the stored activations for the
  backward pass and the weights in GPU memory all grow K-fold (K = 4: four
  ViT-L/14 image towers next to an SDXL UNet). With one backbone they are paid
  once; a head is a two-layer MLP and costs nothing next to it.
* Interference. A shared backbone fine-tuned on all dimensions can trade one
  dimension's accuracy for another's. We limit it three ways: each dimension
  has its own head (no shared output), the backbone learns with its own,
  smaller learning rate (`reward.backbone_learning_rate`, 0 freezes it, which
  removes interference entirely and leaves K linear probes on CLIP features),
  and the training loss is averaged per pair so that no dimension dominates
  unless it has more pairs. Held-out accuracy is measured per dimension so
  that any interference that remains is visible. It does occur where the
  backbone must learn a feature from scratch: on the random toy backbone, the
  position of a small dark square was learned within ~150 steps by a layout-only
  model but often not within 900 steps next to three easier heads. A pretrained
  CLIP already encodes composition, so there the shared backbone is the better
  trade; for the toy world, prefer layout cues the tiny ViT learns quickly.

The score of a (prompt, image) pair is a head applied to fused image-text
features `[i, t, i * t]` of the L2-normalised CLIP embeddings: the image
embedding carries the aesthetics, the text embedding and the product let a
head judge the image relative to what was asked for (ImageReward-style), and
normalisation keeps the features on the scale the CLIP contrastive loss put
them on, whatever the backbone.

Preprocessing (resize with antialiasing, centre crop, CLIP mean/std) is plain
torch on images in [0, 1], so the reward is differentiable with respect to the
pixels: this is what feedback learning back-propagates through.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unifl.config import DIMENSIONS

logger = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of the OpenAI CLIP image preprocessing."""
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of the OpenAI CLIP image preprocessing."""

CONFIG_FILE = "reward_config.json"
HEADS_FILE = "heads.safetensors"
BACKBONE_DIR = "backbone"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


class RewardModelError(ValueError):
    """A reward model directory or an input to the reward model is invalid."""


def preprocess_images(
    images: torch.Tensor,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Differentiable CLIP preprocessing of images in [0, 1], shape [N, 3, H, W].

    Resizes the shorter side to `image_size` (antialiased, so that downscaling a
    1024 px SDXL image does not alias high frequencies into the reward), centre
    crops to a square, and normalises with `mean`/`std`. Images already at
    `image_size` x `image_size` are not resampled, so training on stored images
    and scoring decoded ones go through the same arithmetic.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardModelError(
            f"images must have shape [N, 3, H, W] with values in [0, 1], got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise RewardModelError(f"images must be a float tensor in [0, 1], got {images.dtype}")
    height, width = images.shape[-2:]
    if (height, width) != (image_size, image_size):
        scale = image_size / min(height, width)
        new_height = max(image_size, round(height * scale))
        new_width = max(image_size, round(width * scale))
        if (new_height, new_width) != (height, width):
            # bicubic/bilinear accept antialias; nearest and area do not.
            extra = {"antialias": antialias} if interpolation in ("bilinear", "bicubic") else {}
            images = F.interpolate(
                images,
                size=(new_height, new_width),
                mode=interpolation,
                align_corners=False,
                **extra,
            )
        top = (new_height - image_size) // 2
        left = (new_width - image_size) // 2
        images = images[..., top : top + image_size, left : left + image_size]
    mean_t = images.new_tensor(mean).view(1, 3, 1, 1)
    std_t = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def fuse_features(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Fused image-text features `[i, t, i * t]` of L2-normalised embeddings, [N, 3P]."""
    image_unit = F.normalize(image_embeds, dim=-1)
    text_unit = F.normalize(text_embeds, dim=-1)
    return torch.cat([image_unit, text_unit, image_unit * text_unit], dim=-1)


class RewardHead(nn.Sequential):
    """Scores fused features of one aesthetic dimension: Linear -> GELU -> Linear(1)."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_features),
            nn.GELU(),
            nn.Linear(hidden_features, 1),
        )


class DecoupledRewardModel(nn.Module):
    """A CLIP backbone with one reward head per aesthetic dimension.

    Call it with images in [0, 1] of shape [N, 3, H, W] and either `prompts`
    (tokenised with the model's own tokenizer) or `input_ids`/`attention_mask`;
    it returns `{dimension: rewards[N]}`. `alphas` holds the hinge targets
    `alpha_d` of decoupled feedback learning; they are calibrated by reward
    training and saved with the model.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        dimensions: Sequence[str] = DIMENSIONS,
        head_hidden_dim: int = 256,
        alphas: dict[str, float] | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
        antialias: bool = True,
    ) -> None:
        super().__init__()
        dimensions = tuple(dimensions)
        if not dimensions:
            raise RewardModelError("a reward model needs at least one dimension")
        if len(set(dimensions)) != len(dimensions):
            raise RewardModelError(f"dimensions must be unique, got {dimensions}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.dimensions: tuple[str, ...] = dimensions
        self.head_hidden_dim = int(head_hidden_dim)
        projection_dim = int(backbone.config.projection_dim)
        self.heads = nn.ModuleDict(
            {dim: RewardHead(3 * projection_dim, self.head_hidden_dim) for dim in dimensions}
        )
        self.alphas: dict[str, float] = {dim: 0.0 for dim in dimensions}
        if alphas:
            self.set_alphas(alphas)
        self.image_size = int(_vision_image_size(backbone.config))
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        text_config = backbone.config.text_config
        tokenizer_limit = getattr(tokenizer, "model_max_length", None) or math.inf
        self.max_text_length = int(min(text_config.max_position_embeddings, tokenizer_limit))

    # ------------------------------------------------------------------ inputs
    def set_alphas(self, alphas: dict[str, float]) -> None:
        """Update `alpha_d` for the named dimensions; an unknown dimension is an error."""
        unknown = sorted(set(alphas) - set(self.dimensions))
        if unknown:
            raise RewardModelError(
                f"alpha given for unknown dimensions {unknown}; the model has {self.dimensions}"
            )
        infinite = {dim: value for dim, value in alphas.items() if not math.isfinite(float(value))}
        if infinite:
            raise RewardModelError(f"alpha must be a finite number; got {infinite}")
        for dim, value in alphas.items():
            self.alphas[dim] = float(value)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of `prompts`, padded to the text encoder's length."""
        if isinstance(prompts, str):
            raise RewardModelError("prompts must be a sequence of strings, not one string")
        encoded = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        device = self.device
        return {
            "input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device),
        }

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    # ---------------------------------------------------------------- encoders
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The model's differentiable preprocessing (see `preprocess_images`)."""
        return preprocess_images(
            images.to(device=self.device, dtype=self.dtype),
            self.image_size,
            self.image_mean,
            self.image_std,
            self.interpolation,
            self.antialias,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings [N, P] of images in [0, 1]."""
        pixel_values = self.preprocess(images)
        outputs = self.backbone.vision_model(pixel_values=pixel_values)
        return self.backbone.visual_projection(outputs.pooler_output)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected CLIP text embeddings [N, P]; the FL loop can compute them once per prompt."""
        outputs = self.backbone.text_model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
        )
        return self.backbone.text_projection(outputs.pooler_output)

    def score_embeddings(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        dimensions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rewards `{dimension: [N]}` from aligned image and text embeddings."""
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise RewardModelError(
                f"{image_embeds.shape[0]} images but {text_embeds.shape[0]} texts: "
                "give one prompt per image"
            )
        features = fuse_features(image_embeds, text_embeds)
        return {dim: self.heads[dim](features).squeeze(-1) for dim in self._check(dimensions)}

    def forward(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        dimensions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rewards `{dimension: [N]}` of images in [0, 1] [N, 3, H, W] for their prompts."""
        if (prompts is None) == (input_ids is None):
            raise RewardModelError("give exactly one of `prompts` or `input_ids`")
        if prompts is not None:
            tokens = self.tokenize(prompts)
            input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
        assert input_ids is not None
        image_embeds = self.encode_images(images)
        text_embeds = self.encode_text(input_ids, attention_mask)
        return self.score_embeddings(image_embeds, text_embeds, dimensions)

    def _check(self, dimensions: Sequence[str] | None) -> tuple[str, ...]:
        if dimensions is None:
            return self.dimensions
        unknown = [dim for dim in dimensions if dim not in self.heads]
        if unknown:
            raise RewardModelError(
                f"unknown reward dimensions {unknown}; the model has {self.dimensions}"
            )
        return tuple(dimensions)

    # ------------------------------------------------------------------ copies
    def select_dimensions(self, dimensions: Sequence[str]) -> DecoupledRewardModel:
        """A deep copy keeping only `dimensions` (e.g. the detail model as a discriminator)."""
        keep = self._check(dimensions)
        clone = copy.deepcopy(self)
        clone.heads = nn.ModuleDict({dim: clone.heads[dim] for dim in keep})
        clone.dimensions = keep
        clone.alphas = {dim: clone.alphas[dim] for dim in keep}
        return clone

    # -------------------------------------------------------------- save/load
    def settings(self) -> dict[str, Any]:
        """Everything besides weights that `load` needs, as written to `reward_config.json`."""
        return {
            "format_version": FORMAT_VERSION,
            "dimensions": list(self.dimensions),
            "alphas": {dim: self.alphas[dim] for dim in self.dimensions},
            "head_hidden_dim": self.head_hidden_dim,
            "fusion": "concat(image, text, image*text) of L2-normalised embeddings",
            "preprocessing": {
                "image_size": self.image_size,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
                "interpolation": self.interpolation,
                "antialias": self.antialias,
                "resize": "shorter side to image_size, then centre crop",
            },
        }

    def save(self, directory: str | Path) -> None:
        """Write backbone (save_pretrained), tokenizer, heads (safetensors) and settings.

        The directory is replaced as a whole or not at all.
        """
        from safetensors.torch import save_file

        from unifl.io import atomic_directory, write_json

        with atomic_directory(directory) as tmp:
            self.backbone.save_pretrained(tmp / BACKBONE_DIR)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            heads = {
                name: tensor.detach().to("cpu", torch.float32).contiguous()
                for name, tensor in self.heads.state_dict().items()
            }
            save_file(heads, str(tmp / HEADS_FILE), metadata={"format": "pt"})
            write_json(tmp / CONFIG_FILE, self.settings())

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DecoupledRewardModel:
        """Load a model written by `save`; a missing or malformed file is a clear error."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPModel

        root = Path(directory)
        config_path = root / CONFIG_FILE
        for required in (config_path, root / HEADS_FILE, root / BACKBONE_DIR, root / TOKENIZER_DIR):
            if not required.exists():
                raise RewardModelError(f"{root}: not a reward model directory, missing {required}")
        try:
            settings = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RewardModelError(f"{config_path}: not valid JSON: {exc.msg}") from None
        if settings.get("format_version") != FORMAT_VERSION:
            raise RewardModelError(
                f"{config_path}: format_version {settings.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}"
            )
        try:
            preprocessing = settings["preprocessing"]
            backbone = CLIPModel.from_pretrained(root / BACKBONE_DIR, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
            model = cls(
                backbone,
                tokenizer,
                dimensions=settings["dimensions"],
                head_hidden_dim=settings["head_hidden_dim"],
                alphas=settings["alphas"],
                image_mean=preprocessing["image_mean"],
                image_std=preprocessing["image_std"],
                interpolation=preprocessing["interpolation"],
                antialias=preprocessing["antialias"],
            )
        except KeyError as exc:
            raise RewardModelError(f"{config_path}: missing field {exc.args[0]!r}") from None
        except RewardModelError as exc:
            raise RewardModelError(f"{config_path}: {exc}") from None
        if model.image_size != preprocessing["image_size"]:
            raise RewardModelError(
                f"{config_path}: image_size {preprocessing['image_size']} does not match the "
                f"backbone's {model.image_size}"
            )
        heads_path = root / HEADS_FILE
        try:
            model.heads.load_state_dict(load_file(str(heads_path)))
        except RuntimeError as exc:
            raise RewardModelError(
                f"{heads_path}: heads do not match the settings: {exc}"
            ) from None
        return model.to(device=device, dtype=dtype).eval()


def _vision_image_size(config: Any) -> int:
    size = config.vision_config.image_size
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise RewardModelError(f"only square backbone inputs are supported, got {size}")
        size = size[0]
    return int(size)


def reward_for_dimension(
    model: DecoupledRewardModel,
    images: torch.Tensor,
    prompts: Sequence[str],
    dim: str,
) -> torch.Tensor:
    """Rewards [N] of one dimension `dim` (only that head is evaluated)."""
    return model(images, prompts=prompts, dimensions=[dim])[dim]


def toy_clip_config(tokenizer: Any, image_size: int = 32) -> Any:
    """A tiny random `CLIPConfig` whose text side matches `tokenizer`'s ids.

    The text model pools at the first `eos_token_id`, so the config takes its
    special-token ids from the tokenizer; transformers treats eos id 2 as a
    legacy config and pools at the highest id instead, which would be wrong.
    """
    from transformers import CLIPConfig

    if tokenizer.eos_token_id is None or tokenizer.eos_token_id == 2:
        raise RewardModelError(
            f"toy tokenizer eos id {tokenizer.eos_token_id!r} cannot be used with CLIP "
            "(None or 2 makes CLIPTextModel pool at the wrong token)"
        )
    patch_size = 4 if image_size % 4 == 0 else 1
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": int(tokenizer.model_max_length),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "projection_dim": 32,
    }
    vision_config = {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)


def build_toy_reward_model(
    image_size: int = 32,
    seed: int = 0,
    tokenizer: Any | None = None,
    dimensions: Sequence[str] = DIMENSIONS,
    head_hidden_dim: int = 64,
) -> DecoupledRewardModel:
    """A reward model on a tiny random CLIP for the toy world (same classes as production).

    `tokenizer` defaults to the toy word-level tokenizer. Weights depend only on `seed`.
    """
    from transformers import CLIPModel

    if tokenizer is None:
        from unifl.models.tokenizer import toy_tokenizer

        tokenizer = toy_tokenizer()
    config = toy_clip_config(tokenizer, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = CLIPModel(config)
        model = DecoupledRewardModel(
            backbone, tokenizer, dimensions=dimensions, head_hidden_dim=head_hidden_dim
        )
    return model.eval()


def load_pretrained_reward_backbone(
    source: str,
    dimensions: Sequence[str] = DIMENSIONS,
    head_hidden_dim: int = 256,
    revision: str | None = None,
    seed: int = 0,
) -> DecoupledRewardModel:
    """Fresh heads on a pretrained CLIP (hub id or local directory) with its tokenizer.

    Mean and std come from the checkpoint's `preprocessor_config.json` when it
    has one, else from OpenAI CLIP's.
    """
    from transformers import AutoTokenizer, CLIPModel
    from transformers.image_processing_base import ImageProcessingMixin

    backbone = CLIPModel.from_pretrained(source, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision)
    except OSError:
        logger.warning("%s has no image processor config; using OpenAI CLIP mean/std", source)
    else:
        mean = tuple(processor.get("image_mean", mean))
        std = tuple(processor.get("image_std", std))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DecoupledRewardModel(
            backbone,
            tokenizer,
            dimensions=dimensions,
            head_hidden_dim=head_hidden_dim,
            image_mean=mean,
            image_std=std,
        )
    return model.eval()


def build_reward_model(
    backbone: str,
    image_size: int = 32,
    seed: int = 0,
    dimensions: Sequence[str] = DIMENSIONS,
    head_hidden_dim: int = 256,
    revision: str | None = None,
) -> DecoupledRewardModel:
    """The reward model named by `reward.backbone`: 'toy', or a CLIP hub id / directory."""
    if backbone == "toy":
        return build_toy_reward_model(
            image_size=image_size, seed=seed, dimensions=dimensions, head_hidden_dim=head_hidden_dim
        )
    return load_pretrained_reward_backbone(
        backbone,
        dimensions=dimensions,
        head_hidden_dim=head_hidden_dim,
        revision=revision,
        seed=seed,
    )
