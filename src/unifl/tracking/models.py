"""Log and register the pipeline's models: reward models, the tuned diffusion model, LoRA.

* The tuned diffusion model (full UNet inside its diffusers directory) is a custom pyfunc
  "from code" (``mlflow/unifl_diffusion_model.py``): prompts in, PNG images out.
* The decoupled reward model is a pyfunc from code too (``mlflow/unifl_reward_model.py``):
  (image, prompt) rows in, one reward per aesthetic dimension out.
* A LoRA adapter goes through MLflow's ``diffusers`` flavor. That flavor stores the adapter
  and only a *reference* to the base model (hub id or local path), which it loads with
  ``DiffusionPipeline.from_pretrained`` at inference time. It fits a hub base, or a local
  base on storage every consumer can reach; for a local base elsewhere pass
  ``model_config={"base_model": <path>}`` when loading, or log the merged model with
  `log_diffusion_model` instead.

Every function logs into a `StageRun` and, given `registered_model_name`, registers the
model as a new version (alias ``candidate``) and returns its version number.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unifl.config import SamplingConfig
from unifl.tracking.registry import register_model_version
from unifl.tracking.runs import StageRun, tracking_errors

if TYPE_CHECKING:
    import torch

DIFFUSION_MODEL_CODE = "unifl_diffusion_model.py"
REWARD_MODEL_CODE = "unifl_reward_model.py"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
_REPOSITORY_MLFLOW_DIR = Path(__file__).resolve().parents[3] / "mlflow"

_RUNTIME_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "peft",
    "pillow",
    "pandas",
    "numpy",
)


class ModelLoggingError(ValueError):
    """A model cannot be logged: missing directory or model-code file; says which."""


@dataclass(frozen=True)
class LoggedModelRef:
    """Where a logged model lives, and its registry version when it was registered."""

    model_uri: str
    model_id: str | None
    run_id: str
    registered_model_name: str | None = None
    version: str | None = None

    @property
    def registry_uri(self) -> str | None:
        """``models:/<name>/<version>`` of the registered version, if any."""
        if self.registered_model_name is None or self.version is None:
            return None
        return f"models:/{self.registered_model_name}/{self.version}"


def model_code_path(filename: str, code_dir: str | Path | None = None) -> Path:
    """The models-from-code file `filename`: in `code_dir`, else the repository's mlflow/."""
    candidates = [Path(code_dir)] if code_dir else [_REPOSITORY_MLFLOW_DIR, Path.cwd() / "mlflow"]
    for directory in candidates:
        path = directory / filename
        if path.is_file():
            return path
    searched = ", ".join(str(directory) for directory in candidates)
    raise ModelLoggingError(
        f"model code {filename} not found in {searched}; set tracking.model_code_dir"
    )


