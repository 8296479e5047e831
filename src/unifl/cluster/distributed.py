"""Multi-GPU training in one pod: the stage command started under `accelerate launch`.

The stage commands stay what they are (`unifl stage pefl|decoupled|adversarial ...`);
for N > 1 GPUs the same command runs as

    accelerate launch --config_file <packaged yaml> --num_processes N \\
        [--mixed_precision bf16] -m unifl.cli stage decoupled ...

and the feedback trainer, which is written on `accelerate.Accelerator`, picks up
the process group. A single process runs `python -m unifl.cli stage ...`
directly. Multi-node training is the other path: a Kubeflow TrainJob running
`torchrun` (`unifl.cluster.trainjob.distributed_stage_command`), which is
plain DDP across nodes.

Two strategies, each a packaged accelerate config (`unifl/resources/accelerate/`):

* `ddp`: the model replicated on every GPU, gradients averaged. The default,
  and the only choice for LoRA: the adapter is small and the frozen UNet is
  only read.
* `fsdp`: FSDP2 with diffusers' `BasicTransformerBlock` as the wrap unit, for a
  full (non-LoRA) SDXL fine-tune, whose replicated fp32 weights, gradients and
  AdamW moments take about 42 GB per GPU.

`auto` picks FSDP for a full SDXL fine-tune and DDP otherwise, except for the
adversarial stage, which always takes DDP: it trains two models (UNet and
discriminator) and accelerate's FSDP2 shards one model per `prepare` call.

Status of FSDP. Tested: the launch side (config, wrap class, the environment
accelerate gives the processes), and the trainer's handling of sharded
parameters: its checkpoint hooks, EMA and export read and write the trainable
parameters only through `full_trainable_state` / `load_trainable_state`
(`unifl.feedback.trainer`, built on `torch.distributed.checkpoint.state_dict`),
which `tests/integration/test_fsdp_state.py` runs on two CPU processes over
gloo with the toy UNet sharded by torch's FSDP2 `fully_shard` directly: the
gathered state equals the one-process update of the same global batch, a save
and load round trip is exact, the sharded EMA matches, and the export's plain
copy computes what the unsharded model does. Not run: training under
`accelerate launch` with `fsdp.yaml`, because accelerate enables FSDP only on
GPUs (CPU processes get DDP). That means accelerate's FSDP2 `prepare`, its
sharded save and resume of model and optimizer, gradient clipping over
DTensors and mixed precision under FSDP are untested here; the first GPU run
is their test.

What N processes compute: each takes `trainer.batch_size` samples of every
micro-batch, so the global batch of an optimisation step is
`batch_size * N * gradient_accumulation_steps`, and the update equals that of
one process with `batch_size * N` (the trainer draws the shared random numbers
alike on every process and the per-sample ones for the whole global batch;
see `unifl.feedback.trainer`).
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from unifl.config import Params

Strategy = Literal["ddp", "fsdp", "auto"]
ResolvedStrategy = Literal["ddp", "fsdp"]

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp", "auto")
MIXED_PRECISIONS: tuple[str, ...] = ("no", "bf16", "fp16")
FEEDBACK_STAGES: tuple[str, ...] = ("pefl", "decoupled", "adversarial")
ACCELERATE_CONFIGS: dict[str, str] = {"ddp": "ddp.yaml", "fsdp": "fsdp.yaml"}
FSDP_WRAP_CLASS = "BasicTransformerBlock"
"""diffusers' transformer block (attention + cross-attention + feed-forward): the FSDP unit."""
SINGLE_MODEL_STAGES: tuple[str, ...] = ("pefl", "decoupled")
"""Stages that train one model, the only ones FSDP2 through accelerate can shard."""
ERROR_PREFIX = "error: "
"""How the stage commands print the reason of a failure (`unifl.cli`)."""


class DistributedStageError(RuntimeError):
    """A stage run under `accelerate launch` (or directly) failed; says how and why."""

    def __init__(self, message: str, returncode: int, errors: Sequence[str]) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.errors = list(errors)


# --------------------------------------------------------------------------- the command


