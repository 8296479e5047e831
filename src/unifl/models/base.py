"""The base diffusion model: one object for SD1.5, SDXL and the toy presets.

`BaseModel` holds the pieces of a Stable Diffusion checkpoint (UNet, VAE, text
encoder(s), tokenizer(s), scheduler) rather than a diffusers pipeline. The
feedback-learning stages need the pieces: one UNet call with gradients, a
differentiable VAE decode, prompt embeddings computed once and reused. The
functions here are the only places that know how the two families differ:

- `encode_prompt` builds the UNet conditioning. SD1.5 uses the last hidden
  state of its CLIP text encoder. SDXL concatenates the *penultimate* hidden
  states of both encoders on the feature axis, takes the pooled embedding from
  the second encoder's projection, and adds the six "time ids" (original size,
  crop top-left, target size), all set to the model's image size with no crop,
  as the SDXL pipeline does for plain text-to-image.
- `predict_noise` is one UNet call, adding SDXL's `added_cond_kwargs`.
- `decode_latents` / `encode_images` convert between pixels in [0, 1] and
  scaled latents, casting to the VAE's dtype (see `unifl.models.precision`).

Checkpoints are diffusers pipeline directories (or hub ids in production).
The scheduler is always loaded as `DDIMScheduler` from the checkpoint's own
scheduler config: UniFL's sampling math (x0 prediction, 20-step schedules,
few-step "trailing" inference) is written for DDIM, and SD's checkpoints ship
PNDM/Euler configs with the same beta schedule. `save_base_model` writes the
same layout plus a `model_index.json` that diffusers' StableDiffusion(XL)
pipelines accept, so a toy or fine-tuned model is loadable by anyone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from unifl.io import atomic_directory, write_json

Family = Literal["sd15", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd15", "sdxl")

PIPELINE_CLASSES: dict[str, str] = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
REQUIRED_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    ),
}


class CheckpointError(ValueError):
    """A checkpoint directory or hub id is not a usable SD1.5/SDXL model; names the source."""


@dataclass
class BaseModel:
    """The components of a Stable Diffusion checkpoint, SD1.5 or SDXL layout.

    `text_encoder_2` / `tokenizer_2` are set for SDXL only. `source` records
    where the model came from (a path, hub id or toy preset name) for logs and
    manifests. `force_zeros_for_empty_prompt` is SDXL's convention for the
    unconditional branch of classifier-free guidance (zeros instead of the
    embedding of ""), read from and written to `model_index.json`.
    """

    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any
    scheduler: DDIMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: Any | None = None
    source: str = ""
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        has_second = self.text_encoder_2 is not None and self.tokenizer_2 is not None
        if (self.family == "sdxl") != has_second:
            raise ValueError(
                f"{self.source or 'model'}: family {self.family!r} "
                f"{'needs' if self.family == 'sdxl' else 'must not have'} "
                "text_encoder_2 and tokenizer_2"
            )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the UNet (and text encoders)."""
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD, 4 or 8 for the toy)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_size(self) -> int:
        """Side of the latents the UNet works on."""
        return int(self.unet.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that feedback learning never trains: the VAE and the text encoders."""
        return [self.vae, *self.text_encoders()]

    def freeze(self) -> None:
        """Put the frozen modules in eval mode without gradients."""
        for module in self.frozen_modules():
            module.eval()
            module.requires_grad_(False)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
    ) -> BaseModel:
        """Move every module in place; `vae_dtype` defaults to `dtype`."""
        vae_dtype = vae_dtype or dtype

        def move(module: torch.nn.Module, target_dtype: torch.dtype | None) -> None:
            # Pass only what changes: diffusers warns on any `to(dtype=...)` call.
            kwargs: dict[str, Any] = {}
            if device is not None:
                kwargs["device"] = device
            if target_dtype is not None:
                kwargs["dtype"] = target_dtype
            if kwargs:
                module.to(**kwargs)

        for module in (self.unet, *self.text_encoders()):
            move(module, dtype)
        move(self.vae, vae_dtype)
        return self


# --------------------------------------------------------------------------- loading


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(source: str | Path) -> bool:
    """True when `source` is not a local path and reads as a hub id ('owner/name')."""
    text = str(source)
    return not Path(text).exists() and _HUB_ID.match(text) is not None


def _read_model_index(source: str, revision: str | None) -> dict[str, Any] | None:
    path = Path(source)
    if not is_hub_id(source) and not path.is_dir():
        raise CheckpointError(f"{source}: no such checkpoint directory")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{index}: not valid JSON: {exc.msg}") from None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source, revision=revision)
    except Exception as exc:  # the hub client raises many unrelated classes
        raise CheckpointError(
            f"{source}: not a directory and no model_index.json on the hub ({exc})"
        ) from None


def detect_family(source: str | Path, revision: str | None = None) -> Family:
    """'sdxl' or 'sd15' from model_index.json (`_class_name`, text_encoder_2 entry).

    A directory without model_index.json is judged by its subfolders.
    """
    source = str(source)
    index = _read_model_index(source, revision)
    if index is None:
        return "sdxl" if (Path(source) / "text_encoder_2").is_dir() else "sd15"
    class_name = str(index.get("_class_name", ""))
    second_encoder = index.get("text_encoder_2")
    if "XL" in class_name or (isinstance(second_encoder, list) and second_encoder[0]):
        return "sdxl"
    if class_name.startswith("StableDiffusion") or "unet" in index:
        return "sd15"
    raise CheckpointError(
        f"{source}: model_index.json names pipeline {class_name!r}, "
        "not a Stable Diffusion (1.x/2.x) or SDXL pipeline"
    )


def _check_subfolders(source: str, family: str) -> None:
    path = Path(source)
    if not path.is_dir():
        return  # hub id: from_pretrained reports what is missing
    missing = []
    for name in REQUIRED_SUBFOLDERS[family]:
        folder = path / name
        if name.startswith("tokenizer"):
            ok = folder.is_dir() and any(folder.iterdir())
        else:
            config = "scheduler_config.json" if name == "scheduler" else "config.json"
            ok = (folder / config).is_file()
        if not ok:
            missing.append(name)
    if missing:
        raise CheckpointError(
            f"{path}: not a complete {family} checkpoint, missing or empty subfolder(s): "
            + ", ".join(missing)
        )


def load_scheduler(source: str | Path, revision: str | None = None) -> DDIMScheduler:
    """The checkpoint's scheduler config, as a DDIM scheduler (eta 0 sampling)."""
    config = DDIMScheduler.load_config(str(source), subfolder="scheduler", revision=revision)
    return DDIMScheduler.from_config(config)


def load_base_model(
    source: str | Path,
    family: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> BaseModel:
    """Load a diffusers SD1.5/SDXL pipeline directory (or hub id) into a `BaseModel`.

    `family="auto"` reads the family from model_index.json; an explicit family
    that disagrees with the checkpoint is an error rather than a half-working
    model. The VAE and text encoders come back frozen (eval, no gradients);
    the UNet is in eval mode with gradients on, for the trainer to decide.
    `vae_dtype` defaults to `dtype` (see `unifl.models.precision`).
    """
    source_text = str(source)
    detected = detect_family(source_text, revision)
    if family == "auto":
        family = detected
    elif family not in FAMILIES:
        raise CheckpointError(
            f"{source_text}: family must be 'auto', 'sd15' or 'sdxl', got {family!r}"
        )
    elif family != detected:
        raise CheckpointError(
            f"{source_text}: asked for family {family!r} but the checkpoint is {detected!r}"
        )
    _check_subfolders(source_text, family)
    vae_dtype = vae_dtype or dtype
    common: dict[str, Any] = {"revision": revision}
    if variant:
        common["variant"] = variant

    try:
        unet = UNet2DConditionModel.from_pretrained(
            source_text, subfolder="unet", torch_dtype=dtype, **common
        )
        vae = AutoencoderKL.from_pretrained(
            source_text, subfolder="vae", torch_dtype=vae_dtype, **common
        )
        text_encoder = CLIPTextModel.from_pretrained(
            source_text, subfolder="text_encoder", dtype=dtype, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(
            source_text, subfolder="tokenizer", revision=revision
        )
        text_encoder_2 = tokenizer_2 = None
        if family == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source_text, subfolder="text_encoder_2", dtype=dtype, **common
            )
            tokenizer_2 = AutoTokenizer.from_pretrained(
                source_text, subfolder="tokenizer_2", revision=revision
            )
        scheduler = load_scheduler(source_text, revision)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source_text}: cannot load the {family} checkpoint: {exc}") from exc

    index = _read_model_index(source_text, revision) or {}
    model = BaseModel(
        family=family,  # type: ignore[arg-type]
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        source=source_text,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
    )
    check_consistency(model)
    model.to(device=device)
    model.unet.eval()
    model.freeze()
    return model


def check_consistency(model: BaseModel) -> None:
    """Shapes that must agree between components; a mismatch names both sides."""
    where = model.source or "model"
    pairs = [(model.tokenizer, model.text_encoder, "tokenizer", "text_encoder")]
    if model.family == "sdxl":
        pairs.append((model.tokenizer_2, model.text_encoder_2, "tokenizer_2", "text_encoder_2"))
    for tokenizer, encoder, tok_name, enc_name in pairs:
        if tokenizer.model_max_length > encoder.config.max_position_embeddings:
            raise CheckpointError(
                f"{where}: {tok_name}.model_max_length {tokenizer.model_max_length} exceeds "
                f"{enc_name}.max_position_embeddings {encoder.config.max_position_embeddings}"
            )
        if len(tokenizer) > encoder.config.vocab_size:
            raise CheckpointError(
                f"{where}: {tok_name} has {len(tokenizer)} tokens but {enc_name}.vocab_size "
                f"is {encoder.config.vocab_size}"
            )
    context_dim = sum(encoder.config.hidden_size for encoder in model.text_encoders())
    if model.unet.config.cross_attention_dim != context_dim:
        raise CheckpointError(
            f"{where}: unet.cross_attention_dim {model.unet.config.cross_attention_dim} != "
            f"text encoder hidden size(s) {context_dim}"
        )
    if model.unet.config.in_channels != model.vae.config.latent_channels:
        raise CheckpointError(
            f"{where}: unet.in_channels {model.unet.config.in_channels} != "
            f"vae.latent_channels {model.vae.config.latent_channels}"
        )
    if model.family == "sdxl":
        assert model.text_encoder_2 is not None
        expected = model.text_encoder_2.config.projection_dim + 6 * int(
            model.unet.config.addition_time_embed_dim or 0
        )
        if (
            model.unet.config.addition_embed_type != "text_time"
            or model.unet.config.projection_class_embeddings_input_dim != expected
        ):
            raise CheckpointError(
                f"{where}: an SDXL unet needs addition_embed_type 'text_time' and "
                f"projection_class_embeddings_input_dim {expected} (pooled + 6 time ids), got "
                f"{model.unet.config.addition_embed_type!r} and "
                f"{model.unet.config.projection_class_embeddings_input_dim}"
            )


# --------------------------------------------------------------------------- saving


def _library_class(module: object) -> list[str]:
    """[library, class] for model_index.json, as diffusers' pipeline loader expects."""
    import transformers

    cls = type(module)
    name = cls.__name__
    if cls.__module__.startswith("transformers"):
        if getattr(transformers, name, None) is not cls:
            # transformers 5 builds generic fast tokenizers as `TokenizersBackend`,
            # exported under its historical name.
            name = "PreTrainedTokenizerFast"
        return ["transformers", name]
    return ["diffusers", name]


def model_index(model: BaseModel) -> dict[str, Any]:
    """The model_index.json of `model` as a StableDiffusion(XL)Pipeline directory."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": PIPELINE_CLASSES[model.family],
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": _library_class(model.scheduler),
        "text_encoder": _library_class(model.text_encoder),
        "tokenizer": _library_class(model.tokenizer),
        "unet": _library_class(model.unet),
        "vae": _library_class(model.vae),
    }
    if model.family == "sd15":
        index["safety_checker"] = [None, None]
        index["requires_safety_checker"] = False
    else:
        index["text_encoder_2"] = _library_class(model.text_encoder_2)
        index["tokenizer_2"] = _library_class(model.tokenizer_2)
        index["force_zeros_for_empty_prompt"] = model.force_zeros_for_empty_prompt
    return index


def save_base_model(model: BaseModel, directory: str | Path) -> Path:
    """Write `model` as a diffusers pipeline directory, whole or not at all."""
    target = Path(directory)
    with atomic_directory(target) as tmp:
        model.unet.save_pretrained(tmp / "unet")
        model.vae.save_pretrained(tmp / "vae")
        model.text_encoder.save_pretrained(tmp / "text_encoder")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        if model.family == "sdxl":
            assert model.text_encoder_2 is not None and model.tokenizer_2 is not None
            model.text_encoder_2.save_pretrained(tmp / "text_encoder_2")
            model.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
        model.scheduler.save_pretrained(tmp / "scheduler")
        write_json(tmp / "model_index.json", model_index(model))
    return target


# --------------------------------------------------------------------------- conditioning


@dataclass
class PromptEmbeds:
    """UNet conditioning for a batch of prompts.

    `prompt_embeds` [N, L, D] feed cross-attention; `pooled_prompt_embeds`
    [N, P] and `add_time_ids` [N, 6] are SDXL's extra conditioning (None for
    SD1.5).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None
    _fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def _map(self, fn: Any) -> PromptEmbeds:
        values = {
            name: (None if getattr(self, name) is None else fn(getattr(self, name)))
            for name in self._fields
        }
        return PromptEmbeds(**values)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PromptEmbeds:
        return self._map(lambda tensor: tensor.to(device=device, dtype=dtype))

    def detach(self) -> PromptEmbeds:
        return self._map(lambda tensor: tensor.detach())

    def select(self, index: slice | torch.Tensor | list[int]) -> PromptEmbeds:
        """Rows `index` of every tensor (a slice, index list or boolean mask)."""
        return self._map(lambda tensor: tensor[index])

    def repeat(self, times: int) -> PromptEmbeds:
        """Each row repeated `times` times in a row (prompt i -> rows i*times..)."""
        return self._map(lambda tensor: tensor.repeat_interleave(times, dim=0))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch axis (all items of the same family)."""
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item")
        values = {}
        for name in items[0]._fields:
            tensors = [getattr(item, name) for item in items]
            if all(t is None for t in tensors):
                values[name] = None
            elif any(t is None for t in tensors):
                raise ValueError(f"PromptEmbeds.cat: {name} is set on some items only")
            else:
                values[name] = torch.cat(tensors, dim=0)
        return PromptEmbeds(**values)

    def with_unconditional(self, unconditional: PromptEmbeds) -> PromptEmbeds:
        """[unconditional; conditional] for one batched classifier-free-guidance UNet call.

        The noise prediction then splits as `eps_uncond, eps_cond = eps.chunk(2)`.
        """
        if len(unconditional) != len(self):
            raise ValueError(
                f"unconditional embeds have {len(unconditional)} rows, conditional {len(self)}"
            )
        return PromptEmbeds.cat([unconditional, self])


def _tokenize(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def time_ids(model: BaseModel, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w) per row."""
    size = model.image_size
    row = torch.tensor([size, size, 0, 0, size, size], dtype=dtype, device=model.device)
    return row.unsqueeze(0).repeat(batch_size, 1)


