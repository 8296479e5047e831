"""Adversarial feedback learning: a reward model turned discriminator, for few-step inference.

Stage 2 trains the diffusion model and a discriminator `r_a` together:

    L2 = adversarial_weight * L_G + L_D + aesthetic_weight * L_aes (+ mse_weight * MSE)

* `r_a` starts as a copy of the reward model's *detail* head with its CLIP
  backbone (`adversarial.discriminator_dimension`), one output, trainable with
  its own optimizer (`adversarial.discriminator_learning_rate`). The caption is
  given to it for real and generated images alike. With
  `adversarial.discriminator_patches` it also scores each patch token of its
  image encoder (`PatchDiscriminator`); with
  `adversarial.discriminator_unet_features` it also scores the features of the
  starting model's UNet, frozen, on re-noised latents
  (`UNetFeatureDiscriminator`, LADD's discriminator).
* `L_G = -mean r_a(x0', c)`: the discriminator's parameters are *detached* in
  this term (`torch.func.functional_call`), so it moves only the UNet.
* `L_D = BCE(r_a(x0, c), 1) + BCE(r_a(sg[x0'], c), 0)`: real images labelled 1,
  the model's x0' (gradient stopped) labelled 0; one forward over [real; fake].
* With `adversarial.r1_weight` gamma > 0, `L_D` adds the R1 penalty
  `gamma/2 * mean ||grad_x r_a(x0, c)||^2` on the real images (with the UNet
  features, the gradient with respect to their latents counts too; not in the paper;
  ADD and StyleGAN use it): it keeps the discriminator smooth around the data,
  so that it does not run away from the generator. Its double backward needs
  the math attention kernel, which the discriminator's forward then takes.
* The two terms touch disjoint parameters, so one backward of their sum gives
  the generator and the discriminator exactly their own gradients; both
  optimisers then step: one generator and one discriminator update per step,
  the generator's judged by the discriminator before its update.

Which steps (documented, configurable): the schedule is the sampler this stage
optimises for, `adversarial.inference_steps` (4) DDIM steps with
`adversarial.timestep_spacing` "trailing": timesteps 999, 749, 499, 249. Real
latents are noised to `T_a = adversarial.start_step` (default: the noisiest
step, t=999) and denoised without gradients, with guidance, to the gradient
step `t` drawn uniformly from `[adversarial.min_step, adversarial.max_step]`
(default: `[0, start_step]`, i.e. the whole schedule), as PeFL does with its own `T_a` and
range. So the generator and the discriminator see the x0 predictions of the
few-step sampler's own trajectory, from the states that 4-step inference
passes through.

`adversarial.real_images: samples` replaces the real images by the starting
model's own samples of the data's captions at the full sampler
(`starting_model_samples`, made once before training), as LADD trains its
discriminator on its teacher's samples: "real" is then what 4-step inference
should reproduce, the model's own 20-step images with what the earlier stages
taught it, not the data's look.

`adversarial.start_latents: noise` starts that denoising from pure Gaussian
noise instead, the input 4-step inference starts from: at t=999 noised real
latents still carry a little of the image (sqrt(alpha_bar) = 0.07), which
inference never has. The real images then feed only the discriminator.

The paper draws the steps from the 20-step schedule (`adversarial.schedule_steps:
20`), whose trailing timesteps contain the 4-step ones but whose states there
come from 20 small steps, not 4 large ones: the model is never shown the
blurred intermediate states that few-step inference produces.
`benchmarks/adversarial_schedule.py` trains both from the toy base model and
prints their 4-step samples' caption-match and Fréchet distance (docs/toy-world-results.md).

At the end, the exported model samples `eval_prompts` captions at
`inference_steps` (trailing) and at `trainer.num_inference_steps`, and the
rewards and discriminator scores of both are reported.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unifl.feedback.decoupled import add_aesthetic_term, resolve_aesthetic_weights
from unifl.feedback.losses import discriminator_loss, generator_adversarial_loss
from unifl.feedback.pefl import ImageBatch, check_image_data, collate_images
from unifl.feedback.sampling import noise_latents, sample_step
from unifl.feedback.trainer import (
    ExportedModel,
    FeedbackTrainer,
    MetricsCallback,
    StepOutput,
    move_module,
)
from unifl.models.base import PromptEmbeds, encode_prompt, predict_noise
from unifl.models.reward import RewardHead, fuse_features

if TYPE_CHECKING:
    from unifl.config import Params
    from unifl.models.base import BaseModel
    from unifl.models.reward import DecoupledRewardModel

DISCRIMINATOR_DIR = "discriminator"
REAL_SAMPLES_DIR = "real_samples"  # adversarial.real_images: samples
REAL_SAMPLES_MANIFEST = "manifest.json"
SAMPLE_CHUNK_BATCHES = 8  # sampling.batch_size batches per chunk: the unit of sharding and resume
logger = logging.getLogger(__name__)


def schedule_steps(params: Params) -> int:
    """Steps of the adversarial training schedule."""
    config = params.adversarial
    return config.schedule_steps or config.inference_steps


def adversarial_steps(params: Params) -> tuple[int, int, int]:
    """(T_a, min and max gradient step) of the adversarial stage, resolved and checked."""
    config = params.adversarial
    steps = schedule_steps(params)
    start = steps - 1 if config.start_step is None else config.start_step
    max_step = start if config.max_step is None else config.max_step
    if start >= steps:
        raise ValueError(
            f"adversarial.start_step ({start}) must be below the schedule's {steps} steps "
            "(adversarial.schedule_steps, else adversarial.inference_steps)"
        )
    if config.start_latents == "noise" and start != steps - 1:
        raise ValueError(
            f"adversarial.start_latents 'noise' starts at the schedule's noisiest step "
            f"({steps - 1}), not adversarial.start_step ({start})"
        )
    if max_step > start:
        raise ValueError(
            f"adversarial.max_step ({max_step}) must not exceed adversarial.start_step ({start})"
        )
    if config.min_step > max_step:
        raise ValueError(
            f"adversarial.min_step ({config.min_step}) must not exceed the largest gradient step "
            f"({max_step}: adversarial.max_step, else adversarial.start_step)"
        )
    return start, config.min_step, max_step


def double_backward_attention(enabled: bool) -> contextlib.AbstractContextManager:
    """The math attention kernel, the one whose backward can itself be differentiated (R1)."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


