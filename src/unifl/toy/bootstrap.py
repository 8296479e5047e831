"""Bootstrap of the toy world: data, a toy perceptual model, a toy CLIP, a toy VAE and base model.

`bootstrap_toy_world(params)` builds, from nothing, what a production run
loads from checkpoints: a latent diffusion model of the Stable Diffusion
classes (VAE, UNet, CLIP text encoder(s), DDIM scheduler) trained on the toy
world's images and captions, the toy segmenter that perceptual feedback
learning and the caption-match metric use, and the pretrained toy CLIP that
the reward models start from (`unifl.toy.clip`). The output is cached by a hash of
the configuration (`toy`, `bootstrap` and the seed), so `make run` and the
tests train each configuration once.

Training recipe:
1. segmenter: pixel cross-entropy on the generated images and semantic masks;
   CLIP: contrastive image-caption loss (`clip_steps`, after the segmenter);
2. VAE: reconstruction MSE in [-1, 1] plus a small KL term; afterwards the
   latent scaling factor is set to 1 / std of the latents, as SD's 0.18215 was,
   and the decoder trains on alone with the encoder frozen (`vae_decoder_steps`),
   as SD's VAE decoder was fine-tuned;
3. UNet and text encoder(s): noise-prediction MSE at timesteps of the
   1000-step training schedule drawn logit-normally (`timestep_sampling`,
   SD3's choice: most steps in the middle of the schedule, where the scene's
   composition and the objects' shapes are decided; 'uniform' with the
   optional Min-SNR weighting `min_snr_gamma` is SD's own recipe), captions
   dropped to "" with probability `caption_dropout` so classifier-free
   guidance works; with `unet_ema_decay` the moving average of their weights
   becomes the base model, and the manifest keeps the last weights'
   caption-match beside it.

Every trainer uses AdamW fused into one kernel (`unifl.models.precision.adamw`).

Cores: the toy models run fastest on one torch thread per process, so with
`project.num_threads: 1` on a machine of two or more cores the segmenter
and the CLIP train in a side process while the VAE trains (`process_slots`),
the VAE's decoder phase in the same process while the UNet trains (the frozen
encoder gives the UNet its latents, so the two do not wait for each other;
three processes then share two cores for the decoder's minute or two), and a UNet
batch of at least two `MIN_SAMPLES_PER_PROCESS` shares trains data-parallel
(`training_processes`; the default batch of 32 trains in two processes on two
cores), averaging their gradients through shared memory (`SharedGradients`).
Data-parallel training equals one process's on the whole batch up to float
summation order; the process count is part of the cache key because it
changes the bits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import multiprocessing
import os
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unifl.config import Params, ProjectConfig
from unifl.io import atomic_directory, write_json
from unifl.models.precision import adamw, apply_num_threads

if TYPE_CHECKING:
    from unifl.feedback.trainer import ExponentialMovingAverage

BOOTSTRAP_FORMAT = "unifl-toy-bootstrap/4"
"""Bumped whenever the toy models or their training change, so stale caches are retrained."""
MANIFEST_NAME = "manifest.json"
VAE_DECODER_MODULES = ("decoder", "post_quant_conv")
"""The VAE's parts that `train_vae(decoder_only=True)` trains; the encoder's stay frozen."""


@dataclass
class BootstrapResult:
    """Where the bootstrap wrote its outputs, and what it measured."""

    directory: Path
    manifest: dict[str, Any]
    cached: bool

    @property
    def base_model_dir(self) -> Path:
        return self.directory / "base"

    @property
    def segmenter_dir(self) -> Path:
        return self.directory / "segmenter"

    @property
    def clip_dir(self) -> Path | None:
        """The pretrained toy CLIP (a CLIP checkpoint directory); None when `clip_steps` is 0."""
        directory = self.directory / "clip"
        return directory if directory.is_dir() else None

    @property
    def train_data_dir(self) -> Path:
        return self.directory / "data" / "train"

    @property
    def eval_data_dir(self) -> Path:
        return self.directory / "data" / "eval"

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest["metrics"]


def bootstrap_config(params: Params) -> dict[str, Any]:
    """The part of the configuration that determines the bootstrap's output."""
    return {
        "format": BOOTSTRAP_FORMAT,
        "seed": params.project.seed,
        "toy": params.toy.model_dump(mode="json"),
        # A setting left at None is off: leaving it out keeps the caches of bootstraps
        # trained before an off-by-default setting existed.
        "bootstrap": params.bootstrap.model_dump(
            mode="json", exclude={"cache_dir"}, exclude_none=True
        ),
        # Processes sum gradients in another order than one process: other bits.
        "processes": training_processes(params),
    }