def accelerate_config_path(strategy: ResolvedStrategy) -> Path:
    """The packaged accelerate config file of `strategy` ('ddp' or 'fsdp')."""
    if strategy not in ACCELERATE_CONFIGS:
        raise ValueError(f"strategy {strategy!r}: expected one of {sorted(ACCELERATE_CONFIGS)}")
    path = Path(
        str(resources.files("unifl") / "resources" / "accelerate" / ACCELERATE_CONFIGS[strategy])
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the packaged accelerate config is missing")
    return path


def resolve_strategy(
    strategy: Strategy, *, use_lora: bool, family: str | None, stage: str | None = None
) -> ResolvedStrategy:
    """'ddp' or 'fsdp' for `strategy`; `auto` shards only a full SDXL fine-tune.

    `family` is 'sd15', 'sdxl' or None (unknown: DDP). An explicit 'fsdp' for the
    adversarial stage is refused, since it trains two models at once.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    if strategy == "auto":
        shard = (not use_lora) and family == "sdxl"
        if stage is not None and stage not in SINGLE_MODEL_STAGES:
            shard = False
        return "fsdp" if shard else "ddp"
    if strategy == "fsdp" and stage is not None and stage not in SINGLE_MODEL_STAGES:
        raise ValueError(
            f"strategy 'fsdp' for stage {stage!r}: it trains the UNet and a discriminator "
            "together and accelerate's FSDP2 shards one model per prepare call; use 'ddp'"
        )
    return strategy  # type: ignore[return-value]


def accelerate_executable() -> str:
    """The `accelerate` script of this Python environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "accelerate"
    if local.is_file():
        return str(local)
    return shutil.which("accelerate") or "accelerate"


def accelerate_command(
    stage_args: Sequence[str],
    num_processes: int,
    strategy: Strategy = "auto",
    mixed_precision: str | None = "no",
    main_process_port: int | None = None,
    *,
    use_lora: bool = True,
    family: str | None = None,
) -> list[str]:
    """The command that runs `unifl stage <stage_args>` on `num_processes` processes.

    `stage_args` are the words after `stage` (`["decoupled", "--base", ...]`).
    One process: `python -m unifl.cli stage ...`, no launcher. More:
    `accelerate launch --config_file <ddp.yaml|fsdp.yaml> --num_processes N
    [--mixed_precision M] [--main_process_port P] -m unifl.cli stage ...`, the
    config chosen by `resolve_strategy` (`use_lora` and `family` feed `auto`).
    """
    stage_args = [str(arg) for arg in stage_args]
    if not stage_args or stage_args[0].startswith("-"):
        raise ValueError(
            f"stage_args must start with the stage name (one of {FEEDBACK_STAGES}), "
            f"got {stage_args[:1]}"
        )
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision {mixed_precision!r}: expected one of {MIXED_PRECISIONS}")
    if main_process_port is not None and not 0 < int(main_process_port) < 65536:
        raise ValueError(f"main_process_port {main_process_port!r} is not a TCP port")
    resolved = resolve_strategy(strategy, use_lora=use_lora, family=family, stage=stage_args[0])
    entry = ["-m", "unifl.cli", "stage", *stage_args]
    if num_processes == 1:
        return [sys.executable, *entry]
    command = [
        accelerate_executable(),
        "launch",
        "--config_file",
        str(accelerate_config_path(resolved)),
        "--num_processes",
        str(num_processes),
    ]
    if mixed_precision is not None:
        command += ["--mixed_precision", mixed_precision]
    if main_process_port is not None:
        command += ["--main_process_port", str(int(main_process_port))]
    return command + entry


# --------------------------------------------------------------------------- from the config


def model_family(params: Params, base: str | Path | None = None) -> str | None:
    """'sd15' or 'sdxl' from `model.family`, else from the base model (toy preset or checkpoint).

    None when it cannot be told without loading anything (no base given).
    """
    if params.model.family != "auto":
        return params.model.family
    if base is None:
        return None
    from unifl.models.toy_presets import PRESETS

    if str(base) in PRESETS:
        return PRESETS[str(base)]
    from unifl.models.base import detect_family

    return detect_family(base, params.model.revision)


@dataclass(frozen=True)
class LaunchOptions:
    """How a stage is launched in one pod; `run_stage(stage_args, **options.as_kwargs())`."""

    num_processes: int
    strategy: Strategy = "auto"
    mixed_precision: str = "no"
    use_lora: bool = True
    family: str | None = None

    @classmethod
    def from_params(
        cls, params: Params, base: str | Path | None = None, strategy: Strategy = "auto"
    ) -> LaunchOptions:
        """One process per GPU of `pipeline.gpu_count` (at least one), the project's precision."""
        return cls(
            num_processes=max(1, int(params.pipeline.gpu_count)),
            strategy=strategy,
            mixed_precision=params.project.mixed_precision,
            use_lora=params.trainer.use_lora,
            family=model_family(params, base),
        )

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "num_processes": self.num_processes,
            "strategy": self.strategy,
            "mixed_precision": self.mixed_precision,
            "use_lora": self.use_lora,
            "family": self.family,
        }


