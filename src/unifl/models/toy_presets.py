"""Tiny random models of the same classes as Stable Diffusion: toy presets and test layouts.

Two kinds of tiny model live here, both built from configs with the real
classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTextModelWithProjection, DDIMScheduler), so that they go through the same
code as a production checkpoint:

1. The toy presets `toy-sd15` and `toy-sdxl`, sized to be *trained from
   scratch on CPU in minutes* on the toy world's 32x32 (or 64x64) images of one
   to three coloured shapes. Choices:
   - VAE: 32 px images are down-sampled 4x (three encoder blocks), 64 px
     images 8x (four blocks), so the UNet always works on 4x8x8 latents and
     costs the same at both resolutions. `scaling_factor` starts at 1.0: the
     toy VAE is trained from scratch and the bootstrap sets the factor to
     1/std of its latents (`vae.register_to_config(scaling_factor=...)`), the
     same way SD's 0.18215 was measured.
   - UNet: block_out_channels (32, 64, 64), one ResNet per block, 8x8 -> 4x4
     -> 2x2. toy-sd15 mirrors SD1.5's block types (cross-attention in the two
     high-resolution blocks, a plain block at the bottom; `UNET_LAYOUTS`
     holds a compact alternative without attention at 8x8); toy-sdxl mirrors
     SDXL's (no attention at full resolution, linear projections, more
     transformer layers deeper down) and uses SDXL's conditioning for real:
     `addition_embed_type="text_time"`, pooled text embedding plus six time
     ids embedded with `addition_time_embed_dim`, and cross-attention over the
     concatenation of both encoders' hidden states.
   - Text encoders: CLIP text transformers with hidden size 32, 2 layers,
     4 heads, 16 positions, over the toy word-level tokenizer; `eos_token_id`
     is the tokenizer's so pooling picks the end-of-text token.
   - Scheduler: DDIM with SD's training schedule (1000 steps, scaled_linear
     0.00085..0.012, steps_offset 1, no clipping, set_alpha_to_one False).

2. `tiny_reference_config(family)`: the *real* SD1.5 / SDXL block structures
   (four down blocks with two layers each for SD1.5; SDXL's
   transformer_layers_per_block, per-block head counts, linear projections and
   text_time embedding; CLIP byte-level BPE tokenizers; PNDM / Euler scheduler
   configs as the real checkpoints ship them) with channel counts cut down so
   that a whole checkpoint is a few MB. `write_tiny_reference_checkpoint`
   writes one in the real directory layout; the tests load it through the
   production loader to prove the loader handles real checkpoints.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from unifl.io import atomic_directory, write_json
from unifl.models.base import BaseModel, model_index
from unifl.models.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    TOY_MAX_LENGTH,
    toy_tokenizer,
)

PRESETS: dict[str, str] = {"toy-sd15": "sd15", "toy-sdxl": "sdxl"}
"""Toy preset name -> model family."""

TOY_RESOLUTIONS: tuple[int, ...] = (32, 64)
TOY_LATENT_SIZE = 8
TOY_LATENT_CHANNELS = 4
TOY_TEXT_LENGTH = TOY_MAX_LENGTH

SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
"""Stable Diffusion's DDIM configuration (the SD1.5 and SDXL checkpoints' betas)."""


def is_toy_preset(name: str) -> bool:
    """True for the names of the toy presets (`toy-sd15`, `toy-sdxl`)."""
    return name in PRESETS


def _toy_text_config(vocab_size: int, with_projection: bool) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": TOY_TEXT_LENGTH,
        "projection_dim": 32,
        "hidden_act": "gelu" if with_projection else "quick_gelu",
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
    }


UNET_LAYOUTS: dict[str, dict[str, Any]] = {
    "compact": {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
}
"""toy-sd15 UNet layouts other than its own (`bootstrap.unet_layout`): changes to its config."""


def toy_configs(
    preset: str,
    resolution: int = 32,
    vocab_size: int | None = None,
    latent_channels: int = TOY_LATENT_CHANNELS,
    unet_layout: str | None = None,
) -> dict[str, Any]:
    """Component configs of a toy preset: {'unet', 'vae', 'text_encoder'[, 'text_encoder_2'], 'scheduler'}.

    `latent_channels` sets the VAE's latent channels and the UNet's input and
    output channels together (SD1.5 and SDXL: 4). `unet_layout` names one of
    `UNET_LAYOUTS` for toy-sd15 (None: its own).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown toy preset {preset!r}; known: {sorted(PRESETS)}")
    if unet_layout is not None and (preset != "toy-sd15" or unet_layout not in UNET_LAYOUTS):
        raise ValueError(
            f"unknown UNet layout {unet_layout!r} for {preset}; toy-sd15 has {sorted(UNET_LAYOUTS)}"
        )
    if resolution not in TOY_RESOLUTIONS:
        raise ValueError(f"toy resolution must be one of {TOY_RESOLUTIONS}, got {resolution}")
    family = PRESETS[preset]
    if vocab_size is None:
        vocab_size = len(toy_tokenizer(TOY_TEXT_LENGTH))
    vae_blocks = {32: 3, 64: 4}[resolution]
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * vae_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * vae_blocks,
        "block_out_channels": [16, 32, 32, 32][:vae_blocks],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 8,
        "sample_size": resolution,
        "scaling_factor": 1.0,
    }
    configs: dict[str, Any] = {"vae": vae, "scheduler": dict(SD_SCHEDULER_CONFIG)}
    unet: dict[str, Any] = {
        "sample_size": TOY_LATENT_SIZE,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "norm_num_groups": 16,
    }
    if family == "sd15":
        configs["text_encoder"] = _toy_text_config(vocab_size, with_projection=False)
        unet.update(
            {
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 32,
                "attention_head_dim": 4,  # diffusers reads this as the number of heads
            }
        )
        if unet_layout is not None:
            unet.update(UNET_LAYOUTS[unet_layout])
    else:
        configs["text_encoder"] = _toy_text_config(vocab_size, with_projection=False)
        configs["text_encoder_2"] = _toy_text_config(vocab_size, with_projection=True)
        pooled_dim = configs["text_encoder_2"]["projection_dim"]
        time_embed_dim = 8
        unet.update(
            {
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "cross_attention_dim": configs["text_encoder"]["hidden_size"]
                + configs["text_encoder_2"]["hidden_size"],
                "attention_head_dim": [2, 4, 4],
                "transformer_layers_per_block": [1, 1, 2],
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": time_embed_dim,
                "projection_class_embeddings_input_dim": pooled_dim + 6 * time_embed_dim,
            }
        )
    configs["unet"] = unet
    return configs


