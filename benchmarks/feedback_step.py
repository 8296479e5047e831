"""Benchmark: one training step of each feedback stage, against a naive reference step.

    python benchmarks/feedback_step.py                       # toy models, CPU or GPU
    python benchmarks/feedback_step.py --architectures       # + SD1.5 @ 512 and SDXL @ 1024 (GPU)
    python benchmarks/feedback_step.py --architectures --tiny-architectures   # the same code on CPU

Each case runs in its own process (so peak memory is its own) and times
`FeedbackTrainer.train_step` over `--steps` steps after `--warmup` steps. The
*naive reference* is the same stage and data with what a first implementation
would do: gradients kept through every denoising step from the start step down
(no truncation, guidance included), fp32, no gradient checkpointing. Both draw the same noise and
gradient steps (the trainer's draws are a function of the step), so they do
the same sampling work; only how gradients are kept differs.

The stages take their settings from the project's `params.yaml` (`--params`;
`--params ''` for the configuration's defaults, the paper's): for the
adversarial stage that is the discriminator with heads on the starting UNet's
features, its R1 penalty and the guided gradient step. The real images are the
benchmark's own in every case (`adversarial.real_images: samples` samples them
once before training, which is not a step).

Columns:
* `ms/step`, `steps/s`: median wall time of a step (with CUDA synchronisation).
* `peak MiB`: peak memory of the process during the timed steps: CUDA
  `max_memory_allocated`, or on CPU the resident-set high-water mark (VmHWM,
  reset before the first step). `step MiB`: that peak minus the memory held
  before the first step (weights, optimizer set-up): what a step needs.
* `TFLOP/step`: FLOPs of the same steps counted with
  `torch.utils.flop_counter.FlopCounterMode`, always without gradient
  checkpointing (model FLOPs: recomputation is not useful work). `TFLOP/s` and
  `MFU` = counted FLOPs / time / `--peak-tflops` (default: the H200's dense
  bf16 989 TFLOP/s on CUDA; no MFU on CPU unless a peak is given).
* `vs naive`: speed-up and memory ratio against the naive case of the same
  model and stage.

The `--architectures` cases build Stable Diffusion 1.5 (512 px) and SDXL
(1024 px) architectures with random weights (the published configs: UNet,
VAE, CLIP-L / OpenCLIP-bigG text encoders, a CLIP ViT-L/14 reward backbone)
and run them in bf16, with and without gradient checkpointing and LoRA.
`--tiny-architectures` swaps in the same block structures at tiny width, so
that the code path runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_MARKER = "FEEDBACK_STEP_RESULT "
DEFAULT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
STAGES = ("pefl", "decoupled", "adversarial")
H200_BF16_DENSE_TFLOPS = 989.0
# The architecture cases' variants: name -> (LoRA, gradient checkpointing); plus "naive".
ARCHITECTURE_VARIANTS = {
    "lora": (True, False), "lora+ckpt": (True, True),
    "full": (False, False), "full+ckpt": (False, True),
}  # fmt: skip


@dataclass
class Case:
    """One measured configuration."""

    model: str  # toy-sd15, toy-sdxl, sd15-512, sdxl-1024
    stage: str
    variant: str  # "feedback" (the trainer as configured) or "naive"
    precision: str = "no"  # project.mixed_precision
    lora: bool = True
    checkpointing: bool = False
    truncate: int = 1  # K; the naive case keeps every step
    batch_size: int = 2
    inference_steps: int = 20
    steps: int = 3
    warmup: int = 1
    threads: int = 0
    tiny: bool = False
    peak_tflops: float | None = None
    params: str = ""  # the stage settings' file; "" for the configuration's defaults (the paper's)
    extra: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.model}/{self.stage}/{self.variant}"


# --------------------------------------------------------------------------- child side


def _proc_status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _full_architecture(family: str, device: Any) -> Any:
    """SD1.5 / SDXL with the published configs and random weights, built on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from unifl.models.base import BaseModel
    from unifl.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, toy_tokenizer
    from unifl.models.toy_presets import SD_SCHEDULER_CONFIG

    tokenizer = toy_tokenizer(77)
    ids = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
    clip_l = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, **ids,
    )  # fmt: skip
    vae_config = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
    }  # fmt: skip
    with torch.device(device):
        if family == "sd15":
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            )  # fmt: skip
            vae = AutoencoderKL(**vae_config, sample_size=512, scaling_factor=0.18215)
            return BaseModel(
                family="sd15", unet=unet, vae=vae, text_encoder=CLIPTextModel(clip_l),
                tokenizer=tokenizer, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
                source="sd15-architecture",
            )  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        vae = AutoencoderKL(**vae_config, sample_size=1024, scaling_factor=0.13025)
        big_g = CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
            projection_dim=1280, **ids,
        )  # fmt: skip
        return BaseModel(
            family="sdxl", unet=unet, vae=vae, text_encoder=CLIPTextModel(clip_l),
            tokenizer=tokenizer, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
            text_encoder_2=CLIPTextModelWithProjection(big_g), tokenizer_2=toy_tokenizer(77),
            source="sdxl-architecture",
        )  # fmt: skip