def runtime_requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc models (inference would otherwise load them).

    ``unifl`` itself is listed unpinned-to-index: it is installed from the project's image.
    """
    requirements = []
    for package in ("mlflow", *_RUNTIME_PACKAGES):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        requirements.append(f"unifl=={importlib.metadata.version('unifl')}")
    return requirements


@contextlib.contextmanager
def _active(run: StageRun) -> Iterator[None]:
    """Make `run` MLflow's active run for the ``log_model`` calls (they log into it).

    MLflow's advice to give an input example and predict type hints is silenced: an input
    example makes logging load the model and generate, and type hints would replace the
    explicit signature.
    """
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    mlflow.set_registry_uri(run.tracking_uri)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.run_id:
            yield
            return
        with tracking_errors(run.tracking_uri):
            mlflow.start_run(run_id=run.run_id, nested=True)
        try:
            yield
        finally:
            mlflow.end_run()


def _register(
    run: StageRun,
    info: Any,
    registered_model_name: str | None,
    evaluation_run_id: str | None,
    tags: Mapping[str, Any] | None,
) -> LoggedModelRef:
    model_id = getattr(info, "model_id", None)
    ref = LoggedModelRef(model_uri=info.model_uri, model_id=model_id, run_id=run.run_id)
    if registered_model_name is None:
        return ref
    with tracking_errors(run.tracking_uri):
        version = register_model_version(
            run.client,
            registered_model_name,
            info.model_uri,
            run_id=run.run_id,
            model_id=model_id,
            tags=tags,
            evaluation_run_id=evaluation_run_id,
        )
    return LoggedModelRef(
        model_uri=info.model_uri,
        model_id=model_id,
        run_id=run.run_id,
        registered_model_name=registered_model_name,
        version=str(version.version),
    )


def _check_dir(path: str | Path, marker: str, kind: str) -> Path:
    directory = Path(path)
    if not (directory / marker).is_file():
        raise ModelLoggingError(f"{directory}: not a {kind} directory (no {marker})")
    return directory


def log_diffusion_model(
    run: StageRun,
    model_dir: str | Path,
    sampling: SamplingConfig | None = None,
    registered_model_name: str | None = None,
    evaluation_run_id: str | None = None,
    name: str = "diffusion_model",
    code_dir: str | Path | None = None,
    tags: Mapping[str, Any] | None = None,
) -> LoggedModelRef:
    """Log a saved diffusers directory as the image-generating pyfunc; register if named.

    The sampling section's steps, guidance scale and timestep spacing become the model's
    defaults, so a served model generates like the evaluated one.
    """
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    directory = _check_dir(model_dir, "model_index.json", "diffusers model")
    sampling = sampling or SamplingConfig()
    defaults = {
        "steps": sampling.steps,
        "guidance_scale": float(sampling.guidance_scale),
        "seed": 0,
        "timestep_spacing": sampling.timestep_spacing,
    }
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string, "prompt"), ColSpec(DataType.binary, "image")]),
        params=ParamSchema(
            [
                ParamSpec("steps", DataType.long, defaults["steps"]),
                ParamSpec("guidance_scale", DataType.double, defaults["guidance_scale"]),
                ParamSpec("seed", DataType.long, defaults["seed"]),
                ParamSpec("timestep_spacing", DataType.string, defaults["timestep_spacing"]),
            ]
        ),
    )
    with _active(run), tracking_errors(run.tracking_uri):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_code_path(DIFFUSION_MODEL_CODE, code_dir)),
            artifacts={"model_dir": str(directory)},
            model_config={**defaults, "device": "auto"},
            signature=signature,
            pip_requirements=runtime_requirements(),
        )
    return _register(run, info, registered_model_name, evaluation_run_id, tags)


def log_reward_model(
    run: StageRun,
    reward_dir: str | Path,
    registered_model_name: str | None = None,
    evaluation_run_id: str | None = None,
    name: str = "reward_model",
    code_dir: str | Path | None = None,
    tags: Mapping[str, Any] | None = None,
) -> LoggedModelRef:
    """Log a saved `DecoupledRewardModel` directory as the scoring pyfunc; register if named."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    from unifl.models.reward import CONFIG_FILE

    directory = _check_dir(reward_dir, CONFIG_FILE, "reward model")
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.string, "prompt")])
    )
    with _active(run), tracking_errors(run.tracking_uri):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_code_path(REWARD_MODEL_CODE, code_dir)),
            artifacts={"model_dir": str(directory)},
            model_config={"device": "auto", "batch_size": 32},
            signature=signature,
            pip_requirements=runtime_requirements(),
        )
    return _register(run, info, registered_model_name, evaluation_run_id, tags)


def save_lora_adapter(unet: torch.nn.Module, directory: str | Path) -> Path:
    """Write the UNet's peft LoRA layers in the diffusers format ``load_lora_weights`` reads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from unifl.io import atomic_directory

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    if not state:
        raise ModelLoggingError("the UNet has no LoRA layers to save (was an adapter added?)")
    with atomic_directory(directory) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp), unet_lora_layers=state, weight_name=LORA_WEIGHTS_FILE, safe_serialization=True
        )
    return Path(directory)


def log_lora_adapter(
    run: StageRun,
    adapter_path: str | Path,
    base_model: str,
    registered_model_name: str | None = None,
    evaluation_run_id: str | None = None,
    name: str = "lora_adapter",
    tags: Mapping[str, Any] | None = None,
) -> LoggedModelRef:
    """Log a LoRA adapter with MLflow's diffusers flavor over `base_model`; register if named.

    A local `base_model` is recorded as an absolute path: the flavor keeps a reference, not a
    copy (see the module docstring).
    """
    import mlflow.diffusers

    adapter = Path(adapter_path)
    if not adapter.exists():
        raise ModelLoggingError(f"LoRA adapter {adapter} does not exist")
    base = Path(base_model)
    reference = str(base.resolve()) if base.exists() else base_model
    with _active(run), tracking_errors(run.tracking_uri):
        info = mlflow.diffusers.log_model(
            adapter_path=str(adapter), base_model=reference, name=name,
            pip_requirements=runtime_requirements(),
        )  # fmt: skip
    return _register(run, info, registered_model_name, evaluation_run_id, tags)