def config_hash(params: Params) -> str:
    text = json.dumps(bootstrap_config(params), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_directory(params: Params) -> Path:
    """The cache directory of this configuration."""
    return Path(params.bootstrap.cache_dir) / f"{params.bootstrap.family}-{config_hash(params)}"


def load_cached(directory: Path, params: Params) -> BootstrapResult | None:
    """The finished bootstrap in `directory` if it was made with this configuration."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("config_hash") != config_hash(params):
        return None
    return BootstrapResult(directory, manifest, cached=True)


def _lr_lambda(total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of `steps` random mini-batches (epochs of random permutations)."""
    order = torch.randperm(num_items, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > num_items:
            order = torch.randperm(num_items, generator=generator)
            position = 0
        yield order[position : position + batch_size]
        position += batch_size


def train_vae(
    vae,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    kl_weight: float,
    seed: int,
    progress: bool = True,
    decoder_only: bool = False,
) -> dict[str, float]:
    """Train an AutoencoderKL on images in [0, 1]; return its final losses.

    `decoder_only` trains the decoder (and `post_quant_conv`) alone on latents
    drawn from the frozen encoder's posterior, with the reconstruction loss
    only: the encoder, and so every latent, stays as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    trained = [getattr(vae, name) for name in VAE_DECODER_MODULES] if decoder_only else [vae]
    vae.eval().requires_grad_(False)
    # The frozen encoder's posterior does not change: encoded once, not at every step.
    frozen_posteriors = encode_dataset(vae, images) if decoder_only else None
    for module in trained:
        module.train().requires_grad_(True)
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = adamw(parameters, lr=learning_rate, weight_decay=0.0)
    warmup = min(50 if decoder_only else 100, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup))
    recon_ema = kl_ema = float("nan")
    bar = tqdm(
        _batches(len(images), batch_size, steps, generator),
        total=steps,
        desc="toy VAE decoder" if decoder_only else "toy VAE",
        disable=not progress,
    )
    for index in bar:
        pixels = images[index] * 2 - 1
        if frozen_posteriors is None:
            posterior = vae.encode(pixels).latent_dist
            mean, std = posterior.mean, posterior.std
        else:
            mean, std = (tensor[index] for tensor in frozen_posteriors)
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        recon_loss = F.mse_loss(recon, pixels)
        loss = recon_loss
        if not decoder_only:
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = loss + kl_weight * kl
            kl_ema = kl.item() if math.isnan(kl_ema) else 0.95 * kl_ema + 0.05 * kl.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        recon_ema = (
            recon_loss.item()
            if math.isnan(recon_ema)
            else 0.95 * recon_ema + 0.05 * recon_loss.item()
        )
        shown = {"recon": f"{recon_ema:.4f}"}
        if not decoder_only:
            shown["kl"] = f"{kl_ema:.3f}"
        bar.set_postfix(shown)
    vae.eval().requires_grad_(False)
    if decoder_only:
        return {"vae_decoder_recon_mse": recon_ema}
    return {"vae_recon_mse": recon_ema, "vae_kl": kl_ema}


@torch.no_grad()
def calibrate_latent_scale(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Set `scaling_factor` to 1 / std of the latent means, so latents have unit variance."""
    means = [
        vae.encode(images[start : start + batch_size] * 2 - 1).latent_dist.mean
        for start in range(0, len(images), batch_size)
    ]
    std = float(torch.cat(means).std())
    scale = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=scale)
    return scale


@torch.no_grad()
def encode_dataset(
    vae, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, unscaled (sampled fresh at each UNet step)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def sample_timesteps(
    count: int,
    num_train_timesteps: int,
    generator: torch.Generator,
    sampling: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """`count` training timesteps in [0, num_train_timesteps): 'uniform', or 'logit_normal'
    (t = floor(T * sigmoid(mean + std * n)), n standard normal)."""
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (count,), generator=generator)
    if sampling == "logit_normal":
        fractions = torch.sigmoid(mean + std * torch.randn(count, generator=generator))
        return (fractions * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    raise ValueError(f"timestep sampling must be 'uniform' or 'logit_normal', got {sampling!r}")


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights of noise prediction: min(SNR, gamma) / SNR, where
    SNR = alpha_bar / (1 - alpha_bar) of each sample's timestep."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def train_denoiser(
    model,
    images: torch.Tensor,
    captions: list[str],
    steps: int,
    batch_size: int,
    learning_rate: float,
    caption_dropout: float,
    seed: int,
    min_snr_gamma: float | None = None,
    timestep_sampling: str = "uniform",
    logit_normal: tuple[float, float] = (0.0, 1.0),
    progress: bool = True,
    rank: int = 0,
    gradients: SharedGradients | None = None,
    ema: ExponentialMovingAverage | None = None,
    text_encoder_learning_rate: float | None = None,
    input_perturbation: float | None = None,
) -> dict[str, float]:
    """Train the UNet and text encoder(s) with the noise-prediction objective.

    The text encoder(s) train at `text_encoder_learning_rate` (None:
    `learning_rate`), on the same schedule.

    `ema` (over `denoiser_parameters(model)`) is updated after every step; the
    model keeps its last weights.

    Timesteps are drawn by `sample_timesteps` (`timestep_sampling`, with
    `logit_normal` = (mean, std)); `min_snr_gamma` weights each sample's MSE
    by min(SNR, gamma) / SNR (None: 1). `input_perturbation` gamma noises the
    input with noise + gamma * extra noise, the target staying the noise (None:
    off; the extra noise is then not drawn, so the random stream is unchanged).

    With `gradients` (one of `gradients.processes` processes, this one `rank`)
    each process computes the loss on its share of every batch and the
    gradients are averaged: every process draws the random numbers of the
    whole batch, so the update is that of one process on the whole batch (up
    to float summation order).
    """
    from unifl.models.base import encode_prompt, predict_noise

    world_size = 1 if gradients is None else gradients.processes

    if batch_size % world_size:
        raise ValueError(
            f"bootstrap.unet_batch_size ({batch_size}) must be divisible by the {world_size} "
            "training processes"
        )
    share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    generator = torch.Generator().manual_seed(seed)
    means, stds = encode_dataset(model.vae, images)
    scale = float(model.vae.config.scaling_factor)
    trainable = [model.unet, *model.text_encoders()]
    named = denoiser_parameters(model)
    parameters = list(named.values())
    for module in trainable:
        module.train().requires_grad_(True)
    text_rate = learning_rate if text_encoder_learning_rate is None else text_encoder_learning_rate
    groups = [
        {"params": list(model.unet.parameters())},
        {"params": [p for encoder in model.text_encoders() for p in encoder.parameters()],
         "lr": text_rate},
    ]  # fmt: skip
    optimizer = adamw(groups, lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, min(200, steps)))
    alphas = model.scheduler.alphas_cumprod
    num_train_timesteps = int(model.scheduler.config.num_train_timesteps)
    loss_ema = float("nan")
    bar = tqdm(
        _batches(len(images), batch_size, steps, generator),
        total=steps,
        desc="toy UNet",
        disable=not progress,
    )
    for index in bar:
        latents = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        ) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = sample_timesteps(
            len(index), num_train_timesteps, generator, timestep_sampling, *logit_normal
        )
        abar = alphas[timesteps].view(-1, 1, 1, 1).float()
        input_noise = noise
        if input_perturbation is not None:
            extra = torch.randn(latents.shape, generator=generator)
            input_noise = noise + input_perturbation * extra
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * input_noise
        drop = torch.rand(len(index), generator=generator) < caption_dropout
        batch_captions = [
            "" if dropped else captions[i]
            for i, dropped in zip(index.tolist(), drop.tolist(), strict=True)
        ]
        embeds = encode_prompt(model, batch_captions[share])
        prediction = predict_noise(model, noisy[share], timesteps[share], embeds)
        errors = (prediction - noise[share]).pow(2).mean(dim=(1, 2, 3))
        if min_snr_gamma is not None:
            errors = errors * min_snr_weights(abar.view(-1)[share], min_snr_gamma)
        loss = errors.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = loss.item() if gradients is None else gradients.average(rank, parameters, loss)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(named)
        loss_ema = value if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * value
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    for module in trainable:
        module.eval().requires_grad_(False)
    return {"unet_loss": loss_ema}