PATCH_HEAD_FILE = "patch_head.safetensors"


def check_dimension(dimension: str, dimensions: Sequence[str] | None) -> None:
    """A discriminator scores its one dimension; asking it for others is an error."""
    if dimensions is not None and list(dimensions) != [dimension]:
        raise ValueError(f"the discriminator scores {dimension!r} only, not {dimensions}")


def save_with_heads(
    directory: str | Path,
    inner: nn.Module,
    heads: nn.Module,
    file_name: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """`inner.save` and `heads`' weights in `file_name`, replacing `directory` as a whole, so
    that an interrupted export leaves no discriminator without its heads."""
    from safetensors.torch import save_file

    from unifl.io import atomic_directory

    weights = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in heads.state_dict().items()
    }
    with atomic_directory(directory) as tmp:
        inner.save(tmp)
        save_file(weights, str(tmp / file_name), metadata={"format": "pt", **(metadata or {})})


class PatchDiscriminator(nn.Module):
    """r_a with a second head that scores every patch token of the image encoder.

    The reward model's head sees the pooled image embedding, one vector for the
    whole image: a stray fragment beside the objects barely moves it. This adds
    a head of the same shape that scores each patch token (layer-normed and
    projected as the pooled token is, fused with the caption's embedding as
    `[p, t, p * t]`), and adds the mean of those logits to the reward head's:
    the patch-level judgement of PatchGAN and of ADD's token heads, on the
    reward model's own backbone. The patch head's last layer starts at zero, so
    at step 0 r_a is the reward model's score.

    Called as the reward model is (`images`, `prompts`, `dimensions`), it
    returns `{dimension: logits[N]}`; `save` writes the reward model's directory
    (`DecoupledRewardModel.load` reads it: the pooled part) plus the patch head.
    """

    def __init__(self, reward_model: DecoupledRewardModel, dimension: str) -> None:
        super().__init__()
        self.reward_model = reward_model
        self.dimension = dimension
        projection_dim = int(reward_model.backbone.config.projection_dim)
        self.patch_head = RewardHead(3 * projection_dim, reward_model.head_hidden_dim)
        last = self.patch_head[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.patch_head.to(device=reward_model.device, dtype=reward_model.dtype)

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str],
        dimensions: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        check_dimension(self.dimension, dimensions)
        model = self.reward_model
        backbone = model.backbone
        vision = backbone.vision_model(pixel_values=model.preprocess(images))
        tokens = model.tokenize(prompts)
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        pooled = backbone.visual_projection(vision.pooler_output)
        score = model.score_embeddings(pooled, text, [self.dimension])[self.dimension]
        patches = backbone.visual_projection(
            backbone.vision_model.post_layernorm(vision.last_hidden_state[:, 1:])
        )
        fused = fuse_features(patches, text[:, None].expand(-1, patches.shape[1], -1))
        return {self.dimension: score + self.patch_head(fused).squeeze(-1).mean(1)}

    def save(self, directory: str | Path) -> None:
        """The reward model's files and the patch head, replacing `directory` as a whole."""
        save_with_heads(directory, self.reward_model, self.patch_head, PATCH_HEAD_FILE)