def _reward_model(case: Case, device: Any) -> Any:
    import torch

    from unifl.models.reward import DecoupledRewardModel, build_toy_reward_model

    if case.model.startswith("toy") or case.tiny:
        model = build_toy_reward_model()
    else:
        from transformers import CLIPConfig, CLIPModel

        from unifl.models.tokenizer import toy_tokenizer

        tokenizer = toy_tokenizer(77)
        config = CLIPConfig(
            text_config={
                "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, "projection_dim": 768,
            },
            vision_config={
                "image_size": 224, "patch_size": 14, "hidden_size": 1024,
                "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "projection_dim": 768,
            },
            projection_dim=768,
        )  # fmt: skip
        with torch.device(device):
            model = DecoupledRewardModel(CLIPModel(config), tokenizer, head_hidden_dim=256)
    model.set_alphas({d: 1.0 for d in model.dimensions})  # active hinges: real gradients
    return model


def _base_model(case: Case, device: Any) -> Any:
    from unifl.models.toy_presets import build_tiny_reference_model, build_toy_model

    if case.model.startswith("toy"):
        return build_toy_model(case.model)
    family = case.model.split("-")[0]
    if case.tiny:
        return build_tiny_reference_model(family)
    from unifl.models.base import check_consistency

    model = _full_architecture(family, device)
    check_consistency(model)  # the configs above must fit together as the real checkpoints do
    return model


def _image_items(case: Case, size: int, count: int) -> list[dict[str, Any]]:
    import torch

    if case.model.startswith("toy"):
        from unifl.toy.dataset import generate_toy_batch

        arrays = generate_toy_batch(count, seed=11, resolution=size)
        images, semantic = arrays.image_tensor(), arrays.semantic_tensor()
        instance, captions = arrays.instance_tensor(), arrays.captions
    else:
        from unifl.data.toy_prompts import toy_prompts

        generator = torch.Generator().manual_seed(11)
        images = torch.rand(count, 3, size, size, generator=generator)
        semantic = torch.randint(0, 13, (count, size, size), generator=generator)
        instance = torch.zeros(count, size, size, dtype=torch.long)
        captions = toy_prompts(count, seed=11)
    return [
        {"image": images[i], "caption": captions[i], "semantic_mask": semantic[i],
         "instance_mask": instance[i]}
        for i in range(count)
    ]  # fmt: skip