def text_encoders_from_clip(model, clip_dir: Path) -> None:
    """Replace `model`'s text encoder(s) with the text tower of the toy CLIP in `clip_dir`.

    SD's text encoder is the text tower of a pretrained CLIP (SDXL's second one
    with its text projection). The toy CLIP is tokenised by the same toy
    tokenizer, so its text weights fit the base model as they are; each encoder
    takes the CLIP's text config.
    """
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

    clip = CLIPModel.from_pretrained(clip_dir)
    if len(model.tokenizer) != clip.config.text_config.vocab_size:
        raise ValueError(
            f"{clip_dir}: the CLIP's vocabulary ({clip.config.text_config.vocab_size}) is not "
            f"the base model's tokenizer's ({len(model.tokenizer)})"
        )
    tower = clip.text_model.state_dict()

    def weights(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
        # transformers versions differ in whether the encoder wraps the transformer.
        prefix = "text_model." if hasattr(encoder, "text_model") else ""
        loaded = {prefix + key: value for key, value in tower.items()}
        if hasattr(encoder, "text_projection"):
            loaded["text_projection.weight"] = clip.text_projection.weight
        return loaded

    text_config = clip.config.text_config
    encoder = CLIPTextModel(text_config)
    encoder.load_state_dict(weights(encoder))
    model.text_encoder = encoder.eval()
    if model.family == "sdxl":
        text_config = copy.deepcopy(text_config)
        text_config.projection_dim = clip.config.projection_dim
        second = CLIPTextModelWithProjection(text_config)
        second.load_state_dict(weights(second))
        model.text_encoder_2 = second.eval()


def untrained_model(params: Params, seed: int, preset: str | None = None):
    """The randomly initialised toy model a bootstrap of `params` starts from at `seed`.

    `preset` (default: `bootstrap.family`'s) takes the bootstrap's latent channels and,
    for toy-sd15, its UNet layout; toy-sdxl keeps SDXL's."""
    from unifl.models.toy_presets import PRESETS, build_toy_model

    boot = params.bootstrap
    preset = preset or f"toy-{boot.family}"
    layout = boot.unet_layout if PRESETS[preset] == "sd15" else None
    return build_toy_model(preset, params.toy.resolution, seed, boot.latent_channels, layout)


def train_base_model(
    model,
    model_dir: Path,
    images: torch.Tensor,
    captions: list[str],
    params: Params,
    clip_dir: Path | None,
    progress: bool = True,
) -> tuple[Any, dict[str, float], dict[str, torch.Tensor] | None]:
    """Train `model`'s UNet and text encoder(s) with the bootstrap's recipe; save it in `model_dir`.

    The text encoders start as `bootstrap.text_encoder` says (from the toy CLIP
    in `clip_dir` for 'clip'); training runs on `training_processes(params)`
    processes with the `bootstrap.unet_*` settings and `project.seed`. Returns
    the model with its last weights (also saved in `model_dir`), the training
    metrics and, with `bootstrap.unet_ema_decay`, the moving averages by
    `denoiser_parameters` name.
    """
    from unifl.models.base import load_base_model, save_base_model

    boot = params.bootstrap
    if boot.text_encoder == "clip":
        text_encoders_from_clip(model, clip_dir)
    training = {
        "steps": boot.unet_steps,
        "batch_size": boot.unet_batch_size,
        "learning_rate": boot.unet_learning_rate,
        "text_encoder_learning_rate": boot.text_encoder_learning_rate,
        "caption_dropout": boot.caption_dropout,
        "input_perturbation": boot.input_perturbation,
        "min_snr_gamma": boot.min_snr_gamma,
        "timestep_sampling": boot.timestep_sampling,
        "logit_normal": (boot.logit_normal_mean, boot.logit_normal_std),
        "seed": params.project.seed,
    }
    processes = training_processes(params)
    if processes == 1:
        ema = denoiser_ema(model, boot.unet_ema_decay)
        metrics = train_denoiser(model, images, captions, progress=progress, ema=ema, **training)
        save_base_model(model, model_dir)
        return model, metrics, None if ema is None else ema.shadow
    metrics, averages = train_denoiser_in_processes(
        model, model_dir, images, captions, processes, params.project, progress,
        ema_decay=boot.unet_ema_decay, **training,
    )  # fmt: skip
    return load_base_model(model_dir), metrics, averages


def sample_captions(model, captions: list[str], params: Params, progress: bool = True):
    """The bootstrap's evaluation samples of `captions`: `sampling.steps` steps spaced by
    `sampling.timestep_spacing` at `sampling.guidance_scale`, seeded by `project.seed`."""
    from unifl.models.sampler import generate

    return generate(
        model,
        captions,
        steps=params.sampling.steps,
        guidance_scale=params.sampling.guidance_scale,
        seed=params.project.seed,
        timestep_spacing=params.sampling.timestep_spacing,
        progress=progress,
    )


def denoiser_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters the bootstrap trains (UNet, text encoders), by a name unique across them."""
    modules = {"unet": model.unet} | {
        f"text_encoder_{i}": encoder for i, encoder in enumerate(model.text_encoders())
    }
    return {
        f"{prefix}.{name}": parameter
        for prefix, module in modules.items()
        for name, parameter in module.named_parameters()
    }


def denoiser_ema(model, decay: float | None) -> ExponentialMovingAverage | None:
    """An EMA of the bootstrap's trained parameters (`bootstrap.unet_ema_decay`), or None."""
    if decay is None:
        return None
    from unifl.feedback.trainer import ExponentialMovingAverage

    return ExponentialMovingAverage(denoiser_parameters(model), decay)


class SharedGradients:
    """The mean of the data-parallel processes' gradients, through shared memory.

    Every process copies its gradients and its loss into its row of a shared
    buffer; after a barrier each sums its own slice of the columns over the rows
    into the first row, in rank order; after a second barrier all read the
    sums. An all-reduce over gloo sends the whole gradient through TCP, which
    cost a toy UNet step on two cores a tenth of its time. With two processes
    the sums equal an all-reduce's bit for bit (float addition of two terms
    commutes), so the trained weights do not change. Two buffers alternate, so
    a process may write the next step's gradients while another still reads
    this step's sums. Made before `torch.multiprocessing.spawn` and passed to
    every process.
    """

    def __init__(self, size: int, processes: int):
        self.processes = processes
        self.buffers = torch.zeros(2, processes, size).share_memory_()
        self.barrier = multiprocessing.get_context("spawn").Barrier(processes)
        self.steps = 0

    def average(self, rank: int, parameters: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Replace the gradients of `parameters` by their mean over the processes; the mean loss."""
        rows = self.buffers[self.steps % 2]
        self.steps += 1
        flatten_gradients(parameters, loss, out=rows[rank])
        self.barrier.wait()
        size = rows.shape[1]
        mine = slice(rank * size // self.processes, (rank + 1) * size // self.processes)
        for other in range(1, self.processes):
            rows[0, mine] += rows[other, mine]
        self.barrier.wait()
        return set_flat_gradients(parameters, rows[0] / self.processes)


def flatten_gradients(
    parameters: list[torch.nn.Parameter], loss: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradients of `parameters` (zeros where there is none) and `loss`, end to end in one
    vector (written into `out` when given)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    return torch.cat([*(g.reshape(-1) for g in grads), loss.detach().reshape(1)], out=out)


def set_flat_gradients(parameters: list[torch.nn.Parameter], flat: torch.Tensor) -> float:
    """Make the gradients of `parameters` views of a `flatten_gradients` vector; its loss."""
    offset = 0
    for parameter in parameters:
        parameter.grad = flat[offset : offset + parameter.numel()].view_as(parameter)
        offset += parameter.numel()
    return float(flat[-1])


def train_denoiser_in_processes(
    model,
    model_dir: Path,
    images: torch.Tensor,
    captions: list[str],
    processes: int,
    project: ProjectConfig,
    progress: bool = True,
    ema_decay: float | None = None,
    **training: Any,
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """`train_denoiser` of `model` on `processes` CPU processes, through `model_dir`.

    `model` is saved in `model_dir`, every process loads it from there, and
    the first writes the trained one (its last weights) back. `training` takes
    `train_denoiser`'s other arguments. Returns the metrics and, with
    `ema_decay`, the moving averages by `denoiser_parameters` name.
    """
    import tempfile

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from unifl.models.base import save_base_model

    save_base_model(model, model_dir)
    size = sum(p.numel() for p in denoiser_parameters(model).values())
    gradients = SharedGradients(size + 1, processes)  # + 1: the loss
    with tempfile.TemporaryDirectory(prefix="unifl-unet-") as scratch:
        metrics_path = Path(scratch) / "metrics.json"
        mp.spawn(
            _denoiser_process,
            args=(gradients, model_dir, metrics_path, images, captions, project, progress,
                  ema_decay, training),
            nprocs=processes,
            join=True,
        )  # fmt: skip
        averages = load_file(metrics_path.with_suffix(".safetensors")) if ema_decay else None
        return json.loads(metrics_path.read_text()), averages


def _denoiser_process(
    rank: int,
    gradients: SharedGradients,
    model_dir: Path,
    metrics_path: Path,
    images: torch.Tensor,
    captions: list[str],
    project: ProjectConfig,
    progress: bool,
    ema_decay: float | None,
    training: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    from unifl.models.base import load_base_model, save_base_model

    apply_num_threads(project)
    model = load_base_model(model_dir)
    # Every process applies the same averaged update, so each one's average is the same.
    ema = denoiser_ema(model, ema_decay)
    metrics = train_denoiser(
        model,
        images,
        captions,
        progress=progress and rank == 0,
        rank=rank,
        gradients=gradients,
        ema=ema,
        **training,
    )
    if rank == 0:
        save_base_model(model, model_dir)
        if ema is not None:
            save_file(ema.shadow, metrics_path.with_suffix(".safetensors"))
        write_json(metrics_path, metrics)


def _train_and_save_segmenter(
    out_dir: Path, project: ProjectConfig, **training: Any
) -> dict[str, float]:
    """Train the toy segmenter and save it to `out_dir`; its metrics (run in a side process)."""
    from unifl.models.segmenter import train_segmenter

    apply_num_threads(project)
    segmenter, metrics = train_segmenter(**training)
    segmenter.save(out_dir)
    return {key: float(value) for key, value in metrics.items()}


def _train_vae_decoder(
    vae, project: ProjectConfig, images: torch.Tensor, **training: Any
) -> dict[str, Any]:
    """`train_vae(decoder_only=True)` of `vae`: the trained weights by module of
    `VAE_DECODER_MODULES`, the metrics and the seconds.

    The bootstrap passes a copy of its VAE and loads these weights back into
    its own.
    """
    apply_num_threads(project)
    started = time.perf_counter()
    metrics = train_vae(vae, images, kl_weight=0.0, decoder_only=True, **training)
    state = {name: getattr(vae, name).state_dict() for name in VAE_DECODER_MODULES}
    return {"state": state, "metrics": metrics, "seconds": time.perf_counter() - started}


def _train_and_save_clip(
    out_dir: Path, project: ProjectConfig, **training: Any
) -> dict[str, float]:
    """Pretrain the toy CLIP and save it to `out_dir`; its metrics (run in a side process)."""
    from unifl.toy.clip import save_toy_clip, train_toy_clip

    apply_num_threads(project)
    clip, tokenizer, metrics = train_toy_clip(**training)
    save_toy_clip(clip, tokenizer, out_dir)
    return metrics


MIN_SAMPLES_PER_PROCESS = 16
"""A process's smallest share of a UNet batch. A toy UNet step is mostly fixed cost, so smaller
shares gain little: a batch of 32 took 0.099 s a step in one process and 0.082 s in two of 16
(`benchmarks/unet_step.py` on 2026-12-04, the gradients then averaged over gloo)."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def process_slots(params: Params) -> int:
    """How many processes of `project.num_threads` threads the cores hold side by side.

    One when `num_threads` is None: torch then takes every core in one process.
    """
    threads = params.project.num_threads
    return 1 if threads is None else max(1, available_cores() // threads)


def training_processes(params: Params) -> int:
    """How many processes train the toy UNet together.

    One per process slot, no more than leave each `MIN_SAMPLES_PER_PROCESS`
    samples of a batch, and a divisor of the batch size.
    """
    batch_size = params.bootstrap.unet_batch_size
    limit = min(process_slots(params), batch_size // MIN_SAMPLES_PER_PROCESS)
    return max(n for n in range(1, max(1, limit) + 1) if batch_size % n == 0)


@contextmanager
def _side_process(parallel: bool):
    """An executor of one worker: a spawned process when `parallel`, else this process.

    Either way `submit(...).result()` gives the same outcome (the jobs are
    deterministic for their seed); only the wall time differs.
    """
    if not parallel:
        yield _Deferred()
        return
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        try:
            yield pool
        except BaseException:
            # The bootstrap failed (or was interrupted) here: its side jobs are of no use
            # any more, and leaving the pool would wait for the one running to finish.
            _stop_now(pool)
            raise


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Cancel `pool`'s pending jobs and end its workers without waiting for them."""
    workers = list((pool._processes or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join()


class _Deferred:
    """`submit` that runs the job in this process when its result is asked for, so the
    serial case stays serial: no two trainings compete for one core."""

    def submit(self, fn, /, **kwargs):
        return _DeferredResult(fn, kwargs)


@dataclass
class _DeferredResult:
    fn: Any
    kwargs: dict[str, Any]

    def result(self):
        return self.fn(**self.kwargs)


def _peak_rss_gib(who: str = "self") -> float:
    """Peak resident memory of this process, or of its largest finished child process."""
    import resource

    scope = resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN
    return resource.getrusage(scope).ru_maxrss / 2**20


def bootstrap_toy_world(
    params: Params,
    out_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> BootstrapResult:
    """Train (or load from the cache) the toy world's base model and segmenter.

    `out_dir` defaults to the cache directory of this configuration. A finished
    bootstrap with the same configuration hash is returned as it is unless
    `force`; the directory is written whole or not at all.
    """
    directory = Path(out_dir) if out_dir is not None else default_directory(params)
    if not force and (cached := load_cached(directory, params)) is not None:
        return cached

    threads = torch.get_num_threads()
    apply_num_threads(params.project)
    try:
        return _bootstrap(params, directory, progress)
    finally:
        torch.set_num_threads(threads)


def _bootstrap(params: Params, directory: Path, progress: bool) -> BootstrapResult:
    from unifl.models.base import save_base_model
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.caption_match import caption_match
    from unifl.toy.dataset import generate_toy_batch, write_toy_dataset

    toy, boot, seed = params.toy, params.bootstrap, params.project.seed
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    with atomic_directory(directory) as tmp:
        clock = time.perf_counter()
        shape = {
            "resolution": toy.resolution,
            "min_objects": toy.min_objects,
            "max_objects": toy.max_objects,
        }
        # Evaluation images come from their own seed so they never repeat training images.
        eval_seed = toy.seed + 1
        train_manifest = write_toy_dataset(
            tmp / "data" / "train", toy.num_train, toy.seed, progress=progress, **shape
        )
        eval_manifest = write_toy_dataset(
            tmp / "data" / "eval", toy.num_eval, eval_seed, progress=progress, **shape
        )
        train = generate_toy_batch(toy.num_train, toy.seed, **shape)
        evaluation = generate_toy_batch(toy.num_eval, eval_seed, **shape)
        images = train.image_tensor()
        eval_images = evaluation.image_tensor()
        timings["data_s"] = time.perf_counter() - clock

        parallel = process_slots(params) > 1
        segmenter_job = dict(
            images=images,
            semantic_masks=train.semantic_tensor(),
            eval_images=eval_images,
            eval_masks=evaluation.semantic_tensor(),
            steps=boot.segmenter_steps,
            batch_size=boot.batch_size,
            seed=seed,
            out_dir=tmp / "segmenter",
            project=params.project,
            # Two progress bars at once would garble each other: the side process shows none.
            progress=progress and not parallel,
        )
        clip_job = dict(
            images=images,
            captions=train.captions,
            eval_images=eval_images,
            eval_captions=evaluation.captions,
            steps=boot.clip_steps,
            batch_size=boot.clip_batch_size,
            learning_rate=boot.clip_learning_rate,
            seed=seed,
            out_dir=tmp / "clip",
            project=params.project,
            progress=progress and not parallel,
        )
        # The segmenter and the CLIP are independent of the base model: on a spare core
        # they train one after the other in their own process while the VAE trains here.
        with _side_process(parallel) as side:
            segmenter_done = side.submit(_train_and_save_segmenter, **segmenter_job)
            clip_done = side.submit(_train_and_save_clip, **clip_job) if boot.clip_steps else None
            model = untrained_model(params, seed)
            clock = time.perf_counter()
            metrics.update(
                train_vae(
                    model.vae,
                    images,
                    boot.vae_steps,
                    boot.batch_size,
                    boot.vae_learning_rate,
                    boot.vae_kl_weight,
                    seed,
                    progress,
                )
            )
            metrics["vae_scaling_factor"] = calibrate_latent_scale(model.vae, images)
            timings["vae_s"] = time.perf_counter() - clock
            # The segmenter and the CLIP must be done before the UNet's processes take the
            # cores (and the text encoder starts from the CLIP).
            segmenter_metrics = segmenter_done.result()
            clip_metrics = clip_done.result() if clip_done is not None else {}
            # The decoder's phase leaves the encoder, and so the UNet's latents, as they are:
            # it trains in the side process beside the UNet instead of before it. On a copy:
            # torch shares the tensors it sends to a process, so the side process would train
            # this VAE in place while the UNet's processes save and load it.
            decoder_done = (
                side.submit(
                    _train_vae_decoder,
                    vae=copy.deepcopy(model.vae),
                    images=images,
                    steps=boot.vae_decoder_steps,
                    batch_size=boot.batch_size,
                    learning_rate=boot.vae_decoder_learning_rate,
                    # Its own batches: not those of the VAE's first steps again.
                    seed=seed + 1,
                    project=params.project,
                    progress=progress and not parallel,
                )
                if boot.vae_decoder_steps
                else None
            )

            clock = time.perf_counter()
            model, unet_metrics, averages = train_base_model(
                model, tmp / "base", images, train.captions, params, tmp / "clip", progress
            )
            metrics.update(unet_metrics)
            timings["unet_s"] = time.perf_counter() - clock
            if decoder_done is not None:
                decoder = decoder_done.result()
                for name, state in decoder["state"].items():
                    getattr(model.vae, name).load_state_dict(state)
                metrics.update(decoder["metrics"])
                timings["vae_decoder_s"] = decoder["seconds"]
                save_base_model(model, tmp / "base")
        timings["segmenter_s"] = segmenter_metrics["seconds"]
        metrics.update({f"segmenter_{k}": float(v) for k, v in segmenter_metrics.items()})
        if clip_metrics:
            timings["clip_s"] = clip_metrics["seconds"]
            metrics.update({f"clip_{k}": float(v) for k, v in clip_metrics.items()})
        segmenter = ToySegmenter.load(tmp / "segmenter")

        clock = time.perf_counter()

        if averages is not None:
            # The last weights' samples, the baseline of the average in the same run.
            last_samples = sample_captions(model, evaluation.captions, params, progress)
            last = caption_match(segmenter, last_samples, evaluation.captions)
            metrics["caption_match_base_20_steps_last_weights"] = float(last.rate)
            with torch.no_grad():
                for name, parameter in denoiser_parameters(model).items():
                    parameter.copy_(averages[name])
            save_base_model(model, tmp / "base")
        real = caption_match(segmenter, eval_images, evaluation.captions)
        samples = sample_captions(model, evaluation.captions, params, progress)
        generated = caption_match(segmenter, samples, evaluation.captions)
        metrics["caption_match_real"] = float(real.rate)
        metrics["caption_match_base_20_steps"] = float(generated.rate)
        _save_sample_grid(samples[:16], evaluation.captions[:16], tmp / "samples.png")
        timings["evaluation_s"] = time.perf_counter() - clock
        timings["total_s"] = time.perf_counter() - started

        manifest = {
            "format": BOOTSTRAP_FORMAT,
            "config_hash": config_hash(params),
            "config": bootstrap_config(params),
            "family": boot.family,
            "data": {
                "train": {"count": toy.num_train, "hash": train_manifest["content_hash"]},
                "eval": {"count": toy.num_eval, "hash": eval_manifest["content_hash"]},
            },
            "metrics": metrics,
            "timings": timings,
            "peak_rss_gib": _peak_rss_gib(),
            # The UNet's and the segmenter's worker processes, each on its own.
            "peak_rss_child_gib": _peak_rss_gib("children"),
            "torch": torch.__version__,
        }
        write_json(tmp / MANIFEST_NAME, manifest)
    return BootstrapResult(directory, manifest, cached=False)


def _save_sample_grid(images: torch.Tensor, captions: list[str], path: Path) -> None:
    """A captioned grid of samples, for people to look at."""
    import matplotlib

    from unifl.models.sampler import to_pil

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.6))
    for axis in axes.flat:
        axis.axis("off")
    for axis, picture, caption in zip(axes.flat, to_pil(images), captions, strict=False):
        axis.imshow(picture)
        axis.set_title(textwrap.fill(caption, 32), fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary_lines(result: BootstrapResult) -> list[str]:
    """What `unifl toy bootstrap` prints."""
    manifest = result.manifest
    lines = [
        f"toy bootstrap ({'cached' if result.cached else 'trained'}): {result.directory}",
        f"  base model : {result.base_model_dir}",
        f"  segmenter  : {result.segmenter_dir}",
        f"  reward CLIP: {result.clip_dir or 'none (bootstrap.clip_steps: 0)'}",
        f"  data       : {result.train_data_dir} ({manifest['data']['train']['count']} images), "
        f"{result.eval_data_dir} ({manifest['data']['eval']['count']} images)",
        f"  samples    : {result.directory / 'samples.png'}",
    ]
    for key, value in sorted(manifest["metrics"].items()):
        lines.append(f"  {key:<28} {value:.4f}")
    for key, value in manifest["timings"].items():
        lines.append(f"  time {key:<23} {value:.1f}")
    lines.append(f"  peak memory (GiB)             {manifest['peak_rss_gib']:.2f}")
    processes = manifest["config"].get("processes", 1)
    if processes > 1:
        lines.append(
            f"  UNet trained by {processes} processes, each at most "
            f"{manifest['peak_rss_child_gib']:.2f} GiB"
        )
    return lines
