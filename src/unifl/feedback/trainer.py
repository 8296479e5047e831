"""The feedback-learning trainer: one accelerate loop shared by PeFL, decoupled and adversarial FL.

A stage subclasses `FeedbackTrainer` and implements two things: `batch(indices)`
(its data: images with annotations, or prompts) and `compute_loss(batch,
generator)` (its objective). Everything else is here, written once:

* **accelerate.** The UNet (and any other trainable module, e.g. the
  discriminator) goes through `accelerator.prepare` with its optimizer and
  learning-rate schedule; backward, gradient clipping, accumulation and
  mixed-precision autocast go through the accelerator, so `accelerate launch`
  with DDP runs this code unchanged. The UNet calls of the sampling code go
  through the prepared wrapper (`PreparedUNet`), so DDP sees every forward.
* **What trains.** LoRA adapters (peft, `to_q/to_k/to_v/to_out.0`, gaussian
  initialisation) on a frozen UNet, or the full UNet. The VAE, the text
  encoders and every model a stage scores with (reward, perceptual) are frozen:
  eval mode, `requires_grad=False`. Under mixed precision the frozen UNet
  weights take the compute dtype and the trainable parameters stay fp32
  (`cast_training_params`); the VAE stays fp32 when `project.vae_fp32`, and its
  decode then runs outside autocast (SDXL's VAE overflows in fp16).
* **Randomness.** Every random draw of micro-batch `m` (noise, gradient step,
  MSE timesteps) comes from a CPU generator seeded with `(seed, m)`, and the
  data order is a function of `(seed, m)` too (`DataStream`). A resumed run
  therefore draws exactly what the uninterrupted run drew, with no generator
  state to carry; accelerate also restores the global RNGs (for anything
  inside the models that draws from them).
* **Several processes (DDP).** The global micro-batch is `trainer.batch_size`
  times the number of processes (times `gradient_accumulation_steps` per
  step), and P processes with batch size B compute the update that one
  process computes with batch size B * P. Three rules make that exact: every
  process seeds the generator of micro-batch `m` identically, so draws that
  must agree (the gradient step `t`) agree without communication; per-sample
  draws (`randn`, the MSE timesteps) are drawn for the whole global
  micro-batch and each process keeps its own rows (`local_rows`), the rows of
  the items `DataStream` gives it; and every loss is a mean over the
  micro-batch, so DDP's average of the processes' gradients is the gradient
  of the global mean. Logged numbers are averaged over the processes, and at
  every checkpoint the processes compare digests of their trainable
  parameters (recorded in `trainer_state.json`) and stop on a mismatch.
* **Sharded processes (FSDP2).** Each process holds a shard of every UNet
  parameter (a DTensor). Whatever reads or writes the trainable parameters
  goes through `full_trainable_state` (gather whole fp32 CPU tensors onto the
  main process) and `load_trainable_state` (each process keeps its shard of
  whole tensors), both collectives that every process calls, so a
  checkpoint's `trainable_N.safetensors` and the export are the same files as
  under DDP (accelerate adds its sharded model and optimizer, and resumes from
  those). The EMA averages each process's shards in place and is gathered the
  same way. Only a full fine-tune is sharded (LoRA trains under DDP), and the
  digest check is skipped.
* **Checkpoints.** Every `trainer.checkpoint_every` steps and at the end,
  `accelerator.save_state` writes the trainable parameters (only those: a LoRA
  checkpoint is the adapter, not a copy of the UNet), optimizer, LR schedule,
  RNG states and the EMA into `checkpoints/.step-N.tmp`, which is renamed to
  `checkpoints/step-N` once complete. A crash, a NaN or a kill leaves the
  previous checkpoints as they were. A new run in the same `out_dir` resumes
  from the newest one.
* **Stops.** A NaN or infinite loss (or gradient norm) stops training with a
  `NonFiniteLossError` naming the step, the loss terms and the checkpoint a
  rerun would resume from.
* **Output.** `export()` writes the model as a diffusers directory
  (`save_base_model`, LoRA merged into fp32 weights, EMA weights when EMA is
  on) and, with LoRA, the adapter alone in diffusers' LoRA format
  (`pytorch_lora_weights.safetensors`, what MLflow's diffusers flavor logs).
  Every process gathers; the main process writes.

The loss history is one row per optimisation step (`history`), reported to
`metrics_callback(step, row)` (no MLflow import here) and shown on a tqdm bar.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unifl.feedback.losses import noise_prediction_mse
from unifl.feedback.sampling import FeedbackSample, FeedbackSchedule, feedback_sample
from unifl.io import atomic_directory, atomic_path, write_json
from unifl.models.base import (
    BaseModel,
    PromptEmbeds,
    decode_latents,
    encode_images,
    encode_prompt,
    predict_noise,
    save_base_model,
    unconditional_embeds,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from unifl.config import Params

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
"""`callback(step, row)`: called on the main process after every optimisation step."""

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "unifl-feedback-checkpoint/1"
MODEL_DIR = "model"
LORA_DIR = "lora"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
_DTYPES: dict[str, torch.dtype] = {
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class TrainingError(RuntimeError):
    """Feedback training cannot go on; the message says at which step and why."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN or infinite; the last checkpoint is intact."""


class ResumeError(ValueError):
    """A checkpoint does not fit the run that tries to resume from it; names the file and field."""


