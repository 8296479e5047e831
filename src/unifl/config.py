"""Typed configuration for every stage, loaded from one `params.yaml`.

`params.yaml` is grouped per stage (as DVC expects); each group is a pydantic
model below whose fields carry their default and a description. Defaults come
from the UniFL paper where it gives one (see the field descriptions).

Loading order: the model defaults, then `params.yaml` (or another file), then
an optional preset (a partial YAML file, e.g. the tiny `ci` preset), then
command-line overrides `stage.key=value`. An unknown key or a value of the
wrong type is a `ConfigError` naming the key and the file it came from.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DIMENSIONS: tuple[str, ...] = ("color", "layout", "detail", "lighting")
"""The aesthetic dimensions of decoupled feedback learning, in a fixed order."""


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names key and source."""


class Section(BaseModel):
    """Base of every stage section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProjectConfig(Section):
    seed: int = Field(0, description="Global seed; every stage derives its own seeds from it.")
    work_dir: str = Field("runs", description="Directory under which stages write outputs.")
    device: str = Field(
        "auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Compute dtype on GPU; CPU always runs fp32."
    )
    vae_fp32: bool = Field(
        True, description="Keep the VAE in fp32 under mixed precision (SDXL's fp16 VAE gives NaNs)."
    )
    num_threads: int | None = Field(
        1,
        ge=1,
        description="torch CPU threads of each process (a pipeline step, a stage command, the "
        "bootstrap). The toy models are so small that one thread beats two: on 2 cores a "
        "feedback step runs 1.6-2.6x and a toy UNet training step 1.6x faster on one. "
        "null: torch's default (one per core), for full-size models on CPU.",
    )


class ToyConfig(Section):
    resolution: Literal[32, 64] = Field(32, description="Side of the toy images in pixels.")
    min_objects: int = Field(1, ge=1, description="Fewest objects in a toy scene.")
    max_objects: int = Field(3, ge=1, le=3, description="Most objects in a toy scene.")
    num_train: int = Field(
        4000, ge=1, description="Toy training images (VAE, base model, segmenter)."
    )
    num_eval: int = Field(256, ge=1, description="Held-out toy images for evaluation.")
    seed: int = Field(1234, description="Seed of the toy data generator.")


class BootstrapConfig(Section):
    family: Literal["sd15", "sdxl"] = Field("sd15", description="Family of the toy base model.")
    cache_dir: str = Field(
        ".cache/unifl/toy", description="Bootstrap outputs are cached here by config hash."
    )
    latent_channels: int = Field(
        4,
        ge=1,
        description="Channels of the toy VAE's latents, and so of the UNet's input and output "
        "(SD1.5 and SDXL: 4). At 8 the base model sampled far worse in the bootstrap's UNet "
        "steps (docs/toy-world-results.md, Eight latent channels).",
    )
    unet_layout: Literal["compact"] | None = Field(
        None,
        description="Block layout of the toy-sd15 UNet. None: SD1.5's pattern, cross-attention "
        "in the 8x8 and 4x4 blocks and the mid block, with 1x1 convolutions as the transformers' "
        "projections. 'compact': cross-attention in the 4x4 block and the mid block only, "
        "through linear projections (SDXL's), the classes and channels unchanged: a training "
        "step about 1.6 times as fast (benchmarks/unet_layout.py) and a bootstrap within 8 minutes on "
        "2 cores that samples about as well, but the feedback stages' LoRA, on the attention "
        "projections, has none at 8x8, and on it decoupled FL drifts past the toy table's "
        "Fréchet bound on the bootstraps of seeds 0 and 1 (the default layout stays within it "
        "on seeds 0-2; docs/toy-world-results.md, The compact UNet layout). toy-sdxl has SDXL's "
        "layout, which has no attention at 8x8 already.",
    )
    vae_steps: int = Field(600, ge=0, description="Training steps of the toy VAE.")
    vae_learning_rate: float = Field(
        5e-3,
        gt=0,
        description="AdamW learning rate of the toy VAE (cosine decay after 100 warm-up steps). "
        "Its reconstructions cap what the base model can show (the VAE row of "
        "benchmarks/toy_bootstrap.py).",
    )
    vae_decoder_steps: int = Field(
        800,
        ge=0,
        description="Steps that train the toy VAE's decoder alone after the VAE, its encoder "
        "frozen, as SD's VAE decoder was fine-tuned after its first training: the latents, and "
        "so the UNet's training, stay as they are and the decoder draws their shapes sharper "
        "(benchmarks/toy_bootstrap.py --baseline bootstrap.vae_decoder_steps=N measures the "
        "base model with N steps instead, paired by seed). 0: none.",
    )
    vae_decoder_learning_rate: float = Field(
        1e-3,
        gt=0,
        description="AdamW learning rate of the decoder-only steps (cosine decay after 50 "
        "warm-up steps).",
    )
    unet_steps: int = Field(4000, ge=0, description="Training steps of the toy UNet.")
    unet_batch_size: int = Field(
        32,
        ge=1,
        description="Batch size of the toy UNet. A batch of at least 32 trains data-parallel, "
        "one process per free core with at least 16 samples each.",
    )
    unet_learning_rate: float = Field(
        3e-3,
        gt=0,
        description="AdamW learning rate of the toy UNet and text encoder(s) (cosine decay "
        "after 200 warm-up steps). At batch 32 x 4000 steps 3e-3 samples better than 2e-3 and "
        "4e-3 (benchmarks/toy_bootstrap.py --set bootstrap.unet_learning_rate=...).",
    )
    text_encoder_learning_rate: float | None = Field(
        None,
        gt=0,
        description="AdamW learning rate of the toy text encoder(s) while the UNet trains, on "
        "the same schedule; None: unet_learning_rate. On seed 1, 1e-3 and 1e-2 sampled worse "
        "than the UNet's 3e-3 (benchmarks/toy_bootstrap.py --set "
        "bootstrap.text_encoder_learning_rate=...).",
    )
    unet_ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Exponential moving average of the toy UNet's and text encoder(s)' weights, "
        "its decay ramped as min(decay, (1 + n) / (10 + n)) after n steps, as trainer.ema_decay "
        "does; the average becomes the base model and the manifest also records the last "
        "weights' caption-match. None: the last weights.",
    )
    segmenter_steps: int = Field(400, ge=0, description="Training steps of the toy segmenter.")
    clip_steps: int = Field(
        600,
        ge=0,
        description="Contrastive pretraining steps of the toy CLIP, the backbone that "
        "`reward.backbone: toy` puts the reward heads on, as production puts them on a "
        "pretrained CLIP (unifl.toy.clip). 0: no pretraining, the reward models start from a "
        "random toy CLIP.",
    )
    text_encoder: Literal["scratch", "clip"] = Field(
        "clip",
        description="Where the toy base model's text encoder(s) start before training with the "
        "UNet: 'clip' (the text tower of the bootstrap's pretrained toy CLIP, as SD's text "
        "encoder is a pretrained CLIP's; for SDXL both encoders, the second with the CLIP's "
        "text projection) or 'scratch' (random). 'clip' needs clip_steps > 0, so "
        "clip_steps 0 goes with 'scratch' (benchmarks/bootstrap_vae.py --variant "
        "bootstrap.text_encoder=scratch compares the two).",
    )
    clip_batch_size: int = Field(
        128, ge=2, description="Image-caption pairs per contrastive batch of the toy CLIP."
    )
    clip_learning_rate: float = Field(
        2e-3,
        gt=0,
        description="AdamW learning rate of the toy CLIP (warm-up, then cosine decay to 5%).",
    )
    batch_size: int = Field(32, ge=1, description="Batch size of the toy VAE and segmenter.")
    vae_kl_weight: float = Field(
        1e-6,
        ge=0,
        description="Weight of the toy VAE's KL term (per latent element); SD's VAE uses 1e-6. "
        "At 1e-3 the posterior noise blurred the reconstructed shapes (see the VAE row of "
        "benchmarks/toy_bootstrap.py).",
    )
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of captions replaced by '' so CFG works."
    )
    input_perturbation: float | None = Field(
        None,
        gt=0,
        description="Input perturbation gamma of the toy UNet's training (Ning et al. 2023, "
        "diffusers' text-to-image script: 0.1): the noisy latents are built from noise + "
        "gamma * extra noise while the target stays the noise, so training sees inputs as off "
        "as the sampler's own; none: off. At 0.1 the toy base model sampled as well as without "
        "it, within the training seeds' noise (docs/toy-world-results.md, Input perturbation).",
    )
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        "logit_normal",
        description="How the toy UNet's training timesteps are drawn from the 1000-step schedule: "
        "'uniform' (as SD was trained) or 'logit_normal', t = 1000 * sigmoid(m + s * n) with n "
        "standard normal (Esser et al. 2024, SD3), which spends the steps on the middle of the "
        "schedule, where composition and shapes are decided, and few on the nearly clean and "
        "nearly pure-noise ends.",
    )
    logit_normal_mean: float = Field(
        0.0, description="m of 'logit_normal' timestep sampling (SD3: 0)."
    )
    logit_normal_std: float = Field(
        1.0, gt=0, description="s of 'logit_normal' timestep sampling (SD3: 1)."
    )
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma weighting of the UNet's noise MSE (Hang et al. 2023): a "
        "timestep's loss weighs min(SNR, gamma) / SNR, so the nearly clean timesteps no longer "
        "dominate the gradient; none: plain MSE. Meant for 'uniform' sampling, which draws "
        "those timesteps as often as any other; with the default logit-normal draws, gamma 5 "
        "left the base model's caption-match as it was (benchmarks/toy_bootstrap.py).",
    )

    @model_validator(mode="after")
    def _compact_layout_is_sd15(self) -> BootstrapConfig:
        if self.unet_layout is not None and self.family != "sd15":
            raise ValueError(
                f"bootstrap.unet_layout {self.unet_layout!r} is a layout of the sd15 family's "
                f"toy UNet; bootstrap.family {self.family!r} has its own: leave it null"
            )
        return self

    @model_validator(mode="after")
    def _text_encoder_needs_clip(self) -> BootstrapConfig:
        if self.text_encoder == "clip" and self.clip_steps == 0:
            raise ValueError(
                "bootstrap.text_encoder 'clip' starts the text encoders from the pretrained toy "
                "CLIP, which bootstrap.clip_steps 0 does not train: set bootstrap.text_encoder "
                "to 'scratch' or clip_steps above 0"
            )
        return self


class ModelConfig(Section):
    source: str = Field(
        "toy",
        description="Base model: 'toy' (the bootstrapped toy model), a diffusers directory, "
        "or a hub id (production).",
    )
    family: Literal["auto", "sd15", "sdxl"] = Field(
        "auto", description="Model family; 'auto' reads it from the checkpoint."
    )
    revision: str | None = Field(None, description="Hub revision when `source` is a hub id.")


class SamplingConfig(Section):
    steps: int = Field(20, ge=1, description="DDIM inference steps (paper: 20).")
    guidance_scale: float = Field(7.5, ge=1.0, description="Classifier-free guidance scale.")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field(
        "leading", description="DDIM timestep spacing; 'trailing' for few-step inference."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per sampling batch.")


class CurateConfig(Section):
    min_words: int = Field(2, ge=1, description="Drop prompts with fewer words.")
    max_words: int = Field(60, ge=1, description="Drop prompts with more words.")
    max_chars: int = Field(1000, ge=1, description="Drop prompts longer than this (characters).")
    blocked_words: list[str] = Field(
        default_factory=list, description="Drop prompts with any of these words."
    )
    near_duplicate_threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Cosine similarity above which two prompts are near-duplicates.",
    )
    tau1: int = Field(
        1,
        ge=0,
        description="Semantic filter: keep prompts whose richest entity has >= tau1 "
        "attributes/relations (paper: 1).",
    )
    tau2: float = Field(
        0.8, gt=0, le=1, description="Nearest-neighbour compression cosine threshold (paper: 0.8)."
    )
    num_prompts: int = Field(
        512, ge=1, description="Prompts sampled after compression (paper: 100k)."
    )
    block_size: int = Field(4096, ge=1, description="Rows per block of the blockwise similarity.")
    active_selection: bool = Field(
        True, description="Run the semantic filter and compression; false: clean and dedupe only."
    )
    max_line_chars: int = Field(
        100_000,
        ge=1,
        description="A CSV/JSONL line longer than this is an error (a malformed file, not a prompt).",
    )
    nn_queries: int = Field(
        10_000,
        ge=1,
        description="Prompts whose nearest neighbour is searched for the similarity report "
        "(exact when the set is smaller).",
    )
    similarity_backend: Literal["torch", "faiss", "auto"] = Field(
        "torch",
        description="Nearest-neighbour search: blockwise torch, faiss, or faiss if installed.",
    )
    embed_batch_size: int = Field(256, ge=1, description="Prompts per text-encoder batch.")
    toy_prompts: int = Field(
        4096,
        ge=1,
        description="Synthetic toy-world captions curated when no prompt file is given "
        "(the embedded default).",
    )


class PairsConfig(Section):
    steps: int = Field(20, ge=1, description="Sampling steps of the pair images.")
    guidance_scale: float = Field(7.5, ge=1.0, description="CFG scale of the pair images.")
    max_prompts: int | None = Field(None, description="Use at most this many curated prompts.")


class LabelingConfig(Section):
    url: str | None = Field(
        None, description="Label Studio URL; none: simulated annotators write an export file."
    )
    token_env: str = Field(
        "LABEL_STUDIO_API_KEY", description="Environment variable holding the Label Studio token."
    )
    project_title: str = Field(
        "unifl aesthetic preferences", description="Label Studio project title."
    )
    import_batch_size: int = Field(100, ge=1, description="Tasks per import request.")
    num_annotators: int = Field(5, ge=1, description="Simulated annotators per task (paper: 4-5).")
    annotator_noise: float = Field(
        0.5,
        ge=0,
        description="Std of each simulated annotator's preference noise, in units of the "
        "dimension's RMS score gap (0.5: annotators disagree on about a quarter of votes).",
    )
    min_annotators: int = Field(1, ge=1, description="Tasks with fewer annotations are dropped.")
    token_file: str | None = Field(
        None,
        description="File with the token (a mounted Kubernetes Secret), used if the env is unset.",
    )
    request_timeout: float = Field(60.0, gt=0, description="Seconds per Label Studio API request.")
    storage: Literal["local", "s3"] = Field(
        "local", description="Image serving: 'local' (Local Files storage) or 's3' (presigned)."
    )
    document_root: str = Field(
        ".", description="The server's LOCAL_FILES_DOCUMENT_ROOT; pairs must lie under it."
    )
    s3_bucket: str | None = Field(None, description="Bucket holding the pairs (storage 's3').")
    s3_prefix: str = Field("", description="Key prefix of the pairs directory in the bucket.")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (MinIO, GCS).")
    s3_region: str | None = Field(None, description="S3 region name.")
    s3_presign: bool = Field(
        False,
        description="Redirect annotators to presigned object-store URLs (the store must be "
        "reachable from their browsers); false: Label Studio streams the images itself.",
    )
    presign_ttl_minutes: int = Field(60, ge=1, description="Lifetime of presigned image URLs.")
    tie_margin: float = Field(
        0.1,
        ge=0,
        description="Simulated annotators say Tie when |score gap + noise| <= this (in RMS-gap units).",
    )
    scorer: str = Field(
        "unifl.toy.scoring:image_scorer",
        description="module:function, a factory (params) -> scorer(paths, prompts) -> "
        "{dimension: scores}, followed by simulated annotators.",
    )
    server_dir: str = Field(
        ".cache/label-studio",
        description="Local server: its venv (installed on first use) and data.",
    )
    server_version: str = Field("1.23.2", description="label-studio release of the local server.")
    server_port: int = Field(8080, ge=1, le=65535, description="Port of `unifl labeling serve`.")


class RewardConfig(Section):
    backbone: str = Field(
        "toy",
        description="CLIP-style backbone: a CLIP checkpoint directory or hub id, or 'toy': the "
        "bootstrap's contrastively pretrained tiny CLIP (a random one when "
        "`bootstrap.clip_steps` is 0).",
    )
    epochs: int = Field(20, ge=1, description="Training epochs over the preference pairs.")
    batch_size: int = Field(32, ge=1, description="Pairs per batch.")
    learning_rate: float = Field(
        1e-3, gt=0, description="AdamW learning rate of the heads (toy default; CLIP: ~1e-4)."
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of prompts held out for validation."
    )
    alpha_override: dict[str, float] = Field(
        default_factory=lambda: {"detail": 0.0},
        description="alpha_d set by hand instead of calibrated (paper: detail works best lower).",
    )
    backbone_learning_rate: float = Field(
        1e-4,
        ge=0,
        description="AdamW learning rate of the shared CLIP backbone; 0 freezes it (heads only). "
        "A random backbone must learn (~1e-3); a pretrained one keeps what it knows at a "
        "lower rate (the toy CLIP: 1e-4; OpenAI's CLIP: ~1e-5).",
    )
    head_hidden_dim: int = Field(
        128, ge=1, description="Hidden width of each dimension's MLP head."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    tie_rule: Literal["soft", "drop"] = Field(
        "soft",
        description="Tied pairs: 'soft' (target 1/2, pulls the two rewards together) or 'drop'.",
    )
    image_cache_mib: int = Field(
        2048,
        ge=0,
        description="MiB of decoded images (uint8) kept in memory during reward training, the "
        "least recently used leaving first (a 1024 px image takes 3 MiB, a 32 px one 3 KiB); "
        "0 keeps none.",
    )


class TrainerConfig(Section):
    """Options shared by the feedback-learning stages (each stage section can override)."""

    use_lora: bool = Field(True, description="Train LoRA adapters (peft) instead of the full UNet.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="UNet module names (peft suffix match) that get LoRA adapters; the default is "
        "the attention projections, as diffusers' LoRA training scripts take. Adding the ResNet "
        "convolutions ('conv1', 'conv2', 'conv_shortcut', 'time_emb_proj', 'proj_in', 'proj_out', "
        "'ff.net.0.proj', 'ff.net.2') reaches what few-step LoRAs (LCM-LoRA) train.",
    )
    gradient_checkpointing: bool = Field(False, description="Checkpoint UNet activations.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (ImageReward: 1.0).")
    ema_decay: float | None = Field(None, description="EMA decay of trainable weights; none: off.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimiser step."
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Save a resumable checkpoint every N steps."
    )
    batch_size: int = Field(8, ge=1, description="Samples per micro-batch.")
    num_inference_steps: int = Field(20, ge=1, description="DDIM schedule length (paper: 20).")
    truncated_backprop_steps: int = Field(
        1, ge=1, description="Denoising steps with gradients (K)."
    )
    guidance_scale: float = Field(7.5, ge=1.0, description="CFG scale in the no-grad denoising.")
    mse_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the optional noise-prediction MSE regulariser on real latents "
        "(paper: 0; ImageReward advises one against over-fitting the reward); a stage's own "
        "mse_weight (decoupled) overrides it.",
    )
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; none: the rank (adapter scale 1)."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear learning-rate warm-up steps (sibling: 1000 at full scale)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_guidance_scale: float = Field(
        1.0,
        ge=1.0,
        description="CFG scale of the UNet calls with gradients; 1: conditional only (half cost).",
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="Newest checkpoints kept in out/checkpoints."
    )


PerceptualKind = Literal[
    "toy_segmenter", "semantic_segmentation", "instance_segmentation", "style_gram"
]


class PerceptualModelConfig(Section):
    """One perceptual model of PeFL and the weight of its loss (see unifl.feedback.perceptual)."""

    kind: PerceptualKind = Field(
        "toy_segmenter", description="Which perceptual loss: the model's own training loss."
    )
    model: str = Field(
        "toy",
        description="Directory or hub id of the perceptual model; 'toy': the bootstrapped toy "
        "segmenter; style_gram also takes 'torchvision:vgg16[:state_dict_path]'.",
    )
    name: str | None = Field(None, description="Name of the term in logs; none: the kind.")
    weight: float = Field(1.0, ge=0, description="Weight of this term inside L_pefl.")
    layers: list[int | str] = Field(
        default_factory=list,
        description="style_gram layers: hidden-state indices (transformers CNN) or VGG16 names "
        "(relu1_2 ...); empty: every stage / relu1_2..relu4_3.",
    )
    image_size: int | None = Field(
        None, description="Resize images to this (shortest edge) first; none: the processor's size."
    )
    ignore_index: int = Field(255, description="Mask value ignored by the segmentation loss.")
    revision: str | None = Field(None, description="Hub revision when `model` is a hub id.")


class PeflConfig(Section):
    steps: int = Field(200, ge=0, description="Optimisation steps.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    perceptual_weight: float = Field(
        0.01, ge=0, description="lambda of L_pefl (sibling paper: 0.01)."
    )
    start_step: int = Field(
        10, ge=1, description="T_a: noise real latents to this of the 20 steps (paper: 10)."
    )
    max_step: int = Field(
        5, ge=0, description="Random gradient step t in [0, max_step] (paper: 5)."
    )
    aesthetic_weight: float = Field(
        1.0, ge=0, description="Weight of L_aes in stage 1 (L1 = L_pefl + L_aes)."
    )
    perceptual: list[PerceptualModelConfig] = Field(
        default_factory=lambda: [PerceptualModelConfig()],
        description="Perceptual models whose weighted losses sum to Phi (structure, style, ...).",
    )


class DecoupledConfig(Section):
    steps: int = Field(200, ge=0, description="Optimisation steps.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weights: dict[str, float] = Field(
        default_factory=lambda: {d: 1.0 for d in DIMENSIONS},
        description="w_d per aesthetic dimension in L_aes.",
    )
    max_step: int = Field(
        9,
        ge=0,
        description="Gradient step t drawn from [0, max_step], counted from the clean end of the "
        "schedule (ImageReward: the last quarter of 40 steps; here the last half of 20).",
    )
    grad_scale: float = Field(
        1e-3,
        gt=0,
        description="Scale of L_aes in every stage (ImageReward: 1e-3); it sets L_aes against "
        "L_pefl, L_G and the MSE regulariser.",
    )
    mse_weight: float | None = Field(
        None,
        ge=0,
        description="Weight of the noise-prediction MSE regulariser in this stage; none: "
        "trainer.mse_weight. This stage alone scores samples from pure noise with nothing from "
        "the real images, so it is where a reward pulls the model away from them.",
    )


class AdversarialConfig(Section):
    steps: int = Field(600, ge=0, description="Generator steps.")
    learning_rate: float = Field(
        1e-4, gt=0, description="Generator learning rate (sibling: 2e-6 at full scale)."
    )
    discriminator_learning_rate: float = Field(
        3e-4,
        gt=0,
        description="Discriminator learning rate. On the toy world, at 1e-4 the discriminator "
        "stays near chance; at 1e-3 it overpowers the generator, which then sheds L_aes's "
        "aesthetics (one seed of three lost its 4-step lighting).",
    )
    adversarial_weight: float = Field(0.05, ge=0, description="Weight of L_G (sibling: 0.05).")
    aesthetic_weight: float = Field(1.0, ge=0, description="Weight of L_aes kept in stage 2.")
    inference_steps: int = Field(4, ge=1, description="Few-step inference target (paper: 4).")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field(
        "trailing",
        description="Spacing of the training schedule; 20 trailing steps contain every timestep "
        "of 2-, 4-, 5- and 10-step trailing inference (999, 749, 499, 249 for 4).",
    )
    schedule_steps: int | None = Field(
        None,
        ge=1,
        description="DDIM steps of the stage's training schedule; none: inference_steps, so the "
        "no-grad part follows the few-step sampler's own trajectory (paper: 20, "
        "trainer.num_inference_steps).",
    )
    start_step: int | None = Field(
        None, ge=0, description="T_a: real latents noised to this step; none: the noisiest step."
    )
    start_latents: Literal["real", "noise"] = Field(
        "real",
        description="Where the no-grad denoising starts: 'real', the real images' latents noised "
        "to T_a (paper); 'noise', pure Gaussian noise at the schedule's noisiest step, the input "
        "few-step inference starts from (the real images then feed only the discriminator).",
    )
    max_step: int | None = Field(
        None,
        ge=0,
        description="Gradient step t drawn from [0, max_step]; none: start_step (whole schedule).",
    )
    min_step: int = Field(
        0,
        ge=0,
        description="Smallest gradient step t (counted from the clean end): t is drawn from "
        "[min_step, max_step]; 0: the whole range.",
    )
    discriminator_dimension: str = Field(
        "detail", description="Reward head the discriminator starts from (paper: detail)."
    )
    discriminator_patches: bool = Field(
        False,
        description="Add to the discriminator a head that scores each patch token of its image "
        "encoder, averaged beside the reward head's logit (PatchGAN, ADD's token heads); "
        "false: the reward head alone (paper).",
    )
    real_images: Literal["data", "samples"] = Field(
        "data",
        description="What the discriminator learns as real (and the start latents are noised "
        "from): 'data', the stage's real images (paper); 'samples', the starting model's own "
        "samples with the full sampler (sampling.steps, guidance and spacing) of "
        "real_sample_count of the data's captions, made once before training, as LADD trains "
        "on its teacher's samples.",
    )
    real_sample_count: int = Field(
        2048,
        ge=1,
        description="Captions drawn (by project.seed) from the data for real_images 'samples'; "
        "the samples are written to the stage's real_samples/ in chunks of 8 sampler batches "
        "and read from there; a resumed run reads back the chunks it finished and samples the "
        "rest.",
    )
    real_aesthetic_quantile: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Keep as real images for the discriminator (and the noised start latents) "
        "only those whose aesthetic score is at or above this quantile of the data's: the mean "
        "over decoupled.weights' dimensions of the reward model's rewards, each standardised over "
        "the data (the paper: LAION aesthetic > 5). 0: every image.",
    )
    grad_guidance_scale: float | None = Field(
        None,
        ge=1.0,
        description="CFG scale of this stage's UNet call with gradients, the x0 prediction the "
        "generator and the discriminator see; 7.5: the guided prediction that few-step "
        "inference makes. null: trainer.grad_guidance_scale.",
    )
    discriminator_unet_features: bool = Field(
        False,
        description="Add to the discriminator heads on the features of the starting model's "
        "UNet, frozen (under LoRA the model's own UNet with its adapter off, else a copy), run "
        "on the real and generated latents re-noised to a random timestep (LADD's "
        "discriminator); their mean logit is added to the reward head's. false: the reward "
        "head alone (paper).",
    )
    discriminator_feature_max_timestep: int = Field(
        500,
        ge=0,
        description="Largest scheduler timestep the latents are noised to before the frozen "
        "UNet scores them (drawn uniformly from [0, this]); with discriminator_unet_features.",
    )
    r1_weight: float = Field(
        0.0,
        ge=0,
        description="gamma of the R1 penalty gamma/2 * E||grad_x r_a(x, c)||^2 on real images, "
        "which keeps the discriminator smooth around the data (ADD uses one); 0: off (paper).",
    )
    eval_prompts: int = Field(
        8,
        ge=0,
        description="Prompts sampled at inference_steps and at the full schedule at the end.",
    )


class EvaluateConfig(Section):
    num_prompts: int = Field(
        64,
        ge=1,
        description="Evaluation prompts (times `seeds`: the samples). The Frechet distance "
        "needs clearly more samples than its features have dimensions.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="Seeds per prompt."
    )
    steps: list[int] = Field(
        default_factory=lambda: [20, 4], min_length=1, description="Step counts evaluated."
    )
    guidance_scale: float = Field(7.5, ge=1.0, description="CFG scale at evaluation.")
    grid_prompts: int = Field(8, ge=1, description="Prompts shown in the sample grids.")
    timestep_spacing: Literal["auto", "leading", "trailing", "linspace"] = Field(
        "auto",
        description="DDIM spacing; 'auto': trailing at <= few_step_max steps, else leading.",
    )
    few_step_max: int = Field(
        8, ge=1, description="'auto' spacing uses trailing DDIM up to this many steps."
    )
    few_step_guidance_scale: float | None = Field(
        None,
        ge=1.0,
        description="CFG scale at step counts up to few_step_max; none: guidance_scale. In 4 "
        "trailing DDIM steps a scale of 7.5 overshoots (benchmarks/few_step_guidance.py).",
    )
    batch_size: int = Field(16, ge=1, description="Images per generation batch.")
    warmup: bool = Field(
        True, description="Run one untimed batch per step count before timing images/s."
    )
    clip_model: str | None = Field(
        None, description="CLIP directory or hub id for the CLIP score; none: no CLIP score."
    )
    feature_model: str | None = Field(
        None,
        description="Vision backbone (directory or hub id) for the Frechet features; "
        "none: the toy segmenter's features.",
    )
    frechet_eps: float = Field(
        1e-6, ge=0, description="Added to covariance diagonals (keeps small-N Frechet finite)."
    )
    max_reference_images: int = Field(
        2048, ge=2, description="Real images read for the Frechet reference statistics."
    )


class TrackingConfig(Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("unifl", description="MLflow experiment name.")
    registered_model: str = Field(
        "unifl-sd", description="Registered model of the tuned diffusion model."
    )
    reward_registered_model: str = Field(
        "unifl-reward", description="Registered model of the decoupled reward models."
    )
    http_timeout_s: int = Field(
        10,
        ge=1,
        description="Seconds per MLflow HTTP request (MLflow's default, 120, hides outages).",
    )
    http_max_retries: int = Field(
        2, ge=0, description="Retries per MLflow HTTP request (MLflow's default, 7, takes minutes)."
    )
    model_code_dir: str | None = Field(
        None,
        description="Directory of the pyfunc model-code files; none: the repository's mlflow/.",
    )


class PromotionConfig(Section):
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Minimum value per evaluation metric for promotion."
    )
    compare_to_champion: bool = Field(
        True, description="Require the candidate to be not worse than the champion (bootstrap CI)."
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence of the bootstrap interval.")
    bootstrap_samples: int = Field(1000, ge=10, description="Bootstrap resamples.")
    legacy_stages: bool = Field(False, description="Also set MLflow's deprecated registry stages.")
    policy_file: str | None = Field(
        "mlflow/promotion.yaml",
        description="Gate policy YAML (thresholds, max_thresholds, champion_metrics, tolerance); "
        "the gates of this section are added to it and win on the same metric.",
    )
    max_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Maximum value per evaluation metric (lower is better)."
    )
    champion_metrics: dict[str, Literal["higher", "lower"]] = Field(
        default_factory=dict,
        description="Per-prompt metrics compared with the champion, and which direction is better.",
    )
    tolerance: dict[str, float] = Field(
        default_factory=dict,
        description="Allowed loss per champion metric: pass when the CI's lower bound of the "
        "improvement is >= -tolerance (missing: 0).",
    )
    min_paired_prompts: int = Field(
        4, ge=2, description="Fewest evaluation prompts shared with the champion for a comparison."
    )
    per_prompt_artifact: str = Field(
        "evaluation/per_prompt.csv",
        description="Run artifact with one row per evaluation prompt: prompt_id + metric columns.",
    )
    seed: int = Field(
        0, description="Seed of the bootstrap resampling (same inputs, same verdict)."
    )


class PipelineConfig(Section):
    image: str | None = Field(
        None, description="Component base image; none: unifl:<package version>."
    )
    gpu_type: str = Field("nvidia.com/gpu", description="Accelerator resource of GPU stages.")
    gpu_count: int = Field(1, ge=0, description="GPUs per GPU stage.")
    node_selector_key: str = Field("unifl.io/node-pool", description="Node label of the GPU pool.")
    node_selector_value: str = Field("gpu", description="Value of the GPU pool node label.")
    toleration_key: str = Field("nvidia.com/gpu", description="Taint key tolerated by GPU stages.")
    checkpoint_pvc: str = Field(
        "unifl-checkpoints",
        description="PersistentVolumeClaim mounted on the training steps so that a retried pod "
        "resumes from the last checkpoint (ReadWriteMany; k8s/base/checkpoints-pvc.yaml).",
    )
    checkpoint_root: str = Field(
        "/checkpoints",
        description="Mount path of the checkpoint volume in the pods; `unifl run` uses a local "
        "directory instead.",
    )
    retries: int = Field(
        2, ge=0, description="Retries of a training step after a pod failure (each resumes)."
    )
    retry_backoff_s: int = Field(60, ge=0, description="Seconds before the first retry.")
    shm_size: str = Field(
        "16Gi", description="Size limit of the memory-backed /dev/shm of the GPU steps."
    )
    dvc_remote: str | None = Field(
        None,
        description="DVC remote URL (s3://..., a directory) the data steps push their outputs to; "
        "none: the DVC hash is computed and recorded, nothing is pushed.",
    )


class ClusterConfig(Section):
    """Multi-node training on a Kubernetes cluster (unifl.cluster); endpoints come from the
    unifl-endpoints ConfigMap, not from here."""

    num_nodes: int = Field(
        1,
        ge=1,
        description="Nodes per training stage; above 1 the stage runs as a Kubeflow TrainJob "
        "(or PyTorchJob) instead of in its pipeline pod.",
    )
    start_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Seconds a multi-node job may wait for its pods (free GPU nodes, image "
        "pulls) before it is deleted and the stage fails with the scheduling reason.",
    )
    poll_s: float = Field(10.0, gt=0, description="Seconds between status polls of the job.")


class Params(Section):
    """All stage sections; the shape of `params.yaml`."""

    project: ProjectConfig = Field(default_factory=ProjectConfig)
    toy: ToyConfig = Field(default_factory=ToyConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    pefl: PeflConfig = Field(default_factory=PeflConfig)
    decoupled: DecoupledConfig = Field(default_factory=DecoupledConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    def stage_value(self, stage: str, key: str) -> Any:
        """A trainer setting as `stage` uses it: the stage's own `key` where it has one set,
        else `trainer.<key>`."""
        own = getattr(getattr(self, stage, None), key, None)
        return getattr(self.trainer, key) if own is None else own

    def mse_weight(self, stage: str) -> float:
        """The MSE regulariser's weight in `stage` (`stage_value`)."""
        return self.stage_value(stage, "mse_weight")


