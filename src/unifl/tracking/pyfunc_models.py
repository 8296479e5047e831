"""MLflow pyfunc wrappers: the tuned diffusion model and the decoupled reward model.

The "models from code" files in the repository's ``mlflow/`` directory instantiate these
classes; keeping the logic here makes it importable and testable like the rest of the
library, and keeps the code files a few lines long.

Both read their weights from the model's ``model_dir`` artifact (a directory written by
`unifl.models.base.save_base_model` or `DecoupledRewardModel.save`) and their defaults
from the model config recorded at logging time; request ``params`` override the defaults.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_DIR_ARTIFACT = "model_dir"

DIFFUSION_DEFAULTS: dict[str, Any] = {
    "steps": 20,
    "guidance_scale": 7.5,
    "seed": 0,
    "timestep_spacing": "leading",
}


class PyfuncInputError(ValueError):
    """A request that the model cannot read; names the column or row."""


def _device(requested: str | None) -> str:
    import torch

    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(requested)


def prompts_from_input(model_input: Any) -> list[str]:
    """Prompts from a DataFrame (``prompt`` column), a dict, a list or a single string."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            values = model_input["prompt"].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise PyfuncInputError(f"input has no 'prompt' column ({list(model_input.columns)})")
    elif isinstance(model_input, Mapping):
        if "prompt" not in model_input:
            raise PyfuncInputError(f"input has no 'prompt' key ({list(model_input)})")
        values = model_input["prompt"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, Sequence | np.ndarray):
        values = list(model_input)
    else:
        raise PyfuncInputError(f"unsupported input type {type(model_input).__name__}")
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise PyfuncInputError(f"row {row}: prompt must be a string, got {value!r}")
    if not values:
        raise PyfuncInputError("no prompts given")
    return values


def png_bytes(images: Any) -> list[bytes]:
    """PNG encodings of a [N, 3, H, W] tensor in [0, 1] or of a list of PIL images."""
    from PIL import Image

    if isinstance(images, list | tuple) and images and isinstance(images[0], Image.Image):
        pictures = list(images)
    else:
        import torch

        tensor = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(tensor.shape)}")
        if tensor.shape[1] == 1:
            tensor = tensor.expand(-1, 3, -1, -1)
        array = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        pictures = [Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))) for a in array]
    encoded = []
    for picture in pictures:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def decode_image(value: Any, row: int) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from PNG/JPEG bytes or their base64 text."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except ValueError:
            raise PyfuncInputError(f"row {row}: image is text but not base64") from None
    if not isinstance(value, bytes | bytearray):
        raise PyfuncInputError(f"row {row}: image must be bytes or base64 text")
    try:
        with Image.open(io.BytesIO(value)) as picture:
            return np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError):
        raise PyfuncInputError(f"row {row}: image bytes are not a readable image") from None


class UniflDiffusionModel(mlflow.pyfunc.PythonModel):
    """Prompts in, PNG images out: the tuned UNet inside its full diffusers directory.

    Params per request: ``steps``, ``guidance_scale``, ``seed``, ``timestep_spacing``.
    """

    def load_context(self, context: Any) -> None:
        from unifl.models.base import load_base_model

        config = dict(context.model_config or {})
        self.defaults = {key: config.get(key, value) for key, value in DIFFUSION_DEFAULTS.items()}
        self.model = load_base_model(
            context.artifacts[MODEL_DIR_ARTIFACT], device=_device(config.get("device"))
        )

    # No type hints on predict: MLflow would read them as an input schema and re-shape the
    # request; the signature given at logging time describes the input instead.
    def predict(self, context, model_input, params=None):
        """A DataFrame with ``prompt`` and ``image`` (PNG bytes) per prompt."""
        import torch

        from unifl.models.sampler import generate

        prompts = prompts_from_input(model_input)
        settings = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        unknown = sorted(set(settings) - set(DIFFUSION_DEFAULTS))
        if unknown:
            raise PyfuncInputError(f"unknown params {unknown}; known: {list(DIFFUSION_DEFAULTS)}")
        with torch.no_grad():
            images = generate(
                self.model,
                prompts,
                steps=int(settings["steps"]),
                guidance_scale=float(settings["guidance_scale"]),
                seed=int(settings["seed"]),
                timestep_spacing=str(settings["timestep_spacing"]),
            )
        return pd.DataFrame({"prompt": prompts, "image": png_bytes(images)})


class UniflRewardModel(mlflow.pyfunc.PythonModel):
    """(image, prompt) rows in, one reward column per aesthetic dimension out."""

    def load_context(self, context: Any) -> None:
        from unifl.models.reward import DecoupledRewardModel

        config = dict(context.model_config or {})
        self.batch_size = int(config.get("batch_size", 32))
        self.model = DecoupledRewardModel.load(
            context.artifacts[MODEL_DIR_ARTIFACT], device=_device(config.get("device"))
        )

    def predict(self, context, model_input, params=None):
        """A DataFrame with one reward column per dimension, one row per input row."""
        import torch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [column for column in ("image", "prompt") if column not in frame.columns]
        if missing:
            raise PyfuncInputError(f"input has no {missing} column(s) ({list(frame.columns)})")
        prompts = prompts_from_input(frame[["prompt"]])
        arrays = [decode_image(value, row) for row, value in enumerate(frame["image"])]
        dimensions = list(self.model.dimensions)
        scores = np.zeros((len(arrays), len(dimensions)), dtype=np.float64)
        # Images of one size are batched together; the model resizes each batch itself.
        by_size: dict[tuple[int, ...], list[int]] = {}
        for row, array in enumerate(arrays):
            by_size.setdefault(array.shape, []).append(row)
        with torch.no_grad():
            for rows in by_size.values():
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    pixels = np.stack([arrays[row] for row in chunk])
                    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
                    images = images.to(self.model.device, self.model.dtype)
                    rewards = self.model(images, prompts=[prompts[row] for row in chunk])
                    for column, dimension in enumerate(dimensions):
                        scores[chunk, column] = rewards[dimension].float().cpu().numpy()
        return pd.DataFrame(scores, columns=dimensions)