def _trainer(case: Case, out_dir: str) -> Any:
    import torch

    from unifl.config import PerceptualModelConfig, TrainerConfig, load_params
    from unifl.models.precision import resolve_device

    device = resolve_device("auto")
    total = case.warmup + case.steps
    overrides = [
        f"project.mixed_precision='{case.precision}'",
        f"trainer.use_lora={str(case.lora).lower()}",
        f"trainer.gradient_checkpointing={str(case.checkpointing).lower()}",
        f"trainer.truncated_backprop_steps={case.truncate}",
        f"trainer.batch_size={case.batch_size}",
        "trainer.checkpoint_every=1000000",
        f"pefl.steps={total}",
        f"decoupled.steps={total}",
        f"adversarial.steps={total}",
        # Sampling real images from the starting model happens once before training, not in
        # a step; the step is the same on the benchmark's images.
        "adversarial.real_images=data",
    ]
    settings = case.params or None
    if load_params(settings).trainer.num_inference_steps != case.inference_steps:
        # Another schedule length than the settings': the stages' steps scaled to it.
        start = case.inference_steps // 2
        overrides += [
            f"trainer.num_inference_steps={case.inference_steps}",
            f"pefl.start_step={start}",
            f"pefl.max_step={min(5, start)}",
            f"decoupled.max_step={min(9, case.inference_steps - 1)}",
        ]
    if case.variant == "naive":
        # Every denoising call keeps its graph, guidance included: the same sampling work.
        overrides.append(f"trainer.grad_guidance_scale={TrainerConfig().guidance_scale}")
    params = load_params(settings, overrides=overrides)
    model = _base_model(case, device)
    reward = _reward_model(case, device)
    items = _image_items(case, model.image_size, 2 * case.batch_size)
    if case.stage == "decoupled":
        from unifl.data.toy_prompts import toy_prompts
        from unifl.feedback.decoupled import DecoupledTrainer

        prompts = toy_prompts(4 * case.batch_size, seed=11)
        return DecoupledTrainer(
            model, reward, prompts, params, out_dir, regulariser_data=items, progress=False
        )
    if case.stage == "pefl":
        from unifl.feedback.pefl import PeflTrainer
        from unifl.feedback.perceptual import build_perceptual_loss
        from unifl.models.segmenter import ToySegmenter

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            segmenter = ToySegmenter()
        perceptual = build_perceptual_loss(PerceptualModelConfig(), toy_segmenter=segmenter)
        return PeflTrainer(
            model, items, perceptual, params, out_dir, reward_model=reward, progress=False
        )
    from unifl.feedback.adversarial import AdversarialTrainer

    return AdversarialTrainer(model, items, reward, params, out_dir, progress=False)


