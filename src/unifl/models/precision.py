"""Device and dtype policy for the diffusion models.

One rule set, applied in one place, so that every stage picks the same
precision for the same configuration (`Params.project`):

- CPU always computes in fp32. bf16/fp16 matmuls on CPU are slow or missing
  here, and the toy world's tests compare numbers that half precision blurs.
- On a GPU, `mixed_precision` "bf16" or "fp16" puts the UNet and the text
  encoders in that dtype; "no" keeps fp32.
- The VAE stays in fp32 when `vae_fp32` is true: SDXL's VAE overflows in fp16
  (NaN / black images), and decoding is a small share of the cost. The model
  helpers (`decode_latents`, `encode_images`) cast their inputs to the VAE's
  dtype, so callers never have to know which dtype the VAE holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from unifl.config import ProjectConfig

_MIXED_PRECISION_DTYPES: dict[str, torch.dtype] = {
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def adamw(parameters, **options) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step when every parameter is a float tensor on the CPU
    or a GPU. The toy models have a few hundred small tensors, and the default implementation
    loops over them one by one on every step."""
    parameters = list(parameters)
    tensors = [
        tensor
        for item in parameters
        for tensor in (item["params"] if isinstance(item, dict) else [item])
    ]
    fused = bool(tensors) and all(
        tensor.is_floating_point() and tensor.device.type in ("cpu", "cuda") for tensor in tensors
    )
    return torch.optim.AdamW(parameters, fused=fused, **options)


def apply_num_threads(project: ProjectConfig) -> None:
    """Set torch's CPU thread count of this process to `project.num_threads` (None: leave it)."""
    if project.num_threads is not None and torch.get_num_threads() != project.num_threads:
        torch.set_num_threads(project.num_threads)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is cuda when a GPU is visible, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"project.device: unknown device {name!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"project.device is {name!r} but no CUDA device is available")
    return device


def resolve_dtypes(
    device: torch.device | str, mixed_precision: str = "no", vae_fp32: bool = True
) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of UNet and text encoders, dtype of the VAE) for a device and policy."""
    if mixed_precision not in _MIXED_PRECISION_DTYPES:
        raise ValueError(
            f"project.mixed_precision must be one of {sorted(_MIXED_PRECISION_DTYPES)}, "
            f"got {mixed_precision!r}"
        )
    if torch.device(device).type == "cpu":
        return torch.float32, torch.float32
    dtype = _MIXED_PRECISION_DTYPES[mixed_precision]
    return dtype, (torch.float32 if vae_fp32 else dtype)


def precision_from_config(
    project: ProjectConfig,
) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, dtype, vae_dtype) from a `Params.project` section."""
    device = resolve_device(project.device)
    dtype, vae_dtype = resolve_dtypes(device, project.mixed_precision, project.vae_fp32)
    return device, dtype, vae_dtype
