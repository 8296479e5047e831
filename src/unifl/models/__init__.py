"""Models: base diffusion models (SD1.5 / SDXL / toy), tokenizers, sampling, precision.

The names below are re-exported lazily: importing `unifl.models` (or one of
its light submodules such as `unifl.models.tokenizer`) does not import
diffusers until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # base
    "BaseModel": "unifl.models.base",
    "CheckpointError": "unifl.models.base",
    "PromptEmbeds": "unifl.models.base",
    "decode_latents": "unifl.models.base",
    "detect_family": "unifl.models.base",
    "encode_images": "unifl.models.base",
    "encode_prompt": "unifl.models.base",
    "load_base_model": "unifl.models.base",
    "predict_noise": "unifl.models.base",
    "save_base_model": "unifl.models.base",
    "unconditional_embeds": "unifl.models.base",
    # precision
    "precision_from_config": "unifl.models.precision",
    "resolve_device": "unifl.models.precision",
    "resolve_dtypes": "unifl.models.precision",
    # sampler
    "ddim_scheduler": "unifl.models.sampler",
    "ddim_timesteps": "unifl.models.sampler",
    "generate": "unifl.models.sampler",
    "save_images": "unifl.models.sampler",
    "to_pil": "unifl.models.sampler",
    # tokenizer
    "build_word_tokenizer": "unifl.models.tokenizer",
    "toy_tokenizer": "unifl.models.tokenizer",
    # toy presets
    "PRESETS": "unifl.models.toy_presets",
    "build_toy_model": "unifl.models.toy_presets",
    "is_toy_preset": "unifl.models.toy_presets",
    "tiny_reference_config": "unifl.models.toy_presets",
    "write_tiny_reference_checkpoint": "unifl.models.toy_presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unifl.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