def encode_prompt(model: BaseModel, prompts: list[str]) -> PromptEmbeds:
    """UNet conditioning for `prompts`, the one definition shared by training and sampling.

    No `torch.no_grad` inside: gradients reach a text encoder that requires
    them; callers that only sample wrap the call themselves.
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompt takes a list of prompts, not a single string")
    if not prompts:
        raise ValueError("encode_prompt needs at least one prompt")
    device = model.text_encoder.device
    if model.family == "sd15":
        ids = _tokenize(model.tokenizer, list(prompts), device)
        hidden = model.text_encoder(input_ids=ids).last_hidden_state
        return PromptEmbeds(prompt_embeds=hidden)

    assert model.text_encoder_2 is not None and model.tokenizer_2 is not None
    ids_1 = _tokenize(model.tokenizer, list(prompts), device)
    out_1 = model.text_encoder(input_ids=ids_1, output_hidden_states=True)
    ids_2 = _tokenize(model.tokenizer_2, list(prompts), model.text_encoder_2.device)
    out_2 = model.text_encoder_2(input_ids=ids_2, output_hidden_states=True)
    hidden_1, hidden_2 = out_1.hidden_states[-2], out_2.hidden_states[-2]
    if hidden_1.shape[1] != hidden_2.shape[1]:
        raise ValueError(
            f"{model.source or 'model'}: tokenizer and tokenizer_2 pad to different lengths "
            f"({hidden_1.shape[1]} vs {hidden_2.shape[1]})"
        )
    prompt_embeds = torch.cat([hidden_1, hidden_2.to(hidden_1.device)], dim=-1)
    pooled = out_2.text_embeds.to(prompt_embeds.device)
    return PromptEmbeds(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        add_time_ids=time_ids(model, len(prompts), prompt_embeds.dtype),
    )


def unconditional_embeds(
    model: BaseModel, batch_size: int, negative_prompt: str = ""
) -> PromptEmbeds:
    """The unconditional branch of classifier-free guidance for `batch_size` rows.

    The embedding of `negative_prompt`, except for SDXL checkpoints with
    `force_zeros_for_empty_prompt` and an empty negative prompt, which use
    zeros as the SDXL pipeline does.
    """
    embeds = encode_prompt(model, [negative_prompt]).repeat(batch_size)
    if model.family == "sdxl" and model.force_zeros_for_empty_prompt and not negative_prompt:
        embeds = PromptEmbeds(
            prompt_embeds=torch.zeros_like(embeds.prompt_embeds),
            pooled_prompt_embeds=torch.zeros_like(embeds.pooled_prompt_embeds),
            add_time_ids=embeds.add_time_ids,
        )
    return embeds


# --------------------------------------------------------------------------- UNet and VAE


def _timestep_tensor(
    model: BaseModel, timesteps: int | torch.Tensor, batch_size: int
) -> torch.Tensor:
    limit = int(model.scheduler.config.num_train_timesteps)
    # Integers and host tensors are checked on the host before they move: reading a
    # device tensor's values back (which its check does) waits for the GPU.
    steps = torch.as_tensor(timesteps)
    if steps.is_floating_point() and not torch.equal(steps, steps.round()):
        raise ValueError("timesteps must be whole scheduler timesteps, got fractional values")
    steps = steps.long()
    if steps.ndim > 1 or (steps.ndim == 1 and steps.shape[0] not in (1, batch_size)):
        raise ValueError(
            f"timesteps must be a scalar or one per sample ({batch_size}), got shape "
            f"{tuple(steps.shape)}"
        )
    low, high = int(steps.min()), int(steps.max())
    if low < 0 or high >= limit:
        raise ValueError(
            f"timesteps must be scheduler timesteps in [0, {limit}), got range [{low}, {high}]"
        )
    return steps.to(model.device, non_blocking=True)


def predict_noise(
    model: BaseModel,
    latents: torch.Tensor,
    timesteps: int | torch.Tensor,
    embeds: PromptEmbeds,
) -> torch.Tensor:
    """One UNet call: the model output (noise for epsilon models) at `timesteps`.

    `timesteps` are scheduler timesteps (`scheduler.timesteps[i]`, never the
    loop index `i`). Inputs are cast to the UNet's dtype and the output back to
    the latents' dtype, so the scheduler math stays in the caller's precision.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [N, C, h, w], got shape {tuple(latents.shape)}")
    if len(embeds) != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {len(embeds)} prompt embeddings")
    steps = _timestep_tensor(model, timesteps, latents.shape[0])
    dtype = model.unet.dtype
    added_cond_kwargs = None
    if model.family == "sdxl":
        if embeds.pooled_prompt_embeds is None or embeds.add_time_ids is None:
            raise ValueError("SDXL needs pooled_prompt_embeds and add_time_ids (encode_prompt)")
        added_cond_kwargs = {
            "text_embeds": embeds.pooled_prompt_embeds.to(dtype),
            "time_ids": embeds.add_time_ids.to(dtype),
        }
    output = model.unet(
        latents.to(dtype),
        steps,
        encoder_hidden_states=embeds.prompt_embeds.to(dtype),
        added_cond_kwargs=added_cond_kwargs,
    ).sample
    return output.to(latents.dtype)


def decode_latents(model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], float32; differentiable."""
    vae = model.vae
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    decoded = vae.decode(scaled.to(device=vae.device, dtype=vae.dtype)).sample
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def encode_images(
    model: BaseModel, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents, float32.

    Without a generator the posterior mode is used (deterministic); with one,
    a sample from the posterior.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1], got values in [{low:.3f}, {high:.3f}]")
    vae = model.vae
    pixels = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mode() if generator is None else posterior.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return (latents * vae.config.scaling_factor).float()