FEATURE_HEADS_FILE = "unet_feature_heads.safetensors"


Draws = dict[str, Tensor]
"""`timesteps` (CPU, one per row) and `noise` (like the latents) that re-noise latents for the
UNet-feature discriminator."""


class _FeaturesTaken(Exception):
    """Raised by the mid block's hook: the UNet's up path is not needed for the features."""


class FeatureHead(nn.Module):
    """Scores every position of a feature map, conditioned on the caption.

    `h = SiLU(conv1x1(f))`; the logit at a position is `w . h + b` plus, as in a
    projection discriminator (and ADD's heads), `h . P t` with `t` the caption's
    embedding: the head can judge whether what is at a position fits the
    caption, not only whether it looks real. Both output layers start at zero.
    Returns the mean logit over positions, one per row.
    """

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        hidden = max(16, channels // 4)
        self.hidden = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.SiLU())
        self.out = nn.Conv2d(hidden, 1, 1)
        self.text = nn.Linear(text_dim, hidden)
        for layer in (self.out, self.text):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor, text: Tensor) -> Tensor:
        hidden = self.hidden(features)
        logits = self.out(hidden).squeeze(1) + torch.einsum("nchw,nc->nhw", hidden, self.text(text))
        return logits.flatten(1).mean(1)


class UNetFeatureDiscriminator(nn.Module):
    """r_a plus heads on the features of the starting model's UNet, frozen.

    A CLIP image encoder reads which colours and roughly which shapes are in an
    image; small stray fragments beside the objects barely move its embedding.
    The diffusion model's own UNet represents every region of the latent at
    several resolutions, conditioned on the caption: LADD (SD3-Turbo's
    distillation) builds its discriminator from those features of the frozen
    teacher. Here the latents of the real and the generated images are noised
    to a timestep drawn uniformly from `[0, max_timestep]` (each row its own),
    the frozen UNet is run with the caption's embedding down to its mid block,
    and a 1x1-convolution head scores every position of each down block's
    last feature map before downsampling and of the mid block's output. The
    mean over positions and levels is added to the inner discriminator's logit
    (the reward head, or a `PatchDiscriminator`). Each head is conditioned on
    the caption (`FeatureHead`). The heads' output layers start at zero, so at
    step 0 r_a is the reward model's score, as the paper has it.

    Under LoRA (`share_unet`, the adversarial trainer's choice when
    `trainer.use_lora`) the features come from the model's own UNet with its
    adapter switched off for the call: its frozen weights are the starting
    model's, so no copy is needed. Otherwise (full fine-tuning changes those
    weights) the frozen UNet is a copy taken before training, in eval mode,
    which the adversarial trainer holds in the compute dtype (bf16: for SDXL a
    second UNet of about 5 GB). Only the inner discriminator and the heads
    train, in fp32. A step runs the UNet down to the mid block three times
    (real and generated latents for the discriminator, generated ones for the
    generator), the up path being skipped. Called with
    `latents` (scaled, as the UNet sees them) and `embeds` (`encode_prompt`)
    besides the images; `draws` gives the timesteps and the noise, else
    `generator` draws them (a fixed seed when none is given, so that scoring is
    repeatable). The trainer draws them for its whole global micro-batch, so
    that any number of processes re-noises each sample alike.
    """

    def __init__(
        self,
        inner: nn.Module,
        dimension: str,
        model: BaseModel,
        max_timestep: int,
        share_unet: bool = False,
    ) -> None:
        super().__init__()
        limit = int(model.scheduler.config.num_train_timesteps)
        if not 0 <= max_timestep < limit:
            raise ValueError(
                f"adversarial.discriminator_feature_max_timestep ({max_timestep}) must be a "
                f"scheduler timestep in [0, {limit})"
            )
        self.inner = inner
        self.dimension = dimension
        self.max_timestep = max_timestep
        self.shares_unet = share_unet
        if share_unet:
            # Held in a tuple, outside the module's registry: the trainer trains, moves and
            # saves that UNet, not the discriminator.
            self._shared_unet = (model.unet,)
        else:
            self.frozen_unet = copy.deepcopy(model.unet).eval().requires_grad_(False)
        # The model's frozen parts with this UNet: what `predict_noise` reads. A plain
        # attribute, so that moving the discriminator does not move the trainer's VAE and
        # text encoders (a UNet copy is registered and moves with it).
        self._model = dataclasses.replace(model, unet=self.unet)
        self.alphas_cumprod = torch.as_tensor(
            model.scheduler.alphas_cumprod, dtype=torch.float32
        ).clone()  # host tensor: indexed by the timesteps drawn on the CPU
        self._features: list[Tensor] = []
        channels = [int(block.resnets[-1].out_channels) for block in self.unet.down_blocks]
        channels.append(int(self.unet.config.block_out_channels[-1]))
        text_dim = int(model.unet.config.cross_attention_dim)
        self.heads = nn.ModuleList(FeatureHead(c, text_dim) for c in channels)

    @property
    def unet(self) -> nn.Module:
        """The UNet the features come from: the frozen copy, or the model's own (shared)."""
        return self._shared_unet[0] if self.shares_unet else self.frozen_unet

    def _take_down(self, block: nn.Module, _inputs: Any, output: Any) -> None:
        _hidden, states = output
        # The block's last feature map before its downsampler, at the block's own resolution.
        self._features.append(states[-2] if getattr(block, "downsamplers", None) else states[-1])

    def _take_mid(self, _block: nn.Module, _inputs: Any, output: Any) -> None:
        self._features.append(output)
        raise _FeaturesTaken

    @contextlib.contextmanager
    def _starting_unet(self) -> Any:
        """The UNet as the starting model's, its hooks on, for one call; then as it was.

        It runs with its LoRA adapter off (the starting weights; a copy has none),
        in eval mode and without gradient checkpointing: a checkpointed block
        would recompute its forward in the backward pass with the adapter back on.
        """
        unet = self.unet
        hooks = [block.register_forward_hook(self._take_down) for block in unet.down_blocks]
        hooks.append(unet.mid_block.register_forward_hook(self._take_mid))
        adapter = bool(getattr(unet, "peft_config", None))
        checkpointing = unet.is_gradient_checkpointing
        training = unet.training
        if adapter:
            unet.disable_adapters()
        if checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
        try:
            yield
        finally:
            unet.train(training)
            if checkpointing:
                unet.enable_gradient_checkpointing()
            if adapter:
                unet.enable_adapters()
            for hook in hooks:
                hook.remove()

    def requires_grad_(self, requires_grad: bool = True) -> UNetFeatureDiscriminator:
        super().requires_grad_(requires_grad)
        if not self.shares_unet:
            self.frozen_unet.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> UNetFeatureDiscriminator:
        super().train(mode)
        if not self.shares_unet:
            self.frozen_unet.eval()
        return self

    def draw(self, latent_shape: Sequence[int], generator: torch.Generator | None) -> Draws:
        """Timesteps and noise to re-noise latents of `latent_shape` with."""
        # Drawn on the CPU, as the trainer draws its noise: the same numbers on any device.
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        rows = latent_shape[0]
        steps = torch.randint(0, self.max_timestep + 1, (rows,), generator=generator)
        return {"timesteps": steps, "noise": torch.randn(tuple(latent_shape), generator=generator)}

    def features(
        self,
        latents: Tensor,
        embeds: Any,
        generator: torch.Generator | None,
        draws: Draws | None = None,
    ) -> list[Tensor]:
        """The frozen UNet's feature maps of `latents` noised to random timesteps (`draws`, by
        default drawn from `generator`)."""
        draws = draws or self.draw(latents.shape, generator)
        steps, noise = draws["timesteps"], draws["noise"]
        alpha = self.alphas_cumprod[steps].view(-1, 1, 1, 1).to(latents)
        noisy = noise_latents(latents, noise.to(latents), alpha)
        self._features = []
        with self._starting_unet(), contextlib.suppress(_FeaturesTaken):
            predict_noise(self._model, noisy, steps, embeds)
        features, self._features = self._features, []
        if len(features) != len(self.heads):
            raise RuntimeError(
                f"the UNet gave {len(features)} feature maps for {len(self.heads)} heads"
            )
        return features

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str],
        dimensions: Sequence[str] | None = None,
        *,
        latents: Tensor,
        embeds: Any,
        generator: torch.Generator | None = None,
        draws: Draws | None = None,
    ) -> dict[str, Tensor]:
        check_dimension(self.dimension, dimensions)
        score = self.inner(images, prompts=prompts, dimensions=[self.dimension])[self.dimension]
        features = self.features(latents, embeds, generator, draws)
        # The caption's embedding for the heads: the mean of the UNet's text conditioning
        # over the tokens (SD1.5 has no pooled embedding).
        text = embeds.prompt_embeds.float().mean(1)
        levels = [head(f.float(), text) for head, f in zip(self.heads, features, strict=True)]
        return {self.dimension: score + torch.stack(levels).mean(0).to(score.dtype)}

    def save(self, directory: str | Path) -> None:
        """The inner discriminator's files and the feature heads, replacing `directory`."""
        metadata = {"max_timestep": str(self.max_timestep)}
        save_with_heads(directory, self.inner, self.heads, FEATURE_HEADS_FILE, metadata)