def preset_path(name: str) -> Path:
    """Path of a packaged preset (a partial params file), e.g. `ci`."""
    path = Path(str(resources.files("unifl") / "resources" / "presets" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}: no file {path}")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _validate(data: dict[str, Any], source: str, fields_only: bool = False) -> Params | None:
    """Validate `data`; an error names `source`. With `fields_only`, an error of a whole
    section (a rule across its fields, such as bootstrap.text_encoder against clip_steps) is
    left to a later validation, so that the order of overrides does not matter."""
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        if fields_only and all(
            len(err["loc"]) == 1 and err["type"] == "value_error" for err in errors
        ):
            return None
        problems = []
        for err in errors:
            key = ".".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `stage.key=value`; the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected stage.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {text!r}: key must be stage.key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def load_params(
    path: str | Path | None = "params.yaml",
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Params:
    """Load the configuration: defaults < file < preset < overrides.

    `path=None` (or a missing default `params.yaml`) uses the built-in defaults.
    Each layer is validated on its own so an error names the file (or the
    override) that introduced it; a rule across a section's fields is checked
    once all overrides are in, so `--set` order does not matter.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if file.is_file() or str(path) != "params.yaml":
            data = _read_yaml(file)
            _validate(data, str(file))
    if preset:
        file = preset_path(preset)
        data = _merge(data, _read_yaml(file))
        _validate(data, f"{file} (preset {preset!r})")
    for text in overrides:
        parts, value = parse_override(text)
        update: dict[str, Any] = value
        for part in reversed(parts):
            update = {part: update}
        data = _merge(data, update)
        _validate(data, f"override {text!r}", fields_only=True)
    return _validate(data, "configuration")  # type: ignore[return-value]


def params_to_yaml(params: Params) -> str:
    """The configuration as YAML text, in section order."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


def describe_params() -> str:
    """A readable listing of every field with its default and description."""
    lines = []
    for section_name, section_field in Params.model_fields.items():
        section_cls = section_field.default_factory  # type: ignore[assignment]
        lines.append(f"{section_name}:")
        for name, field in section_cls.model_fields.items():  # type: ignore[union-attr]
            default = field.default_factory() if field.default_factory else field.default
            lines.append(f"  {name} = {default!r}  # {field.description}")
    return "\n".join(lines)