# --------------------------------------------------------------------------- randomness


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, process, micro-batch, ...)."""
    entropy = [int(part) % (1 << 64) for part in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


class DataStream:
    """Which items each process takes for micro-batch `m`, as a pure function of `m`.

    The items form an endless stream of epochs, each a seeded permutation of
    `range(num_items)`. Global micro-batch `m` covers stream positions
    `[m * B * P, (m + 1) * B * P)` for batch size `B` and `P` processes, and
    process `p` takes its own `B` of them: the data is sharded by process, no
    item is seen twice before an epoch ends, and resuming at any step needs
    nothing but the step.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        if num_items < 1:
            raise ValueError("the data stream needs at least one item")
        if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"bad sharding: batch_size {batch_size}, process {process_index} of {num_processes}"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self._epochs: dict[int, Tensor] = {}

    def _permutation(self, epoch: int) -> Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            generator = torch.Generator().manual_seed(derive_seed(self.seed, 0xDA7A, epoch))
            self._epochs[epoch] = torch.randperm(self.num_items, generator=generator)
        return self._epochs[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        """Item indices of micro-batch `micro_batch` on this process."""
        start = (micro_batch * self.num_processes + self.process_index) * self.batch_size
        positions = range(start, start + self.batch_size)
        return [int(self._permutation(q // self.num_items)[q % self.num_items]) for q in positions]


def parameter_digest(parameters: Mapping[str, Tensor]) -> str:
    """SHA-256 of parameters' names, dtypes, shapes and exact bytes (bitwise identity)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(parameters):
        value = parameters[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- full state


def _plain_module(module: nn.Module) -> nn.Module:
    """`module` without its data-parallel or compile wrapper; names are then parameter names.

    FSDP2 wraps nothing (it shards the module in place), so a sharded module comes back as is.
    """
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_torch_compile=False)


def _is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 parameter: each process holds a shard of it)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: Tensor) -> Tensor:
    """This process's own part of `tensor`: its shard when sharded, else the tensor itself.

    Under `no_grad` the shard is the DTensor's storage, so in-place updates of it update the
    DTensor without any communication.
    """
    return tensor.to_local() if _is_sharded(tensor) else tensor


def _receives_full_state() -> bool:
    """Whether this process receives gathered state: the main process (rank 0), or the only one."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of `module` as whole fp32 CPU tensors, by parameter name.

    `module` may be plain, wrapped (DDP) or sharded in place by FSDP2, whose
    parameters are DTensors of which each process holds a shard. Gathering the
    shards is a collective: every process must call this, in the same order.
    With several processes only the main process (rank 0) receives the state
    and the others get an empty dict (`cpu_offload`, so that one process alone
    holds a whole copy in host memory); a single process receives it too. The
    tensors are copies, never the live parameters.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plain = _plain_module(module)
    names = [name for name, parameter in plain.named_parameters() if parameter.requires_grad]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    gathered = get_model_state_dict(plain, options=options)
    if not gathered:
        return {}
    # Unsharded CPU parameters come back as themselves: copy those, and only those.
    live = {_local(p).untyped_storage().data_ptr() for p in plain.parameters()}
    state = {}
    for name in names:
        value = gathered.pop(name).detach()
        if value.untyped_storage().data_ptr() in live:
            value = value.clone()
        state[name] = value.to(torch.float32).contiguous()
    return state


def load_trainable_state(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Write whole tensors `state` (by parameter name) into the trainable parameters of `module`.

    The counterpart of `full_trainable_state`. Every process passes the same
    whole state (read from the same checkpoint file, say); a sharded (FSDP2)
    module keeps each process's own shard of it, which is a collective: every
    process must call this. Values are cast to the parameters' dtypes. Raises
    `ValueError` naming the parameters missing from `state`, those it holds
    that are not trainable in `module`, and those of another shape; nothing is
    written then.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    plain = _plain_module(module)
    trainable = {name: p for name, p in plain.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(state))
    unexpected = sorted(set(state) - set(trainable))
    if missing or unexpected:
        raise ValueError(
            f"not this module's trainable parameters: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''}"
        )
    for name, parameter in trainable.items():
        if state[name].shape != parameter.shape:  # a DTensor's shape is the whole tensor's
            raise ValueError(
                f"{name} has shape {tuple(state[name].shape)}, the module's parameter "
                f"{tuple(parameter.shape)}"
            )
    values = {name: state[name].detach() for name in trainable}
    # strict=False: the frozen parameters (a LoRA run's UNet) keep their values.
    set_model_state_dict(
        plain, values, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def unsharded_copy(module: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """A plain copy of `module` (unwrapped, on its device) with `weights` in place of its own.

    `weights` holds whole tensors of trainable parameters, by name (as
    `full_trainable_state` gives them, EMA averages perhaps put in). A
    replicated module is deep-copied. A sharded (FSDP2) one holds shards only,
    so its class (a diffusers or transformers model) is rebuilt from its config
    on the meta device and takes `weights` as its parameters: they must then
    hold every parameter, as in a full fine-tune. Runs on one process.
    """
    plain = _plain_module(module)
    if not any(_is_sharded(p) for p in plain.parameters()):
        copied = copy.deepcopy(plain)
        load_trainable_state(copied, weights)
        return copied
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps the class for FSDP<class>, a subclass of FSDPModule and the model class.
    model_class = next(c for c in type(plain).__mro__ if not issubclass(c, FSDPModule))
    names = {name for name, _ in plain.named_parameters()}
    missing = sorted(names - set(weights))
    if missing:
        raise TrainingError(
            f"{model_class.__name__}: a sharded model is copied from its trainable parameters "
            f"alone, but {len(missing)} are frozen ({missing[:3]}); shard only full fine-tunes"
        )
    device = next(_local(p).device for p in plain.parameters())
    with init_empty_weights():
        copied = model_class.from_config(plain.config)
    copied.load_state_dict({name: weights[name] for name in names}, strict=True, assign=True)
    return copied.to(device)


# --------------------------------------------------------------------------- EMA


class ExponentialMovingAverage:
    """EMA of the trainable parameters, kept in fp32 on their device.

    The decay ramps up as `min(decay, (1 + n) / (10 + n))` after `n` updates
    (as diffusers' EMAModel does by default), so that a short run is not just
    the initial weights: with decay 0.9999 and a few hundred toy steps a plain
    EMA would barely move. `state_dict`/`load_state_dict` make it a checkpoint
    object for `accelerator.register_for_checkpointing`.

    Sharded parameters (FSDP2) give sharded averages with the same layout: the
    average is elementwise, so each process updates its own shards, without
    communication. `full_state()` and `state_dict()` gather whole tensors (a
    collective, every process calls them; the main process receives them, as
    in `full_trainable_state`), and `load_state_dict` takes whole tensors and
    keeps each process's shards.
    """

    def __init__(self, parameters: Mapping[str, Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, parameters: Mapping[str, Tensor]) -> None:
        decay = self.current_decay()
        for name, parameter in parameters.items():
            _local(self.shadow[name]).lerp_(_local(parameter.detach()).float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Mapping[str, Tensor]) -> None:
        """Write the averaged values into `parameters` (same names, same sharding)."""
        missing = sorted(set(parameters) - set(self.shadow))
        if missing:
            raise ValueError(f"EMA has no average for parameters {missing[:3]}")
        for name, parameter in parameters.items():
            target = _local(parameter)
            target.copy_(_local(self.shadow[name]).to(target.device, target.dtype))

    def full_state(self) -> dict[str, Tensor]:
        """The averages as whole fp32 CPU tensors, on the main process ({} on the others).

        A collective when the averages are sharded: every process calls it.
        """
        receives = _receives_full_state()
        state = {}
        for name, value in self.shadow.items():
            whole = value.full_tensor() if _is_sharded(value) else value
            if receives:
                state[name] = whole.detach().to("cpu", torch.float32, copy=True)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.full_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise ResumeError("the checkpoint's EMA averages other parameters than this model's")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ResumeError(
                    f"the checkpoint's EMA average of {name} has shape {tuple(value.shape)}, "
                    f"the model's {tuple(self.shadow[name].shape)}"
                )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in shadow.items():
            current = self.shadow[name]
            value = value.to(_local(current).device, torch.float32)
            if _is_sharded(current):
                # Every process holds the whole tensor: each keeps its shard, no communication.
                value = distribute_tensor(
                    value, current.device_mesh, current.placements, src_data_rank=None
                )
            self.shadow[name] = value


# --------------------------------------------------------------------------- pieces


def weights_digest(*modules: nn.Module, samples: int = 256) -> str:
    """A digest of the modules' weights: up to `samples` evenly strided values of each tensor,
    rounded to bf16.

    It tells base models apart where their paths cannot (a resumed pipeline run reads the
    same model from another artifact path), costs milliseconds even for SDXL, and gives
    the same digest for weights loaded in fp32 or bf16.
    """
    import hashlib

    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // samples)][:samples]
            digest.update(f"{index}.{name}".encode())
            digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class LinearWarmup:
    """LR factor: linear from 1/(W+1) to 1 over `W` steps, then constant (a class so it checkpoints)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / (self.warmup_steps + 1))


class PreparedUNet:
    """The UNet as `BaseModel` users see it: calls go through the prepared module, attributes not.

    `accelerator.prepare` may wrap the UNet (DDP, an autocast forward); DDP has
    no `config` or `dtype`. Calls go to the prepared module so that DDP's
    gradient hooks see every forward; everything else is read from the plain
    module.
    """

    def __init__(self, prepared: nn.Module, plain: nn.Module) -> None:
        self.__dict__["_prepared"] = prepared
        self.__dict__["_plain"] = plain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_plain"], name)


@dataclass
class StepOutput:
    """What a stage's `compute_loss` returns: the loss to back-propagate and numbers to log."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainableGroup:
    """A module trained with its own optimizer and learning-rate schedule (UNet, discriminator)."""

    name: str
    module: nn.Module
    learning_rate: float
    prepared: Any = None
    optimizer: Any = None
    scheduler: Any = None

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}


@dataclass
class TrainingSummary:
    """How a `train()` call went."""

    steps: int
    resumed_from: int | None
    history: list[dict[str, float]]
    seconds: float
    steps_per_second: float


@dataclass
class ExportedModel:
    """Where `export()` wrote the model (and the LoRA adapter, when LoRA was trained)."""

    model_dir: Path
    lora_dir: Path | None
    extra: dict[str, Path] = field(default_factory=dict)
    model: BaseModel | None = None
    """The exported model in memory, when `export(keep_model=True)` asked for it (main process)."""


def move_module(
    module: nn.Module, device: torch.device | None, dtype: torch.dtype | None
) -> nn.Module:
    """`module.to(...)` passing only what changes (diffusers warns on every dtype cast)."""
    current = next(module.parameters(), None)
    kwargs: dict[str, Any] = {}
    if device is not None and (current is None or current.device != torch.device(device)):
        kwargs["device"] = device
    if (
        dtype is not None
        and current is not None
        and any(p.dtype != dtype for p in module.parameters() if p.is_floating_point())
    ):
        kwargs["dtype"] = dtype
    return module.to(**kwargs) if kwargs else module


def freeze_module(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a model that scores but never learns."""
    module.eval()
    module.requires_grad_(False)
    return module


def mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean of log rows (micro-batches of one step); keys missing in a row are skipped."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def checkpoint_steps(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `out_dir/checkpoints`, oldest first, as (step, path)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_history(out_dir: str | Path, history: Sequence[Mapping[str, float]]) -> None:
    """history.json and history.csv (one row per step; the DVC plots read the CSV)."""
    out = Path(out_dir)
    rows = [dict(row) for row in history]
    write_json(out / HISTORY_JSON, [_json_safe(row) for row in rows])
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with atomic_path(out / HISTORY_CSV) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _json_safe(row: Mapping[str, float]) -> dict[str, float | None]:
    return {
        k: (v if isinstance(v, int | str) or math.isfinite(v) else None) for k, v in row.items()
    }


# --------------------------------------------------------------------------- trainer


class FeedbackTrainer:
    """The loop shared by the feedback stages; subclasses supply `batch` and `compute_loss`.

    Construction moves `model` to the accelerator's device, freezes its VAE and
    text encoders, and adds LoRA adapters to its UNet (or makes the whole UNet
    trainable): the model object is modified in place and belongs to the
    trainer from then on. A subclass finishes its own set-up (frozen scorers
    via `frozen`, more trainable modules via `add_trainable`) in its
    `__init__`; the optimizers are created on the first `train()`.

    Args:
        model: the base model to tune.
        params: the whole configuration (`project`, `trainer` and the stage's section).
        out_dir: where checkpoints, the model and the history go.
        steps: optimisation steps of the run (a resumed run counts from its checkpoint).
        learning_rate: AdamW learning rate of the UNet's trainable parameters.
        num_items: size of the data (images or prompts) for the `DataStream`.
        timestep_spacing: spacing of the feedback schedule; None: the scheduler's own.
        schedule_steps: steps of the feedback schedule; None: `trainer.num_inference_steps`.
        metrics_callback: `callback(step, row)` after each step (main process).
        progress: show the tqdm bar.
    """

    stage_name: ClassVar[str] = "feedback"

    def __init__(
        self,
        model: BaseModel,
        params: Params,
        out_dir: str | Path,
        *,
        steps: int,
        learning_rate: float,
        num_items: int,
        timestep_spacing: str | None = None,
        schedule_steps: int | None = None,
        metrics_callback: MetricsCallback | None = None,
        progress: bool = True,
    ) -> None:
        self.params = params
        self.config = params.trainer
        self.mse_weight = params.mse_weight(self.stage_name)
        self.grad_guidance_scale = float(params.stage_value(self.stage_name, "grad_guidance_scale"))
        self.out_dir = Path(out_dir)
        self.steps = int(steps)
        self.metrics_callback = metrics_callback
        self.progress = progress
        if self.steps < 0:
            raise ValueError(f"{self.stage_name}.steps must be >= 0, got {steps}")
        prediction_type = model.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type != "epsilon":
            raise ValueError(
                f"{model.source or 'model'}: the feedback sampling math needs an epsilon-prediction "
                f"model, the scheduler says {prediction_type!r}"
            )
        self.accelerator = self._make_accelerator()
        self.device = self.accelerator.device
        self.seed = int(params.project.seed)
        self.process_index = int(self.accelerator.process_index)
        self.compute_dtype = _DTYPES[self.accelerator.mixed_precision]
        self.vae_dtype = torch.float32 if params.project.vae_fp32 else self.compute_dtype
        self.model = model
        self._place_model(model, learning_rate)
        self.schedule = FeedbackSchedule.from_scheduler(
            model.scheduler, schedule_steps or self.config.num_inference_steps, timestep_spacing
        )
        self._prepared = False
        self.stream_items(num_items)
        self.history: list[dict[str, float]] = []
        self.ema: ExponentialMovingAverage | None = None
        self.resumed_from: int | None = None
        self._last_checkpoint: Path | None = None
        self.unet_model = model  # replaced by the prepared view in `_prepare`

    # ------------------------------------------------------------------ set-up
    def _make_accelerator(self) -> Accelerator:
        from accelerate import Accelerator

        from unifl.models.precision import resolve_device

        device = resolve_device(self.params.project.device)
        mixed_precision = self.params.project.mixed_precision if device.type != "cpu" else "no"
        from accelerate.utils import DistributedDataParallelKwargs

        return Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=self.config.gradient_accumulation_steps,
            cpu=device.type == "cpu",
            # The LR schedule counts optimisation steps whatever the number of processes.
            step_scheduler_with_optimizer=False,
            # A trainable module may hold parameters its loss never reaches (CLIP's logit_scale
            # in the discriminator); DDP would otherwise fail on the second step.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )

    def _place_model(self, model: BaseModel, learning_rate: float) -> None:
        from diffusers.training_utils import cast_training_params

        unet = model.unet
        if getattr(unet, "peft_config", None):
            raise TrainingError(f"{model.source or 'model'}: the UNet already carries an adapter")
        # Before training changes any of them: what a checkpoint must have started from.
        self.base_digest = weights_digest(unet, model.vae, *model.text_encoders())
        model.freeze()
        for encoder in model.text_encoders():
            # fp32 text encoders: run once per batch without gradients, exported unchanged.
            move_module(encoder, self.device, torch.float32)
        move_module(model.vae, self.device, self.vae_dtype)
        if self.config.use_lora:
            unet.requires_grad_(False)
            move_module(unet, self.device, self.compute_dtype)
            # The gaussian initialisation draws from the global RNG: seed it, so that the same
            # configuration always starts from the same adapter.
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed(self.seed, 0x10A) % (2**63))
                unet.add_adapter(self._lora_config())
            cast_training_params(unet, dtype=torch.float32)
        else:
            move_module(unet, self.device, torch.float32)
            unet.requires_grad_(True)
        if self.config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.groups: list[TrainableGroup] = [TrainableGroup("unet", unet, learning_rate)]

    def _lora_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha or self.config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(self.config.lora_target_modules),
        )

    def stream_items(self, num_items: int) -> None:
        """Draw the micro-batches from `num_items` items; a subclass whose data is known only
        once the model is placed (samples of it) calls this again before `train()`."""
        if self._prepared:
            raise TrainingError("stream_items must be called before train()")
        self.data = DataStream(
            num_items,
            self.config.batch_size,
            self.seed,
            self.process_index,
            self.accelerator.num_processes,
        )

    def frozen(self, module: nn.Module) -> nn.Module:
        """Move a scoring model (reward, perceptual) to the device, frozen, in fp32."""
        return freeze_module(move_module(module, self.device, torch.float32))

    def add_trainable(self, name: str, module: nn.Module, learning_rate: float) -> nn.Module:
        """Train `module` too (e.g. the discriminator), with its own optimizer; before `train()`."""
        if self._prepared:
            raise TrainingError("add_trainable must be called before train()")
        if any(group.name == name for group in self.groups):
            raise TrainingError(f"a trainable module named {name!r} exists already")
        if self.accelerator.mixed_precision == "fp16":
            raise TrainingError(
                "fp16 with a second trainable module would share one gradient scaler between two "
                "optimizers; use project.mixed_precision=bf16"
            )
        move_module(module, self.device, torch.float32)
        module.requires_grad_(True)
        module.train()
        self.groups.append(TrainableGroup(name, module, learning_rate))
        return module

    def group(self, name: str) -> TrainableGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def _sharded_run(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _prepare(self) -> None:
        from torch.optim.lr_scheduler import LambdaLR

        if self._prepared:
            return
        if self._sharded_run() and self.config.use_lora:
            raise TrainingError(
                "FSDP shards a full fine-tune: the exported UNet is rebuilt from the gathered "
                "trainable parameters, which under LoRA leave out the frozen weights; train "
                "LoRA under DDP (trainer.use_lora=false for FSDP)"
            )
        for group in self.groups:
            trainable = list(group.named_trainable().values())
            if not trainable:
                raise TrainingError(f"{group.name}: no trainable parameters")
            optimizer = torch.optim.AdamW(
                trainable, lr=group.learning_rate, weight_decay=self.config.weight_decay
            )
            group.optimizer = optimizer
            group.scheduler = LambdaLR(optimizer, LinearWarmup(self.config.warmup_steps))
        modules = [group.module for group in self.groups]
        optimizers = [group.optimizer for group in self.groups]
        schedulers = [group.scheduler for group in self.groups]
        prepared = self.accelerator.prepare(*modules, *optimizers, *schedulers)
        if not isinstance(prepared, tuple | list):
            prepared = (prepared,)
        count = len(self.groups)
        for index, group in enumerate(self.groups):
            group.prepared = prepared[index]
            group.optimizer = prepared[count + index]
            group.scheduler = prepared[2 * count + index]
        self.unet_model = dataclasses.replace(
            self.model, unet=PreparedUNet(self.groups[0].prepared, self.model.unet)
        )
        if self.config.ema_decay is not None:
            self.ema = ExponentialMovingAverage(
                self.groups[0].named_trainable(), self.config.ema_decay
            )
            self.accelerator.register_for_checkpointing(self.ema)
        self.accelerator.register_save_state_pre_hook(self._save_trainable_hook)
        self.accelerator.register_load_state_pre_hook(self._load_trainable_hook)
        self._prepared = True

    # ----------------------------------------------------------- stage interface
    def batch(self, micro_batch: int) -> Any:
        """Micro-batch `micro_batch` of this process: `self.data.indices(micro_batch)` of the data."""
        raise NotImplementedError

    def compute_loss(self, batch: Any, generator: torch.Generator) -> StepOutput:
        """The stage's objective for one micro-batch; random draws come from `generator`."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        return {
            "stage": self.stage_name,
            "family": self.model.family,
            "use_lora": self.config.use_lora,
            "lora_rank": self.config.lora_rank if self.config.use_lora else None,
            "lora_alpha": self.config.lora_alpha if self.config.use_lora else None,
            "lora_target_modules": self.config.lora_target_modules
            if self.config.use_lora
            else None,
            "base_model": self.base_digest,
            # The checkpoint restores these with the optimiser, the schedule and the average:
            # a changed value would be ignored without a word.
            "learning_rates": {group.name: group.learning_rate for group in self.groups},
            "weight_decay": self.config.weight_decay,
            "warmup_steps": self.config.warmup_steps,
            "ema_decay": self.config.ema_decay,
            "trainable": [group.name for group in self.groups],
            "batch_size": self.config.batch_size,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "seed": self.seed,
        }

    # ------------------------------------------------------------- helpers for stages
    def generator_for(self, micro_batch: int) -> torch.Generator:
        """The CPU generator of micro-batch `micro_batch`, seeded alike on every process.

        Draws for the whole micro-batch (the gradient step) are thus the same on
        every process; per-sample draws go through `randn` / `local_rows`. The
        0 in the seed keeps the numbers that single-process runs have always drawn.
        """
        seed = derive_seed(self.seed, 0, micro_batch)
        return torch.Generator().manual_seed(seed)

    def local_rows(self, global_draw: Tensor) -> Tensor:
        """This process's rows of a per-sample draw made for the whole global micro-batch.

        Process `p` of `P` holds stream positions `p*B .. (p+1)*B - 1` of the global
        micro-batch (`DataStream`), so it keeps those rows: P processes with batch B
        see the same per-sample numbers as one process with batch B * P.
        """
        processes = self.accelerator.num_processes
        if global_draw.shape[0] % processes:
            raise ValueError(
                f"a global draw of {global_draw.shape[0]} rows does not split over {processes} "
                "processes"
            )
        rows = global_draw.shape[0] // processes
        return global_draw[self.process_index * rows : (self.process_index + 1) * rows]

    def randn(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        """Per-sample standard normal noise for this process's `shape[0]` samples, fp32 on the device.

        Drawn on the CPU (same numbers on any device) for the whole global micro-batch
        (`shape[0]` times the number of processes); this process keeps its rows.
        """
        shape = tuple(shape)
        processes = self.accelerator.num_processes
        noise = torch.randn((shape[0] * processes, *shape[1:]), generator=generator)
        return self.local_rows(noise).to(self.device)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.model.latent_size
        return (batch_size, self.model.latent_channels, size, size)

    @torch.no_grad()
    def prompt_embeds(self, prompts: list[str]) -> tuple[PromptEmbeds, PromptEmbeds | None]:
        """Conditional and unconditional embeddings (the latter only when guidance needs it)."""
        embeds = encode_prompt(self.model, prompts).detach()
        needs_uncond = self.config.guidance_scale != 1.0 or self.grad_guidance_scale != 1.0
        uncond = unconditional_embeds(self.model, len(prompts)).detach() if needs_uncond else None
        return embeds, uncond

    def feedback(
        self,
        latents: Tensor,
        start: int,
        grad_step: int,
        embeds: PromptEmbeds,
        uncond: PromptEmbeds | None,
    ) -> FeedbackSample:
        """Denoise `latents` (at step `start`) to `grad_step` and predict x0 with gradients."""
        truncate = min(self.config.truncated_backprop_steps, start - grad_step + 1)
        return feedback_sample(
            self.unet_model,
            latents,
            self.schedule,
            start,
            grad_step,
            embeds,
            uncond,
            guidance_scale=self.config.guidance_scale,
            grad_guidance_scale=self.grad_guidance_scale,
            truncate=truncate,
            # Block-level checkpointing is the UNet's own; whole-call checkpointing only pays
            # when more than one call keeps its graph.
            gradient_checkpointing=self.config.gradient_checkpointing and truncate > 1,
            decode=False,
        )

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Real images in [0, 1] -> scaled latents (posterior mode), without gradients."""
        images = images.to(self.device)
        if self.vae_dtype == torch.float32 and self.compute_dtype != torch.float32:
            with torch.autocast(device_type=self.device.type, enabled=False):
                return encode_images(self.model, images.float())
        return encode_images(self.model, images)

    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode to pixels in [0, 1] with gradients; outside autocast when the VAE is fp32."""
        if self.vae_dtype == torch.float32 and self.compute_dtype != torch.float32:
            with torch.autocast(device_type=self.device.type, enabled=False):
                return decode_latents(self.model, latents.float())
        return decode_latents(self.model, latents)

    def add_noise_regulariser(
        self,
        loss: Tensor,
        logs: dict[str, float],
        latents: Tensor,
        embeds: PromptEmbeds,
        generator: torch.Generator,
    ) -> Tensor:
        """`loss` plus the weighted MSE regulariser (logged as `mse`) when its weight is set."""
        if self.mse_weight <= 0:
            return loss
        mse = self.noise_regulariser(latents, embeds, generator)
        logs["mse"] = float(mse.detach())
        return loss + self.mse_weight * mse

    def noise_regulariser(
        self, latents: Tensor, embeds: PromptEmbeds, generator: torch.Generator
    ) -> Tensor:
        """The pre-training loss on real latents at uniform random training timesteps."""
        count = latents.shape[0]
        limit = int(self.model.scheduler.config.num_train_timesteps)
        processes = self.accelerator.num_processes
        timesteps = self.local_rows(
            torch.randint(0, limit, (count * processes,), generator=generator)
        )
        noise = self.randn(latents.shape, generator)
        alphas = self.model.scheduler.alphas_cumprod[timesteps].to(self.device, torch.float32)
        alphas = alphas.view(-1, 1, 1, 1)
        noisy = alphas.sqrt() * latents + (1.0 - alphas).sqrt() * noise
        noise_pred = predict_noise(self.unet_model, noisy, timesteps, embeds)
        return noise_prediction_mse(noise_pred, noise)

    # ------------------------------------------------------------- checkpoints
    def _save_trainable_hook(
        self, models: list[nn.Module], weights: list[Any], output_dir: str
    ) -> None:
        from safetensors.torch import save_file

        for index, module in enumerate(models):
            state = full_trainable_state(module)  # every process: gathering shards is a collective
            if self.accelerator.is_main_process:
                save_file(state, str(Path(output_dir) / f"trainable_{index}.safetensors"))
        weights.clear()  # accelerate would otherwise save every frozen UNet weight too

    def _load_trainable_hook(self, models: list[nn.Module], input_dir: str) -> None:
        # Under FSDP accelerate loads its own sharded model and passes no models here.
        from safetensors.torch import load_file

        for index, module in enumerate(models):
            path = Path(input_dir) / f"trainable_{index}.safetensors"
            if not path.is_file():
                raise ResumeError(f"{path}: missing trainable parameters of the checkpoint")
            try:
                load_trainable_state(module, load_file(str(path)))
            except ValueError as exc:
                raise ResumeError(f"{path}: {exc}") from None
        models.clear()

    def process_digests(self) -> list[str]:
        """`parameter_digest` of the trainable parameters on every process, in process order.

        Data-parallel replicas apply the same all-reduced gradients, so the
        digests are equal; a difference means the processes diverged. Each
        process digests its own replica, so this reads the local parameters, not
        a gathered state. Empty under FSDP, where each process holds only shards.
        """
        from accelerate.utils import gather_object

        if self._sharded_run():
            return []
        named = {
            f"{group.name}.{name}": parameter
            for group in self.groups
            for name, parameter in group.named_trainable().items()
        }
        digest = parameter_digest(named)
        if self.accelerator.num_processes == 1:
            return [digest]
        return [str(item) for item in gather_object([digest])]

    def save_checkpoint(self, step: int) -> Path:
        """Write a resumable checkpoint of step `step`, whole or not at all; prune old ones."""
        root = self.out_dir / CHECKPOINTS_DIR
        final = root / f"step-{step:08d}"
        tmp = root / f".step-{step:08d}.tmp"
        accelerator = self.accelerator
        digests = self.process_digests()
        if len(set(digests)) > 1:
            raise TrainingError(
                f"{self.stage_name}: step {step}: the processes' trainable parameters differ "
                f"(digests by process: {[d[:12] for d in digests]}); the data-parallel replicas "
                "diverged, so no checkpoint of this step was written"
            )
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Every process writes its own RNG state into `tmp`: none may still be writing when the
        # main process renames the directory.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(
                tmp / TRAINER_STATE_FILE,
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "fingerprint": self.fingerprint(),
                    "history": [_json_safe(row) for row in self.history],
                    "num_processes": accelerator.num_processes,
                    "process_digests": digests,
                },
            )
            if final.exists():
                old = root / f".step-{step:08d}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            for _, path in checkpoint_steps(self.out_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
        self._last_checkpoint = final
        return final

    def resume(self) -> int:
        """Load the newest checkpoint in `out_dir` if there is one; the step to continue from."""
        checkpoint = self.checkpoint_to_resume()
        if checkpoint is None:
            return 0
        step, path, state = checkpoint
        if state.get("num_processes") != self.accelerator.num_processes:
            logger.warning(
                "%s: resuming with %s processes, the checkpoint used %s: the data order differs",
                path,
                self.accelerator.num_processes,
                state.get("num_processes"),
            )
        self.accelerator.load_state(str(path))
        self.history = [
            {k: (float("nan") if v is None else v) for k, v in row.items()}
            for row in state.get("history", [])
        ]
        self.resumed_from = step
        self._last_checkpoint = path
        return step

    def checkpoint_to_resume(self) -> tuple[int, Path, dict[str, Any]] | None:
        """The newest checkpoint in `out_dir` (step, directory, trainer state), checked
        against this run; a checkpoint of another run is a `ResumeError`.

        A stage with costly set-up (the adversarial stage's real samples) calls it before
        that work, so another run's directory fails at once.
        """
        import json

        found = checkpoint_steps(self.out_dir)
        if not found:
            return None
        step, path = found[-1]
        state_path = path / TRAINER_STATE_FILE
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ResumeError(f"{state_path}: not valid JSON: {exc.msg}") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(
                f"{state_path}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        saved = state.get("fingerprint", {})
        current = self.fingerprint()
        changed = [key for key in current if saved.get(key) != current[key]]
        if changed:
            details = ", ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed)
            raise ResumeError(
                f"{path}: the checkpoint was made by a different run ({details}); use another "
                f"output directory or remove {path.parent}"
            )
        if step > self.steps:
            raise ResumeError(
                f"{path}: the checkpoint is at step {step}, past {self.stage_name}.steps={self.steps}"
            )
        return step, path, state

    # ------------------------------------------------------------------- loop
    def _check_finite(self, value: Tensor, step: int, what: str, logs: Mapping[str, float]) -> None:
        local = value.detach().float().reshape(1).to(self.device)
        flags = self.accelerator.gather(torch.isfinite(local).float())
        if bool(flags.min() < 1):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
            where = (
                f"the last checkpoint {self._last_checkpoint} is intact: a rerun with the same "
                "settings resumes there, one with a lower learning rate starts in another "
                "output directory"
                if self._last_checkpoint is not None
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"{self.stage_name}: step {step}: {what} is {float(local[0])} on some process "
                f"(terms: {terms or 'none'}); training stopped, {where}"
            )

    def _trainable_of_unet(self) -> dict[str, nn.Parameter]:
        return self.groups[0].named_trainable()

    def _iterate_steps(self, start: int) -> Iterator[int]:
        bar = tqdm(
            total=self.steps,
            initial=start,
            desc=f"{self.stage_name}",
            disable=not (self.progress and self.accelerator.is_main_process),
            dynamic_ncols=True,
        )
        try:
            for step in range(start, self.steps):
                yield step
                if self.history:
                    bar.set_postfix(_postfix(self.history[-1]), refresh=False)
                bar.update(1)
        finally:
            bar.close()

    def train_step(self, step: int) -> dict[str, float]:
        """Optimisation step `step` (0-based): its micro-batches, backward, clip, update, EMA.

        Returns the step's log row (means over micro-batches, grad norms, learning
        rates, seconds). `train()` adds history, callback and checkpoints around it.
        """
        self._prepare()
        number = step + 1
        clock = time.perf_counter()
        accumulation = self.config.gradient_accumulation_steps
        rows = []
        for micro in range(accumulation):
            micro_batch = step * accumulation + micro
            batch = self.batch(micro_batch)
            generator = self.generator_for(micro_batch)
            with self.accelerator.accumulate(*[group.prepared for group in self.groups]):
                with self.accelerator.autocast():
                    output = self.compute_loss(batch, generator)
                logs = {"loss": float(output.loss.detach()), **output.logs}
                self._check_finite(output.loss, number, "the loss", logs)
                self.accelerator.backward(output.loss)
                if self.accelerator.sync_gradients:
                    logs.update(self._clip(number, logs))
                for group in self.groups:
                    group.optimizer.step()
                if self.accelerator.sync_gradients:
                    for group in self.groups:
                        group.scheduler.step()
                for group in self.groups:
                    group.optimizer.zero_grad(set_to_none=True)
            rows.append(logs)
        if self.ema is not None:
            self.ema.update(self._trainable_of_unet())
        row = {"step": number, **self._mean_over_processes(mean_rows(rows))}
        for group in self.groups:
            row[f"lr_{group.name}"] = float(group.scheduler.get_last_lr()[0])
        row["seconds"] = time.perf_counter() - clock
        return row

    def train(self) -> TrainingSummary:
        """Run (or resume) the optimisation steps; checkpoints on the way and at the end."""
        from accelerate.utils import set_seed

        self._prepare()
        set_seed(derive_seed(self.seed, self.process_index, 0x5EED) % (2**32))
        start = self.resume()
        clock = time.perf_counter()
        for step in self._iterate_steps(start):
            number = step + 1
            row = self.train_step(step)
            self.history.append(row)
            if self.metrics_callback is not None and self.accelerator.is_main_process:
                self.metrics_callback(number, dict(row))
            if number % self.config.checkpoint_every == 0 or number == self.steps:
                self.save_checkpoint(number)
        seconds = time.perf_counter() - clock
        done = self.steps - start
        return TrainingSummary(
            steps=self.steps,
            resumed_from=self.resumed_from,
            history=list(self.history),
            seconds=seconds,
            steps_per_second=done / seconds if done and seconds > 0 else 0.0,
        )

    def _mean_over_processes(self, row: dict[str, float]) -> dict[str, float]:
        """The log row averaged over the processes: the global micro-batch's means.

        Each process logs means over its own equal share of the micro-batch, so
        their average is what one process with the whole batch would log.
        """
        if self.accelerator.num_processes == 1 or not row:
            return row
        values = torch.tensor([float(v) for v in row.values()], dtype=torch.float64)
        values = self.accelerator.reduce(values.to(self.device), reduction="mean")
        return dict(zip(row, values.cpu().tolist(), strict=True))

    def _clip(self, step: int, logs: Mapping[str, float]) -> dict[str, float]:
        norms = {}
        for group in self.groups:
            parameters = list(group.named_trainable().values())
            norm = self.accelerator.clip_grad_norm_(parameters, self.config.max_grad_norm)
            if self.accelerator.scaler is None:
                # fp16's gradient scaler skips steps with inf gradients by design; otherwise stop.
                self._check_finite(norm, step, f"the gradient norm of {group.name}", logs)
            norms[f"grad_norm_{group.name}"] = float(norm)
        return norms

    # ------------------------------------------------------------------- export
    def _tuned_copy(self) -> nn.Module | None:
        """A plain copy of the training UNet, the EMA averages in place of the live weights.

        Every process must call this: under FSDP gathering the shards is a
        collective. The main process gets the copy, the others None.
        """
        prepared = self.groups[0].prepared
        weights = full_trainable_state(prepared)
        if self.ema is not None:
            weights.update(self.ema.full_state())
        if not self.accelerator.is_main_process:
            return None
        return unsharded_copy(prepared, weights)

    def _reload_fp32_unet(self) -> nn.Module | None:
        """The base UNet in fp32 from its source, or None (an in-memory or unreachable model)."""
        from diffusers import UNet2DConditionModel

        source = self.model.source
        if not source or not (Path(source).is_dir() or "/" in source):
            return None
        try:
            unet = UNet2DConditionModel.from_pretrained(
                source,
                subfolder="unet",
                torch_dtype=torch.float32,
                revision=self.params.model.revision,
            )
        except (OSError, ValueError) as exc:
            logger.warning(
                "%s: cannot reload the fp32 UNet (%s); merging into the cast one", source, exc
            )
            return None
        return unet.to(self.device)

    def _merged(self, tuned: nn.Module) -> nn.Module:
        """`tuned` as a plain fp32 UNet: LoRA fused into the weights and the adapter layers removed.

        Under mixed precision the frozen base weights were cast to the compute
        dtype for training; the adapter is then merged into the base UNet
        reloaded in fp32 from its source, so the export loses no precision.
        """
        unet = tuned
        if self.config.use_lora and self.compute_dtype != torch.float32:
            from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

            base = self._reload_fp32_unet()
            if base is not None:
                adapter = get_peft_model_state_dict(tuned)
                base.add_adapter(self._lora_config())
                set_peft_model_state_dict(base, adapter)
                unet = base
        move_module(unet, None, torch.float32)
        if self.config.use_lora:
            unet.fuse_lora()
            unet.unload_lora()
        unet.requires_grad_(False)
        unet.eval()
        return unet

    def _save_lora(self, tuned: nn.Module, directory: Path) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(tuned))
        state = {name: tensor.detach().to("cpu", torch.float32) for name, tensor in state.items()}
        pipeline = (
            StableDiffusionXLPipeline if self.model.family == "sdxl" else StableDiffusionPipeline
        )
        with atomic_directory(directory) as tmp:
            pipeline.save_lora_weights(
                str(tmp),
                unet_lora_layers=state,
                weight_name=LORA_WEIGHTS_FILE,
                safe_serialization=True,
                unet_lora_adapter_metadata=tuned.peft_config["default"].to_dict(),
            )

    def export(self, keep_model: bool = False) -> ExportedModel:
        """Write `out_dir/model` (diffusers directory) and `out_dir/lora` (adapter, with LoRA).

        The tuned UNet is a plain fp32 `UNet2DConditionModel`: LoRA merged, EMA
        applied. Every process must call this (under FSDP gathering the shards is
        a collective); the main process writes. `keep_model` also returns the
        exported model in memory on the main process, for a check that samples it.
        """
        self._prepare()
        model_dir = self.out_dir / MODEL_DIR
        lora_dir = self.out_dir / LORA_DIR if self.config.use_lora else None
        exported = None
        tuned = self._tuned_copy()
        if tuned is not None:
            if lora_dir is not None:
                self._save_lora(tuned, lora_dir)
            exported = dataclasses.replace(self.model, unet=self._merged(tuned))
            save_base_model(exported, model_dir)
        self.accelerator.wait_for_everyone()
        return ExportedModel(
            model_dir=model_dir, lora_dir=lora_dir, model=exported if keep_model else None
        )

    def write_history(self) -> None:
        if self.accelerator.is_main_process:
            write_history(self.out_dir, self.history)


def _postfix(row: Mapping[str, float]) -> dict[str, str]:
    keys = ["loss"] + [k for k in row if k.startswith(("reward_", "pefl", "d_", "g_"))]
    return {key: f"{row[key]:.3g}" for key in keys[:6] if key in row}