def run_case(case: Case) -> dict[str, Any]:
    """Measure one case in this process; the result row."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if case.threads:
        torch.set_num_threads(case.threads)
    cuda = torch.cuda.is_available()

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="feedback-step-") as out_dir:
        trainer = _trainer(case, out_dir)
        trainer._prepare()
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated() / 2**20
        else:
            _reset_cpu_peak()
            held = _proc_status("VmRSS")
        for step in range(case.warmup):
            trainer.train_step(step)
        times = []
        timed = range(case.warmup, case.warmup + case.steps)
        for step in timed:
            synchronize()
            clock = time.perf_counter()
            trainer.train_step(step)
            synchronize()
            times.append(time.perf_counter() - clock)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _proc_status("VmHWM")

        # Model FLOPs of the same steps (same draws), without recomputation.
        config = trainer.config
        trainer.config = config.model_copy(update={"gradient_checkpointing": False})
        unet = trainer.model.unet
        if case.checkpointing:
            unet.disable_gradient_checkpointing()
        flops: float | None
        try:
            with FlopCounterMode(display=False) as counter:
                for step in timed:
                    trainer.train_step(step)
            flops = counter.get_total_flops() / len(timed)
        except torch.OutOfMemoryError:
            flops = None
        trainer.config = config
    median = statistics.median(times)
    peak_tflops = case.peak_tflops or (H200_BF16_DENSE_TFLOPS if cuda else None)
    achieved = flops / median / 1e12 if flops else None
    return {
        **asdict(case),
        "status": "ok",
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "ms_per_step": 1000 * median,
        "steps_per_second": 1.0 / median,
        "peak_mib": peak,
        "step_mib": peak - held,
        "tflop_per_step": flops / 1e12 if flops else None,
        "tflops": achieved,
        "mfu": achieved / peak_tflops if achieved and peak_tflops else None,
    }


def count_unet_ops(model_name: str) -> dict[str, int]:
    """ATen operations one guided no-grad UNet call (batch 2) dispatches: plain, LoRA, LoRA merged.

    The full architectures are built on the meta device (shapes only, no arithmetic),
    so the counts come in seconds on any machine.
    """
    import torch
    from peft import LoraConfig
    from torch.utils._python_dispatch import TorchDispatchMode

    from unifl.config import TrainerConfig
    from unifl.feedback.sampling import merged_lora
    from unifl.models.base import encode_prompt, predict_noise

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.count += 1
            return func(*args, **(kwargs or {}))

    if model_name.startswith("toy"):
        device = torch.device("cpu")
        model = _base_model(Case(model_name, "pefl", "feedback"), device)
    else:
        device = torch.device("meta")
        model = _full_architecture(model_name.split("-")[0], device)
    with torch.no_grad():
        embeds = encode_prompt(model, ["a red circle", ""])
    size = model.image_size // model.vae_scale_factor
    latents = torch.zeros(2, model.unet.config.in_channels, size, size, device=device)

    def count() -> int:
        counter = OpCounter()
        with torch.no_grad(), counter:
            predict_noise(model, latents, 500, embeds)
        return counter.count

    counts = {"plain": count()}
    config = TrainerConfig()
    model.unet.add_adapter(
        LoraConfig(r=config.lora_rank, target_modules=list(config.lora_target_modules))
    )
    counts["lora"] = count()
    with merged_lora(model.unet):
        counts["lora merged"] = count()
    counts["lora layers"] = sum(
        1 for name, _ in model.unet.named_modules() if name.endswith("lora_A")
    )
    return counts


# --------------------------------------------------------------------------- parent side


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    common = {
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
        "inference_steps": args.inference_steps, "peak_tflops": args.peak_tflops,
        "params": args.params,
    }  # fmt: skip
    cases = []
    for model in args.toy_models:
        for stage in args.stages:
            for variant in ("feedback", "naive"):
                naive = variant == "naive"
                cases.append(
                    Case(
                        model, stage, variant, truncate=args.inference_steps if naive else 1,
                        batch_size=args.batch_size, **common,
                    )
                )  # fmt: skip
    if args.architectures:
        precision = "bf16" if not args.tiny_architectures else "no"
        for model in args.architecture_models:
            if args.tiny_architectures:
                model = model.split("-")[0] + "-tiny"
            for stage in args.stages:
                for name, (lora, checkpointing) in ARCHITECTURE_VARIANTS.items():
                    if name not in args.variants:
                        continue
                    cases.append(
                        Case(
                            model, stage, name, precision=precision, lora=lora,
                            checkpointing=checkpointing, batch_size=args.arch_batch_size,
                            tiny=args.tiny_architectures, **common,
                        )
                    )  # fmt: skip
                if "naive" not in args.variants:
                    continue
                cases.append(
                    Case(
                        model, stage, "naive", precision="no", lora=True,
                        truncate=args.inference_steps, batch_size=args.arch_batch_size,
                        tiny=args.tiny_architectures, **common,
                    )
                )  # fmt: skip
    return cases


def run_in_child(case: Case, timeout: float) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(asdict(case))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**asdict(case), "status": f"timeout after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    lines = (done.stderr or done.stdout).strip().splitlines()
    print("\n".join(f"  | {line}" for line in lines[-12:]), file=sys.stderr, flush=True)
    tail = lines[-1:] or ["no output"]
    status = "OOM" if "OutOfMemoryError" in (done.stderr or "") else f"failed: {tail[0][:80]}"
    return {**asdict(case), "status": status}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    naive = {(r["model"], r["stage"]): r for r in rows if r["variant"] == "naive"}
    header = (
        f"{'model':<10} {'stage':<11} {'variant':<10} {'prec':<5} {'K':>3} {'batch':>5} "
        f"{'ms/step':>9} {'steps/s':>8} {'peak MiB':>9} {'step MiB':>9} {'TFLOP/step':>10} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'vs naive':>16}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['model']:<10} {r['stage']:<11} {r['variant']:<10} {r['status']}")
            continue
        reference = naive.get((r["model"], r["stage"]))
        versus = "-"
        if reference and reference is not r and reference.get("status") == "ok":
            speed = reference["ms_per_step"] / r["ms_per_step"]
            memory = r["step_mib"] / reference["step_mib"] if reference["step_mib"] > 0 else None
            versus = f"x{speed:.2f} mem {_fmt(memory, '.2f')}"
        precision = "fp32" if r["precision"] == "no" else r["precision"]
        print(
            f"{r['model']:<10} {r['stage']:<11} {r['variant']:<10} {precision:<5} "
            f"{r['truncate']:>3} {r['batch_size']:>5} {r['ms_per_step']:>9.1f} "
            f"{r['steps_per_second']:>8.2f} {r['peak_mib']:>9.0f} {r['step_mib']:>9.0f} "
            f"{_fmt(r['tflop_per_step'], '10.4f'):>10} {_fmt(r['tflops'], '8.3f'):>8} "
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '5.1f'):>6} {versus:>16}"
        )
    devices = sorted({r["device"] for r in rows if r.get("status") == "ok"})
    print(f"device: {', '.join(devices)}")
    settings = sorted({r["params"] or "the configuration's defaults (the paper's)" for r in rows})
    print(f"stage settings: {', '.join(settings)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=lambda s: s.split(","), default=list(STAGES))
    parser.add_argument("--toy-models", type=lambda s: [m for m in s.split(",") if m],
                        default=["toy-sd15", "toy-sdxl"], help="Toy presets ('' for none).")  # fmt: skip
    parser.add_argument("--params", default=str(DEFAULT_PARAMS),
                        help="The stages' settings (default: the project's params.yaml; '' for "
                        "the configuration's defaults, the paper's).")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per case.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--batch-size", type=int, default=4, help="Toy micro-batch.")
    parser.add_argument("--arch-batch-size", type=int, default=1, help="SD1.5/SDXL micro-batch.")
    parser.add_argument("--inference-steps", type=int, default=20, help="Feedback schedule length.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default).")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"Peak TFLOP/s for MFU (CUDA default {H200_BF16_DENSE_TFLOPS}).")  # fmt: skip
    parser.add_argument("--architectures", action="store_true",
                        help="Also SD1.5 @ 512 and SDXL @ 1024 architectures (random weights).")  # fmt: skip
    parser.add_argument("--tiny-architectures", action="store_true",
                        help="Run the architecture cases at tiny width (fp32), e.g. on a CPU.")  # fmt: skip
    parser.add_argument("--architecture-models", type=lambda s: s.split(","),
                        default=["sd15-512", "sdxl-1024"],
                        help="Architecture cases' models (sd15-512, sdxl-1024).")  # fmt: skip
    parser.add_argument("--variants", type=lambda s: s.split(","),
                        default=[*ARCHITECTURE_VARIANTS, "naive"],
                        help="Architecture cases' variants to run (comma-separated).")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per case.")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--op-counts", action="store_true",
                        help="Only count the ATen operations of one no-grad UNet call per model "
                        "(toy-sd15, toy-sdxl, sd15-512, sdxl-1024), plain, LoRA, LoRA merged.")  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - {*ARCHITECTURE_VARIANTS, "naive"})
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {[*ARCHITECTURE_VARIANTS, 'naive']}")
    if args.op_counts:
        print(f"{'model':<10} {'LoRA layers':>11} {'plain':>7} {'LoRA':>7} {'merged':>7}")
        for name in ("toy-sd15", "toy-sdxl", "sd15-512", "sdxl-1024"):
            ops = count_unet_ops(name)
            print(f"{name:<10} {ops['lora layers']:>11} {ops['plain']:>7} {ops['lora']:>7} "
                  f"{ops['lora merged']:>7}")  # fmt: skip
        return 0
    if args.child:
        case = Case(**json.loads(args.child))
        print(RESULT_MARKER + json.dumps(run_case(case)), flush=True)
        return 0
    if args.architectures and not args.tiny_architectures:
        import torch

        if not torch.cuda.is_available():
            print("--architectures needs a GPU (or add --tiny-architectures)", file=sys.stderr)
            return 2
    rows = []
    cases = cases_from_args(args)
    for index, case in enumerate(cases, start=1):
        print(f"[{index}/{len(cases)}] {case.label()} ...", file=sys.stderr, flush=True)
        rows.append(run_in_child(case, args.timeout))
        row = rows[-1]
        if row["status"] == "ok":
            print(f"  {row['ms_per_step']:.1f} ms/step, peak {row['peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            print(f"  {row['status']}", file=sys.stderr, flush=True)
        if args.json:  # after every case, so that a run cut short keeps its rows
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=2)
    print_table(rows)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
