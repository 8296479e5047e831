"""Multi-process training in one pod, for real: `accelerate launch` with two CPU processes.

The DDP test starts the `adversarial` stage command three times, concurrently,
on the `ci` preset: two processes with batch size 1 (DDP over gloo: the packaged
ddp.yaml; the trainer asks accelerate for the CPU), one process with batch size
2 (the same global batch), and one process with batch size 1 (only the first
process's share: the control that shows the comparison can fail). The
adversarial stage is the hardest case for DDP: two trainable models (UNet and
discriminator, whose CLIP `logit_scale` gets no gradient), real images sharded
by process (sampled from the starting model first, each process a share of the
captions), and with gradient accumulation and the MSE regulariser on,
per-sample noise, per-sample timesteps and two UNet forwards per micro-batch.
A checkpoint after every step runs the checkpoint code twice under DDP.

FSDP cannot run here: accelerate enables it only for GPU processes (CPU
processes fall back to DDP). Its tests check what can be checked without a
GPU: the command, the packaged config as accelerate parses it, the environment
`accelerate launch` would give the processes, and that the wrap policy finds
its transformer blocks in an SDXL-architecture UNet.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unifl.cluster.distributed import (
    FSDP_WRAP_CLASS,
    DistributedStageError,
    LaunchOptions,
    accelerate_command,
    accelerate_config_path,
    feedback_stage_args,
    resolve_strategy,
    run_command,
    run_stage,
)
from unifl.config import load_params

STEPS = 2
SAMPLES = 16
STAGE_SETTINGS = [
    "project.device=cpu",
    "trainer.num_inference_steps=5",
    "trainer.guidance_scale=2.0",
    "trainer.gradient_accumulation_steps=2",
    "trainer.mse_weight=0.5",
    "trainer.checkpoint_every=1",
    f"adversarial.steps={STEPS}",
    # T_a 3 of the 5-step schedule is t=799. On the 4-step schedule it would be t=999, where the
    # x0 prediction divides by sqrt(abar) = 0.07 instead of 0.19, which magnified the float-
    # summation differences between the two runs to 1.3e-5, beyond the tolerance below.
    "adversarial.schedule_steps=5",
    "adversarial.start_step=3",
    "adversarial.eval_prompts=0",
    # The R1 penalty's double backward runs inside the discriminator's DDP forward.
    "adversarial.r1_weight=1.0",
    # Its feature heads read the DDP-wrapped UNet itself, the LoRA adapter switched off.
    "adversarial.discriminator_unet_features=true",
    # Real images sampled from the starting model, in chunks of 8 captions: one per process.
    "adversarial.real_images=samples",
    f"adversarial.real_sample_count={SAMPLES}",
    "sampling.steps=3",
    "sampling.batch_size=1",
]
RELATIVE_TOLERANCE = 2e-5
"""Largest parameter difference, relative to the largest parameter, between the two-process
run and the one-process run of the same global batch (measured: 5.3e-6 for the UNet's LoRA,
1.8e-6 for the discriminator, whose feature heads add the frozen UNet's sums; 8e-7 and 3e-7
without them. The control run differs by 7.7e-4 and 4.5e-4, as did the two-process run when
each process drew the feature heads' noise for its own rows only)."""


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy reward model, toy images with captions, an empty params file."""
    from unifl.models.reward import build_toy_reward_model
    from unifl.toy.dataset import write_toy_dataset

    root = tmp_path_factory.mktemp("distributed")
    reward = build_toy_reward_model()
    reward.set_alphas({"color": 1.0, "layout": 1.0, "detail": 1.0, "lighting": 1.0})
    reward.save(root / "reward")
    write_toy_dataset(root / "data", SAMPLES, seed=3, progress=False)
    (root / "params.yaml").write_text("", encoding="utf-8")
    return root


def adversarial_args(root: Path, out: Path, batch_size: int) -> list[str]:
    return feedback_stage_args(
        "adversarial",
        {"base": "toy-sd15", "data": root / "data", "reward": root / "reward"},
        out,
        root / "params.yaml",
        preset="ci",
        overrides=[*STAGE_SETTINGS, f"trainer.batch_size={batch_size}"],
    )


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(value.abs().max()) for value in a.values())
    return max(float((a[name] - b[name]).abs().max()) for name in a) / scale


@dataclass
class Launched:
    """The concurrent launches of the module: their output directories, output and failures."""

    root: Path
    outputs: dict[str, list[str]]
    failures: dict[str, BaseException]


RUNS = {"ddp": (2, 1), "single": (1, 2), "first_share_only": (1, 1), "bad_preset": (2, 1)}
"""name: (processes, batch size). All start together: the machine's cores are shared anyway,
and most of each launch is the processes' start-up."""


@pytest.fixture(scope="module")
def launched(stage_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Launched:
    root = tmp_path_factory.mktemp("launches")
    outputs: dict[str, list[str]] = {name: [] for name in RUNS}
    failures: dict[str, BaseException] = {}

    def launch(name: str) -> None:
        processes, batch_size = RUNS[name]
        args = adversarial_args(stage_inputs, root / name, batch_size)
        if name == "bad_preset":
            args[args.index("ci")] = "no-such-preset"
        try:
            run_stage(
                args,
                processes,
                strategy="ddp",
                env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                echo=outputs[name].append,
            )
        except BaseException as exc:  # noqa: BLE001 - each test asserts on its own launch
            failures[name] = exc

    threads = [threading.Thread(target=launch, args=(name,)) for name in RUNS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Launched(root, outputs, failures)


def test_two_gloo_processes_compute_the_update_of_one_process_with_their_global_batch(
    launched: Launched,
) -> None:
    root = launched.root
    runs = ("ddp", "single", "first_share_only")
    failed = {name: launched.failures[name] for name in runs if name in launched.failures}
    assert not failed, {name: "\n".join(launched.outputs[name][-30:]) for name in failed}

    for step in range(1, STEPS + 1):
        checkpoint = root / "ddp" / f"checkpoints/step-{step:08d}"
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["num_processes"] == 2
        digests = state["process_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]  # the same parameters on both ranks
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
            p.name for p in checkpoint.iterdir()
        }
    # The real images the two processes sampled, a chunk of captions each, are one process's.
    samples = {name: root / name / "real_samples" for name in ("ddp", "single")}
    manifests = [json.loads((samples[name] / "manifest.json").read_text()) for name in samples]
    assert manifests[0] == manifests[1] and len(manifests[0]["captions"]) == SAMPLES
    for index in range(SAMPLES):
        png = f"{index:06d}.png"
        assert (samples["ddp"] / png).read_bytes() == (samples["single"] / png).read_bytes()
    final = f"checkpoints/step-{STEPS:08d}"
    assert json.loads((root / "ddp" / "stage.json").read_text())["num_processes"] == 2
    assert json.loads((root / "single" / "stage.json").read_text())["num_processes"] == 1

    for index in (0, 1):  # the UNet's LoRA, the discriminator
        trained = {
            name: load_file(str(root / name / final / f"trainable_{index}.safetensors"))
            for name in runs
        }
        assert relative_difference(trained["ddp"], trained["single"]) < RELATIVE_TOLERANCE
        # The control: without the second process's share the update is far off.
        control = relative_difference(trained["ddp"], trained["first_share_only"])
        assert control > 10 * RELATIVE_TOLERANCE
    # What rank 0 exported is the same model.
    lora = {
        name: load_file(str(root / name / "lora" / "pytorch_lora_weights.safetensors"))
        for name in ("ddp", "single")
    }
    assert relative_difference(lora["ddp"], lora["single"]) < RELATIVE_TOLERANCE

    history = {name: json.loads((root / name / "history.json").read_text()) for name in runs}
    assert len(history["ddp"]) == STEPS
    for ddp_row, single_row in zip(history["ddp"], history["single"], strict=True):
        assert ddp_row["t"] == single_row["t"]  # the shared draw agrees
        assert ddp_row.keys() == single_row.keys()
        assert {"g_loss", "d_loss", "mse", "grad_norm_unet", "grad_norm_discriminator"} <= set(
            ddp_row
        )
        for key in set(ddp_row) - {"seconds"}:  # logged numbers are those of the global batch
            assert ddp_row[key] == pytest.approx(single_row[key], rel=1e-5, abs=1e-9), key
    assert history["ddp"][0]["loss"] != pytest.approx(history["first_share_only"][0]["loss"])


def test_a_failing_stage_raises_with_its_own_error_from_both_processes(
    launched: Launched,
) -> None:
    error = launched.failures.get("bad_preset")
    assert isinstance(error, DistributedStageError), error
    assert error.returncode != 0
    assert len(error.errors) == 1 and "no-such-preset" in error.errors[0]
    lines = launched.outputs["bad_preset"]
    assert sum("error: unknown preset 'no-such-preset'" in line for line in lines) == 2
    assert not (launched.root / "bad_preset").exists()


# --------------------------------------------------------------------------- commands


def test_full_sdxl_fine_tune_selects_the_fsdp_config_wrapping_transformer_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from diffusers.models.attention import BasicTransformerBlock

    from unifl.models.toy_presets import build_toy_model

    params = load_params(
        None,
        overrides=[
            "pipeline.gpu_count=4",
            "project.mixed_precision=bf16",
            "trainer.use_lora=false",
        ],
    )
    options = LaunchOptions.from_params(params, base="toy-sdxl")
    assert (options.num_processes, options.family, options.use_lora) == (4, "sdxl", False)
    command = accelerate_command(["decoupled", "--base", "toy-sdxl"], **options.as_kwargs())
    fsdp_config = accelerate_config_path("fsdp")
    assert command[:2] == [str(Path(sys.executable).parent / "accelerate"), "launch"]
    assert command[2:8] == [
        "--config_file",
        str(fsdp_config),
        "--num_processes",
        "4",
        "--mixed_precision",
        "bf16",
    ]
    assert command[command.index("-m") :] == [
        "-m",
        "unifl.cli",
        "stage",
        "decoupled",
        "--base",
        "toy-sdxl",
    ]

    parsed = load_config_from_file(str(fsdp_config))
    assert parsed.distributed_type == DistributedType.FSDP
    assert parsed.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == FSDP_WRAP_CLASS
    assert parsed.fsdp_config["fsdp_version"] == 2

    # What `accelerate launch` makes of the command (accelerate's own validation), without
    # starting anything: FSDP on 4 processes in bf16, and the environment each process gets.
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[2:]))
    assert args.use_fsdp and args.num_processes == 4 and args.mixed_precision == "bf16"
    assert (args.module, args.training_script) == (True, "unifl.cli")
    environment = prepare_multi_gpu_env(args)
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert environment["FSDP_VERSION"] == "2"
    assert environment["FSDP_TRANSFORMER_CLS_TO_WRAP"] == FSDP_WRAP_CLASS
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"

    # The plugin the processes would build wraps the SDXL UNet's transformer blocks.
    for key, value in environment.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    unet = build_toy_model("toy-sdxl").unet
    plugin.set_auto_wrap_policy(unet)
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {BasicTransformerBlock}
    assert sum(isinstance(module, BasicTransformerBlock) for module in unet.modules()) > 0


def test_auto_takes_ddp_for_lora_sd15_and_the_adversarial_stage() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    assert resolve_strategy("auto", use_lora=True, family="sdxl") == "ddp"
    assert resolve_strategy("auto", use_lora=False, family="sd15") == "ddp"
    assert resolve_strategy("auto", use_lora=False, family=None) == "ddp"
    assert resolve_strategy("auto", use_lora=False, family="sdxl", stage="pefl") == "fsdp"
    assert resolve_strategy("auto", use_lora=False, family="sdxl", stage="adversarial") == "ddp"
    with pytest.raises(ValueError, match="adversarial"):
        resolve_strategy("fsdp", use_lora=False, family="sdxl", stage="adversarial")

    command = accelerate_command(["pefl", "--base", "b"], 2, use_lora=True, family="sdxl")
    ddp_config = accelerate_config_path("ddp")
    assert command[command.index("--config_file") + 1] == str(ddp_config)
    assert load_config_from_file(str(ddp_config)).distributed_type == DistributedType.MULTI_GPU

    single = accelerate_command(["pefl", "--base", "b"], 1, use_lora=False, family="sdxl")
    assert single == [sys.executable, "-m", "unifl.cli", "stage", "pefl", "--base", "b"]
    options = LaunchOptions.from_params(load_params(None, overrides=["pipeline.gpu_count=0"]))
    assert options.num_processes == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((["pefl"], 0), "num_processes"),
        ((["pefl"], 2, "zero3"), "strategy 'zero3'"),
        ((["pefl"], 2, "ddp", "fp8"), "mixed_precision 'fp8'"),
        (([], 2), "stage name"),
        ((["--base", "b"], 2), "stage name"),
        ((["pefl"], 2, "ddp", "no", 70000), "main_process_port"),
    ],
)
def test_bad_launch_settings_are_refused_by_name(arguments: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        accelerate_command(*arguments)


def test_stage_args_from_named_inputs() -> None:
    args = feedback_stage_args(
        "pefl",
        {"base": "b", "data": "d", "segmenter": "s", "reward": None},
        "out",
        "params.yaml",
        overrides=["pefl.steps=3"],
    )
    assert args == [
        "pefl", "--base", "b", "--data", "d", "--segmenter", "s", "--out", "out",
        "--params", "params.yaml", "--set", "pefl.steps=3",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"needs input\(s\) \['reward'\]"):
        feedback_stage_args("adversarial", {"base": "b", "data": "d"}, "o", "p.yaml")
    with pytest.raises(ValueError, match="no input named"):
        feedback_stage_args(
            "decoupled", {"base": "b", "prompts": "p", "reward": "r", "x": 1}, "o", "p"
        )
    with pytest.raises(ValueError, match="unknown feedback stage"):
        feedback_stage_args("distill", {}, "o", "p")


def test_run_command_streams_output_and_keeps_each_error_once(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "print('step 1', flush=True)\n"
        "print('error: data/x.png: not an image', file=sys.stderr, flush=True)\n"
        "print('[rank1]: error: data/x.png: not an image', flush=True)\n"
        "sys.exit(3)\n"
    )
    lines: list[str] = []
    with pytest.raises(DistributedStageError, match="status 3: data/x.png: not an image") as caught:
        run_command([sys.executable, "-c", script], cwd=tmp_path, echo=lines.append)
    assert caught.value.returncode == 3
    assert caught.value.errors == ["data/x.png: not an image"]
    assert lines[0] == "step 1" and len(lines) == 3
    assert run_command([sys.executable, "-c", "print('ok')"], echo=lines.append) == 0
    assert lines[-1] == "ok"


def test_parameter_digest_sees_a_one_ulp_change() -> None:
    from unifl.feedback.trainer import parameter_digest

    weights = {"a.weight": torch.linspace(-1, 1, 12).reshape(3, 4), "b": torch.ones(2)}
    same = {name: value.clone() for name, value in weights.items()}
    assert parameter_digest(weights) == parameter_digest(same)
    same["a.weight"][1, 2] = torch.nextafter(same["a.weight"][1, 2], torch.tensor(2.0))
    assert parameter_digest(weights) != parameter_digest(same)
    assert parameter_digest(weights) != parameter_digest(
        {"c": weights["a.weight"], "b": weights["b"]}
    )