def _build(
    family: str,
    configs: dict[str, Any],
    tokenizer: Any,
    tokenizer_2: Any | None,
    seed: int,
    source: str,
    scheduler: Any | None = None,
) -> BaseModel:
    # Fork the RNG so building a model neither depends on nor disturbs the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = None
        if family == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig(**configs["text_encoder_2"])
            )
    model = BaseModel(
        family=family,  # type: ignore[arg-type]
        unet=unet.eval(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler or DDIMScheduler(**configs["scheduler"]),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        source=source,
    )
    model.freeze()
    return model


def build_toy_model(
    preset: str = "toy-sd15",
    resolution: int = 32,
    seed: int = 0,
    latent_channels: int = TOY_LATENT_CHANNELS,
    unet_layout: str | None = None,
) -> BaseModel:
    """A randomly initialised toy model (same classes as SD); the bootstrap trains it."""
    tokenizer = toy_tokenizer(TOY_TEXT_LENGTH)
    configs = toy_configs(preset, resolution, len(tokenizer), latent_channels, unet_layout)
    family = PRESETS[preset]
    tokenizer_2 = toy_tokenizer(TOY_TEXT_LENGTH) if family == "sdxl" else None
    return _build(family, configs, tokenizer, tokenizer_2, seed, source=preset)


def count_parameters(model: BaseModel) -> dict[str, int]:
    """Parameters per component, for reports and manifests."""
    parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    if model.text_encoder_2 is not None:
        parts["text_encoder_2"] = model.text_encoder_2
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


# --------------------------------------------------------------------------- real layouts

_REFERENCE_TEXT_LENGTH = 77
_REFERENCE_WORDS: tuple[str, ...] = (
    "a", "photo", "of", "red", "blue", "circle", "square", "cat", "on", "the", "table",
)  # fmt: skip


def _tiny_clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's layout, with merges for a few words.

    Like CLIP's: the 256 byte symbols, the same with the end-of-word suffix,
    then merged symbols, then <|startoftext|> and <|endoftext|> as the two
    highest ids (the real SD text encoder configs carry the legacy
    `eos_token_id` 2, for which transformers pools at the highest id).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    symbols = alphabet + [char + "</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _REFERENCE_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            symbols.append(pieces[0])
    ordered = list(dict.fromkeys(symbols))
    ordered += ["<|startoftext|>", "<|endoftext|>"]
    merges = list(dict.fromkeys(merges))
    return {token: index for index, token in enumerate(ordered)}, merges


def tiny_reference_config(family: str) -> dict[str, Any]:
    """Configs with the real SD1.5 / SDXL architecture and tiny channel counts.

    Keys: 'unet', 'vae', 'text_encoder' (+ 'text_encoder_2' for SDXL),
    'scheduler' (the scheduler class name and config the real checkpoint ships).
    """
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be 'sd15' or 'sdxl', got {family!r}")
    vocab, _ = _tiny_clip_bpe()
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": _REFERENCE_TEXT_LENGTH,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        # The real configs' legacy ids; pooling falls back to the highest token id.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    if family == "sd15":
        unet = {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
            "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 32,
            "norm_num_groups": 32,
        }
        scheduler_entry = {
            "class_name": "PNDMScheduler",
            "config": {**scheduler, "set_alpha_to_one": False, "skip_prk_steps": True},
        }
        return {
            "unet": unet,
            "vae": vae,
            "text_encoder": text,
            "scheduler": scheduler_entry,
        }
    text_2 = {**text, "hidden_act": "gelu", "hidden_size": 48, "projection_dim": 48,
              "num_attention_heads": 4, "intermediate_size": 53}  # fmt: skip
    time_embed_dim = 8
    unet = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "attention_head_dim": [2, 4, 4],
        "transformer_layers_per_block": [1, 2, 3],
        "use_linear_projection": True,
        "cross_attention_dim": text["hidden_size"] + text_2["hidden_size"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": text_2["projection_dim"] + 6 * time_embed_dim,
        "norm_num_groups": 32,
    }
    scheduler_entry = {
        "class_name": "EulerDiscreteScheduler",
        "config": {**scheduler, "interpolation_type": "linear", "timestep_spacing": "leading"},
    }
    return {
        "unet": unet,
        "vae": {**vae, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": text,
        "text_encoder_2": text_2,
        "scheduler": scheduler_entry,
    }


def _reference_tokenizer(pad_token: str) -> CLIPTokenizer:
    vocab, merges = _tiny_clip_bpe()
    return CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=_REFERENCE_TEXT_LENGTH
    )


def _write_clip_tokenizer_files(folder: Path, pad_token: str) -> None:
    """vocab.json + merges.txt + tokenizer_config.json, as the real SD checkpoints ship them."""
    vocab, merges = _tiny_clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": _REFERENCE_TEXT_LENGTH,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad_token,
                "do_lower_case": True,
            }
        ),
        encoding="utf-8",
    )