def feedback_stage_args(
    stage: str,
    inputs: Mapping[str, str | Path | None],
    out_dir: str | Path,
    params_file: str | Path,
    *,
    preset: str | None = None,
    overrides: Sequence[str] = (),
) -> list[str]:
    """The CLI words of a feedback stage from named inputs (`base`, `data`, `prompts`, ...).

    The names are those of `unifl.orchestration.stage_entry.run_feedback_stage`,
    so a step can run the same inputs in its own process or under
    `accelerate launch`.
    """
    options: dict[str, tuple[str, ...]] = {
        "pefl": ("base", "data", "reward", "segmenter"),
        "decoupled": ("base", "prompts", "reward", "data"),
        "adversarial": ("base", "data", "reward"),
    }
    required: dict[str, tuple[str, ...]] = {
        "pefl": ("base", "data"),
        "decoupled": ("base", "prompts", "reward"),
        "adversarial": ("base", "data", "reward"),
    }
    if stage not in options:
        raise ValueError(f"unknown feedback stage {stage!r}; expected one of {FEEDBACK_STAGES}")
    unknown = sorted(set(inputs) - set(options[stage]))
    if unknown:
        raise ValueError(f"stage {stage!r} takes no input named {unknown}")
    missing = [name for name in required[stage] if inputs.get(name) is None]
    if missing:
        raise ValueError(f"stage {stage!r} needs input(s) {missing}")
    args = [stage]
    for name in options[stage]:
        value = inputs.get(name)
        if value is not None:
            args += [f"--{name}", str(value)]
    args += ["--out", str(out_dir), "--params", str(params_file)]
    if preset is not None:
        args += ["--preset", preset]
    for item in overrides:
        args += ["--set", str(item)]
    return args


# --------------------------------------------------------------------------- running it


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the rendezvous of the local processes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stage_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the launched processes: `base` (default: this process's) with
    unbuffered Python output, so that the stage's lines stream as they are printed."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_command(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
    tail_lines: int = 40,
) -> int:
    """Run `command`, streaming its combined output line by line to `echo` (default: stdout).

    Returns 0; a non-zero exit raises `DistributedStageError` carrying the exit
    code and the stage's own error lines (`error: ...`, each once although
    every process prints it), else the last lines of output.
    """
    write = echo if echo is not None else _print_line
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    errors: list[str] = []
    with subprocess.Popen(
        [str(part) for part in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=stage_environment(env),
        cwd=None if cwd is None else str(cwd),
        text=True,
        errors="replace",
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            write(line)
            tail.append(line)
            reason = _error_reason(line)
            if reason is not None and reason not in errors:
                errors.append(reason)
        returncode = process.wait()
    if returncode != 0:
        name = Path(str(command[0])).name if command else "command"
        detail = "; ".join(errors) if errors else "\n".join(tail)
        raise DistributedStageError(
            f"{name} exited with status {returncode}: {detail}", returncode, errors
        )
    return 0


def run_stage(
    stage_args: Sequence[str],
    num_processes: int,
    strategy: Strategy = "auto",
    mixed_precision: str | None = "no",
    main_process_port: int | None = None,
    *,
    use_lora: bool = True,
    family: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run `unifl stage <stage_args>` on `num_processes` processes and wait for it.

    The output streams to `echo` (default: stdout) as it comes. Returns 0;
    raises `DistributedStageError` with the stage's error when it fails. With
    more than one process and no `main_process_port`, a free port is taken, so
    that two stages on one machine do not meet at accelerate's default port.
    """
    if num_processes > 1 and main_process_port is None:
        main_process_port = free_port()
    command = accelerate_command(
        stage_args,
        num_processes,
        strategy,
        mixed_precision,
        main_process_port,
        use_lora=use_lora,
        family=family,
    )
    return run_command(command, env=env, cwd=cwd, echo=echo)


def _error_reason(line: str) -> str | None:
    """The reason in a stage's `error: ...` line, also when torchrun prefixes it with the rank."""
    text = line.strip()
    if text.startswith("[rank") and "]:" in text:
        text = text.split("]:", 1)[1].strip()
    if text.startswith(ERROR_PREFIX):
        return text[len(ERROR_PREFIX) :].strip()
    return None


def _print_line(line: str) -> None:
    print(line, flush=True)