def make_discriminator(
    reward_model: DecoupledRewardModel,
    dimension: str,
    patches: bool = False,
    feature_model: BaseModel | None = None,
    feature_max_timestep: int = 500,
    seed: int = 0,
    share_unet: bool = False,
) -> nn.Module:
    """A trainable copy of the reward model's backbone and `dimension` head (paper: detail);
    with `patches`, wrapped in a `PatchDiscriminator`; with `feature_model`, in a
    `UNetFeatureDiscriminator` on a frozen copy of that model's UNet, or with
    `share_unet` on that UNet itself, read with its LoRA adapter off.

    The new heads' weights are drawn from `seed`, not from whatever the process's random
    state holds, so that a stage run gives the same discriminator in any process."""
    if dimension not in reward_model.dimensions:
        raise ValueError(
            f"adversarial.discriminator_dimension {dimension!r}: the reward model has no such head "
            f"(it has {list(reward_model.dimensions)})"
        )
    discriminator = reward_model.select_dimensions([dimension])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if patches:
            discriminator = PatchDiscriminator(discriminator, dimension)
        if feature_model is not None:
            discriminator = UNetFeatureDiscriminator(
                discriminator, dimension, feature_model, feature_max_timestep, share_unet
            )
    discriminator.requires_grad_(True)
    return discriminator