def build_tiny_reference_model(family: str, seed: int = 0) -> BaseModel:
    """A random model with the real SD1.5 / SDXL architecture at tiny width."""
    configs = tiny_reference_config(family)
    configs = {**configs, "scheduler": SD_SCHEDULER_CONFIG}
    tokenizer = _reference_tokenizer("<|endoftext|>")
    tokenizer_2 = _reference_tokenizer("!") if family == "sdxl" else None
    return _build(family, configs, tokenizer, tokenizer_2, seed, source=f"tiny-reference-{family}")


def write_tiny_reference_checkpoint(directory: str | Path, family: str, seed: int = 0) -> Path:
    """Write a tiny random checkpoint in the real SD1.5 / SDXL directory layout.

    Unlike `save_base_model`, the files imitate what the published checkpoints
    contain: a PNDM (SD1.5) or Euler (SDXL) scheduler config, CLIP BPE
    tokenizer files (vocab.json / merges.txt) and model_index.json entries for
    the safety checker and feature extractor that are not on disk.
    """
    model = build_tiny_reference_model(family, seed)
    reference = tiny_reference_config(family)
    scheduler_cls = {
        "PNDMScheduler": PNDMScheduler,
        "EulerDiscreteScheduler": EulerDiscreteScheduler,
    }[reference["scheduler"]["class_name"]]
    target = Path(directory)
    with atomic_directory(target) as tmp:
        model.unet.save_pretrained(tmp / "unet")
        model.vae.save_pretrained(tmp / "vae")
        model.text_encoder.save_pretrained(tmp / "text_encoder")
        _write_clip_tokenizer_files(tmp / "tokenizer", "<|endoftext|>")
        if family == "sdxl":
            assert model.text_encoder_2 is not None
            model.text_encoder_2.save_pretrained(tmp / "text_encoder_2")
            _write_clip_tokenizer_files(tmp / "tokenizer_2", "!")
        scheduler_cls(**reference["scheduler"]["config"]).save_pretrained(tmp / "scheduler")
        index = copy.deepcopy(model_index(model))
        index["scheduler"] = ["diffusers", reference["scheduler"]["class_name"]]
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        if family == "sd15":
            index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
            index["requires_safety_checker"] = True
        else:
            index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
            index["force_zeros_for_empty_prompt"] = True
            index.pop("feature_extractor")
            index.pop("image_encoder")
        write_json(tmp / "model_index.json", index)
    return target