class ModelSamples(torch.utils.data.Dataset):
    """Images sampled from a model, PNG files in a directory, with their captions: real
    images for `r_a`, read through an `ImageStore` as training asks for them.

    Items are dicts with `image` (float [3, H, W] in [0, 1]) and `caption`, as
    the real data set's, without label maps.
    """

    def __init__(self, directory: str | Path, captions: Sequence[str]) -> None:
        from unifl.feedback.images import ImageStore

        self.store = ImageStore(directory)
        self.captions = list(captions)

    @staticmethod
    def file_name(index: int) -> str:
        return f"{index:06d}.png"

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from unifl.feedback.images import to_unit_float

        image = to_unit_float(self.store.get(self.file_name(index)))
        return {"image": image, "caption": self.captions[index]}


@torch.no_grad()
def starting_model_samples(
    model: BaseModel,
    data: Any,
    count: int,
    params: Params,
    directory: str | Path,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    wait: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> ModelSamples:
    """The starting model's own samples of `count` of `data`'s captions (drawn by seed);
    `data` is a `ToyDataset` (its captions are read without decoding its images).

    They are made with the full sampler (`sampling.steps`, guidance and spacing),
    the images few-step inference should match: LADD trains its discriminator on
    the teacher's samples instead of real images. Here the teacher is the model
    the stage starts from, so "real" carries what the earlier stages taught it
    (decoupled FL's aesthetics) rather than the real images' look. Call before
    the model is changed (a LoRA adapter at its zero start changes nothing).

    The samples are written to `directory` as PNG files, in chunks of
    `SAMPLE_CHUNK_BATCHES` sampler batches, after a manifest of the captions,
    the sampler's settings and the model. A resumed run whose manifest matches
    reads back every chunk whose files are all there and samples the others, so
    a run stopped while sampling loses at most a chunk; another manifest starts
    the directory afresh. With several processes each samples every
    `num_processes`-th chunk; `wait` is their barrier. Each image's noise
    depends on its index only, so the samples are the same for any number of
    processes and for any chunks sampled again.
    """
    from unifl.feedback.images import save_image
    from unifl.feedback.trainer import derive_seed
    from unifl.io import write_json
    from unifl.models.sampler import generate

    sampling, seed = params.sampling, int(params.project.seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    captions = [data.caption(int(i)) for i in order[: min(count, len(data))]]
    manifest = {
        "model": str(model.source),
        "steps": sampling.steps,
        "guidance_scale": sampling.guidance_scale,
        "timestep_spacing": sampling.timestep_spacing,
        "seed": seed,
        "captions": captions,
    }
    directory = Path(directory)
    manifest_path = directory / REAL_SAMPLES_MANIFEST
    if process_index == 0 and not (
        manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest
    ):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        # Written first: a run stopped while sampling keeps the chunks it finished.
        write_json(manifest_path, manifest)
    wait()
    chunk = sampling.batch_size * SAMPLE_CHUNK_BATCHES
    mine = list(range(0, len(captions), chunk))[process_index::num_processes]
    starts = [
        first
        for first in mine
        if not all(
            (directory / ModelSamples.file_name(index)).is_file()
            for index in range(first, min(first + chunk, len(captions)))
        )
    ]
    started = time.perf_counter()
    for first in tqdm(
        starts,
        desc=f"adversarial: sampling real images in chunks of {chunk}",
        disable=not progress or not starts,
    ):
        images = generate(
            model,
            captions[first : first + chunk],
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            seed=derive_seed(seed, 0xAD5),
            timestep_spacing=sampling.timestep_spacing,
            batch_size=sampling.batch_size,
            first_index=first,
        )
        for offset, image in enumerate(images):  # each file written whole (atomic)
            save_image(image, directory / ModelSamples.file_name(first + offset))
    logger.info(
        "adversarial: %d of this process's %d chunks of real images sampled at %d steps in "
        "%.1f s, the others read back; %d images in %s",
        len(starts),
        len(mine),
        sampling.steps,
        time.perf_counter() - started,
        len(captions),
        directory,
    )
    wait()
    return ModelSamples(directory, captions)


@torch.no_grad()
def aesthetic_subset(
    data: Any,
    reward_model: DecoupledRewardModel,
    weights: dict[str, float],
    quantile: float,
    batch_size: int = 64,
) -> torch.utils.data.Subset:
    """The real images whose aesthetic score is at or above `quantile` of the data's.

    The score is the `weights`-weighted mean of the reward model's rewards (with
    each image's own caption), each dimension standardised over the data, so
    that no dimension counts by its scale. The paper trains this stage on
    high-aesthetic real images (LAION aesthetic > 5): a discriminator that
    learns "real" from images below the preferences pulls the generator back
    from them (in the toy world the top half did not keep decoupled FL's colour:
    docs/toy-world-results.md).
    """
    count = len(data)
    rewards: dict[str, list[Tensor]] = {dim: [] for dim in weights}
    for start in range(0, count, batch_size):
        batch = collate_images([data[i] for i in range(start, min(start + batch_size, count))])
        scores = reward_model(
            batch.images.to(reward_model.device, reward_model.dtype),
            prompts=batch.captions,
            dimensions=list(weights),
        )
        for dim in weights:
            rewards[dim].append(scores[dim].float().cpu())
    total = sum(weights.values())
    score = torch.zeros(count)
    for dim, weight in weights.items():
        values = torch.cat(rewards[dim])
        score += weight / total * (values - values.mean()) / values.std().clamp_min(1e-8)
    keep = torch.nonzero(score >= torch.quantile(score, quantile)).flatten().tolist()
    logger.info(
        "adversarial: %d of %d real images at or above aesthetic quantile %.2f",
        len(keep),
        count,
        quantile,
    )
    return torch.utils.data.Subset(data, keep)


class AdversarialTrainer(FeedbackTrainer):
    """Adversarial feedback learning (stage 2); see the module docstring.

    Args:
        model: the base model to tune (modified in place, see `FeedbackTrainer`).
        data: real images with captions (map-style data set of dicts, e.g. `ToyDataset`).
        reward_model: the decoupled reward model: frozen for `L_aes`, and the
            initialisation of the discriminator.
        params: the configuration (`trainer`, `adversarial`, `decoupled`, `project`).
        out_dir: checkpoints, model, discriminator and history.
    """

    stage_name = "adversarial"

    def __init__(
        self,
        model: BaseModel,
        data: Any,
        reward_model: DecoupledRewardModel,
        params: Params,
        out_dir: str | Path,
        *,
        metrics_callback: MetricsCallback | None = None,
        progress: bool = True,
    ) -> None:
        config = params.adversarial
        self.start_step, self.min_step, self.max_step = adversarial_steps(params)
        check_image_data(data, model, "adversarial data")
        discriminator = make_discriminator(
            reward_model,
            config.discriminator_dimension,
            config.discriminator_patches,
            feature_model=model if config.discriminator_unet_features else None,
            feature_max_timestep=config.discriminator_feature_max_timestep,
            seed=params.project.seed,
            # Under LoRA the model's UNet with its adapter off is the starting UNet: no copy.
            share_unet=params.trainer.use_lora,
        )
        super().__init__(
            model,
            params,
            out_dir,
            steps=config.steps,
            learning_rate=config.learning_rate,
            num_items=len(data),
            timestep_spacing=config.timestep_spacing,
            schedule_steps=schedule_steps(params),
            metrics_callback=metrics_callback,
            progress=progress,
        )
        self.reward_model = self.frozen(reward_model)
        self.discriminator = self.add_trainable(
            "discriminator", discriminator, config.discriminator_learning_rate
        )
        if isinstance(discriminator, UNetFeatureDiscriminator) and not discriminator.shares_unet:
            # Only read, never trained: the compute dtype, as the model's frozen UNet under LoRA.
            move_module(discriminator.unet, self.device, self.compute_dtype)
        # Another run's checkpoints in `out_dir` fail here, before the samples are drawn.
        self.checkpoint_to_resume()
        if config.real_images == "samples":
            data = starting_model_samples(
                self.model,
                data,
                config.real_sample_count,
                params,
                self.out_dir / REAL_SAMPLES_DIR,
                process_index=self.process_index,
                num_processes=self.accelerator.num_processes,
                wait=self.accelerator.wait_for_everyone,
                progress=progress and self.accelerator.is_main_process,
            )
        if config.real_aesthetic_quantile > 0:
            data = aesthetic_subset(
                data,
                self.reward_model,
                resolve_aesthetic_weights(params.decoupled.weights, reward_model),
                config.real_aesthetic_quantile,
            )
        self.data_set = data
        self.stream_items(len(data))
        self.dimension = config.discriminator_dimension
        # A UNet-feature discriminator also takes the latents and the UNet's text conditioning.
        self.reads_latents = config.discriminator_unet_features
        self.weights: dict[str, float] = {}
        if config.aesthetic_weight > 0:
            self.weights = resolve_aesthetic_weights(params.decoupled.weights, reward_model)

    def batch(self, micro_batch: int) -> ImageBatch:
        return collate_images([self.data_set[i] for i in self.data.indices(micro_batch)])

    def _scores_without_parameter_gradients(
        self, images: Tensor, prompts: list[str], inputs: dict[str, Any] | None = None
    ) -> Tensor:
        """r_a(images, c) with the discriminator's parameters detached (the generator's view)."""
        from torch.func import functional_call

        detached = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        scores = functional_call(
            self.discriminator,
            detached,
            (images,),
            {"prompts": prompts, "dimensions": [self.dimension], **(inputs or {})},
        )
        return scores[self.dimension]

    def feature_draws(
        self, parts: int, latent_shape: Sequence[int], generator: torch.Generator
    ) -> Draws:
        """The UNet-feature discriminator's timesteps and noise for `parts` stacked groups of
        this process's latents of `latent_shape` (real, then generated).

        Drawn for the whole global micro-batch, as `UNetFeatureDiscriminator.draw`
        draws them for one process holding all of it; each process keeps its rows
        of every group.
        """
        processes = self.accelerator.num_processes
        shape = (parts * latent_shape[0] * processes, *latent_shape[1:])
        drawn = self.discriminator.draw(shape, generator)
        return {
            name: torch.cat([self.local_rows(group) for group in value.chunk(parts)])
            for name, value in drawn.items()
        }

    def compute_loss(self, batch: ImageBatch, generator: torch.Generator) -> StepOutput:
        config = self.params.adversarial
        real = batch.images.to(self.device)
        latents = self.encode(real)
        embeds, uncond = self.prompt_embeds(batch.captions)
        grad_step = sample_step(self.min_step, self.max_step, generator)
        noise = self.randn(latents.shape, generator)
        if config.start_latents == "noise":
            noisy = noise
        else:
            noisy = noise_latents(latents, noise, self.schedule.alpha(self.start_step))
        sample = self.feedback(noisy, self.start_step, grad_step, embeds, uncond)
        fake = self.decode(sample.x0_latents)

        fake_inputs: dict[str, Any] = {}
        if self.reads_latents:
            fake_inputs = {
                "latents": sample.x0_latents,
                "embeds": embeds,
                "draws": self.feature_draws(1, latents.shape, generator),
            }
        fake_scores = self._scores_without_parameter_gradients(fake, batch.captions, fake_inputs)
        generator_loss = generator_adversarial_loss(fake_scores)
        loss = config.adversarial_weight * generator_loss
        logs: dict[str, float] = {"g_loss": float(generator_loss.detach())}
        if self.weights:
            loss = add_aesthetic_term(
                loss,
                logs,
                self.reward_model,
                fake,
                batch.captions,
                self.weights,
                self.params.decoupled.grad_scale,
                config.aesthetic_weight,
            )

        prepared = self.group("discriminator").prepared
        penalised = config.r1_weight > 0
        real = real.to(fake.dtype).requires_grad_(penalised)
        both = torch.cat([real, fake.detach()])
        penalised_inputs = [real]  # R1 differentiates the real logits with respect to these
        inputs: dict[str, Any] = {}
        if self.reads_latents:
            real_latents = latents.detach().requires_grad_(penalised)
            penalised_inputs.append(real_latents)
            fake_latents = sample.x0_latents.detach().to(real_latents.dtype)
            inputs = {
                "latents": torch.cat([real_latents, fake_latents]),
                "embeds": PromptEmbeds.cat([embeds, embeds]),
                "draws": self.feature_draws(2, latents.shape, generator),
            }
        with double_backward_attention(penalised):
            logits = prepared(
                both, prompts=batch.captions * 2, dimensions=[self.dimension], **inputs
            )
        real_logits, fake_logits = logits[self.dimension].chunk(2)
        d_loss = discriminator_loss(real_logits, fake_logits)
        if penalised:
            grads = torch.autograd.grad(real_logits.sum(), penalised_inputs, create_graph=True)
            r1 = sum(g.float().pow(2).flatten(1).sum(1).mean() for g in grads)
            d_loss = d_loss + 0.5 * config.r1_weight * r1
            logs["r1"] = float(r1.detach())
        loss = loss + d_loss
        accuracy = torch.cat([real_logits > 0, fake_logits < 0]).float().mean()
        logs.update(
            {
                "d_loss": float(d_loss.detach()),
                "d_real": float(real_logits.detach().float().mean()),
                "d_fake": float(fake_logits.detach().float().mean()),
                "d_accuracy": float(accuracy),
            }
        )
        loss = self.add_noise_regulariser(loss, logs, latents, embeds, generator)
        logs.update({"t": grad_step, "timestep": sample.timestep})
        return StepOutput(loss, logs)

    def export(self, keep_model: bool = False) -> ExportedModel:
        """The model and LoRA as every stage writes them, plus `out_dir/discriminator`."""
        exported = super().export(keep_model)
        directory = self.out_dir / DISCRIMINATOR_DIR
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.group("discriminator").prepared).save(directory)
        self.accelerator.wait_for_everyone()
        exported.extra["discriminator"] = directory
        return exported

    @torch.no_grad()
    def few_step_check(self, model: BaseModel, prompts: Sequence[str]) -> dict[str, float]:
        """Rewards and discriminator scores of `model`'s samples at few and at all steps.

        Few-step samples use trailing DDIM at `adversarial.inference_steps`; the
        full schedule uses `sampling.timestep_spacing`. Same prompts and seed.
        """
        from unifl.models.sampler import generate

        config = self.params.adversarial
        prompts = list(prompts)
        if not prompts:
            return {}
        runs = {
            config.inference_steps: "trailing",
            self.config.num_inference_steps: self.params.sampling.timestep_spacing,
        }
        metrics: dict[str, float] = {}
        discriminator = self.accelerator.unwrap_model(self.group("discriminator").prepared)
        for steps, spacing in runs.items():
            images = generate(
                model,
                prompts,
                steps=steps,
                guidance_scale=self.params.sampling.guidance_scale,
                seed=self.seed,
                timestep_spacing=spacing,
                batch_size=self.config.batch_size,
            ).to(self.device)
            rewards = self.reward_model(images, prompts=prompts)
            for dim, values in rewards.items():
                metrics[f"reward_{dim}_{steps}steps"] = float(values.float().mean())
            inputs = {}
            if self.reads_latents:
                inputs = {
                    "latents": self.encode(images),
                    "embeds": encode_prompt(self.model, prompts),
                }
            scores = discriminator(images, prompts=prompts, dimensions=[self.dimension], **inputs)
            metrics[f"discriminator_{steps}steps"] = float(scores[self.dimension].float().mean())
        return metrics
