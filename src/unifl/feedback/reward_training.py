"""Training the decoupled reward model from majority preference pairs (Bradley-Terry).

Input is the pair table of `unifl.data.preferences` (one row per task and
dimension after the majority vote). Each row trains the head of its own
dimension with the Bradley-Terry loss `-log sigmoid(r_d(c, x_w) - r_d(c, x_l))`,
weighted by the row's `weight` (the share of votes that agree with the
majority), so a 3-to-2 decision pulls less than a unanimous one.

Rules, and why:

* Ties (`tie_rule`, default "soft"): a tie is a pair with a soft target of 1/2,
  loss `-1/2 log s(d) - 1/2 log s(-d)`, smallest when the two rewards are
  equal. A tie is information ("these two do not differ in lighting"); using it
  keeps a head from spreading rewards apart on differences the annotators did
  not see, which is the raw material of reward hacking later. "drop" ignores
  ties instead (the plain Bradley-Terry model has no tie outcome).
* The `overall` dimension is ignored: it answers a different question ("which
  is better overall") and has no head; its row count is reported.
* The split into training and validation is by prompt, so that no prompt is in
  both and held-out accuracy measures generalisation to new prompts, not to a
  second look at the same images.
* Held-out pairwise accuracy per dimension counts non-tie pairs where the
  preferred image scores strictly higher.
* `alpha_d` (the hinge target of decoupled feedback learning) is the mean
  reward of the preferred images of dimension d on the validation split
  (non-tie rows), then `alpha_override` replaces the named dimensions (paper:
  detail works best lower, 0.0).
* The model of the last epoch is kept (no selection on the validation split,
  which is used for calibration and reported accuracy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unifl.config import DIMENSIONS, Params, RewardConfig
from unifl.data.preferences import OVERALL, PAIR_COLUMNS, check_table, read_pairs
from unifl.feedback.images import ImageStore
from unifl.models.reward import DecoupledRewardModel

MetricsCallback = Callable[[int, dict[str, float]], None]
TieRule = Literal["soft", "drop"]


class RewardTrainingError(ValueError):
    """The preference pairs cannot train a reward model; the message names file, row or dimension."""


@dataclass
class RewardTrainingResult:
    """The trained model (alphas set), final metrics, and one history entry per epoch."""

    model: DecoupledRewardModel
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- losses
def bradley_terry_loss(
    reward_w: torch.Tensor,
    reward_l: torch.Tensor,
    tie: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    tie_rule: TieRule = "soft",
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Weighted Bradley-Terry loss of preferred rewards `reward_w` over `reward_l`.

    Per pair, with `d = reward_w - reward_l`: `-log sigmoid(d)` for a decision;
    for a tie `-1/2 log sigmoid(d) - 1/2 log sigmoid(-d)` ("soft") or nothing
    ("drop", weight 0). `reduction="mean"` is the weighted mean
    `sum(weight * loss) / sum(weight)` (0 when every weight is 0), "sum" the
    weighted sum, "none" the weighted per-pair losses.
    """
    margin = reward_w - reward_l
    decided = F.softplus(-margin)  # -log sigmoid(d), stable for large |d|
    tie = torch.zeros_like(margin, dtype=torch.bool) if tie is None else tie.to(margin.device)
    tied = 0.5 * (F.softplus(-margin) + F.softplus(margin))
    per_pair = torch.where(tie.bool(), tied, decided)
    weight = torch.ones_like(margin) if weight is None else weight.to(margin)
    if tie_rule == "drop":
        weight = weight * (~tie.bool()).to(weight)
    elif tie_rule != "soft":
        raise ValueError(f"tie_rule must be 'soft' or 'drop', got {tie_rule!r}")
    weighted = weight * per_pair
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        return weighted.sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def pairwise_accuracy(
    reward_w: torch.Tensor, reward_l: torch.Tensor, tie: torch.Tensor | None = None
) -> float:
    """Share of non-tie pairs whose preferred image scores strictly higher (NaN if none)."""
    decided = torch.ones_like(reward_w, dtype=torch.bool) if tie is None else ~tie.bool()
    if not bool(decided.any()):
        return math.nan
    return float((reward_w[decided] > reward_l[decided]).float().mean())


# ----------------------------------------------------------------------- the table
def prepare_pairs(
    pairs: pd.DataFrame, dimensions: Sequence[str], source: str
) -> tuple[pd.DataFrame, int]:
    """Check the pair table and keep the rows of `dimensions`; return them and the overall count.

    The returned frame keeps the original row numbers in column `row` for messages.
    """
    frame = check_table(pairs, PAIR_COLUMNS, source)
    if frame.empty:
        raise RewardTrainingError(f"{source}: the preference table has no rows")
    frame = frame.assign(row=np.arange(len(frame)))
    bad_weight = ~np.isfinite(frame["weight"].to_numpy()) | (frame["weight"].to_numpy() < 0)
    if bad_weight.any():
        row = int(np.flatnonzero(bad_weight)[0])
        raise RewardTrainingError(
            f"{source}: row {row}: weight must be a finite number >= 0, "
            f"got {frame['weight'].iloc[row]!r}"
        )
    num_overall = int((frame["dimension"] == OVERALL).sum())
    frame = frame[frame["dimension"].isin(dimensions)].reset_index(drop=True)
    counts = frame["dimension"].value_counts()
    empty = [dim for dim in dimensions if counts.get(dim, 0) == 0]
    if empty:
        raise RewardTrainingError(
            f"{source}: no preference pairs for dimension(s) {empty}; every head of the "
            f"reward model ({list(dimensions)}) needs pairs ('{OVERALL}' rows are not used)"
        )
    return frame, num_overall


@dataclass(frozen=True)
class CheckedPairs:
    """A pair table that passed `checked_pairs`: the frame `prepare_pairs` leaves and its
    count of overall rows, which no head trains on."""

    frame: pd.DataFrame
    num_overall: int


def checked_pairs(
    pairs: pd.DataFrame | str | Path,
    images_root: str | Path,
    dimensions: Sequence[str],
    config: RewardConfig,
) -> CheckedPairs:
    """The pair table (a DataFrame or a Parquet path) after every check that needs no model:
    columns, a head for every pair's dimension and `reward.alpha_override`'s, image files."""
    if isinstance(pairs, pd.DataFrame):
        source, table = "preference pairs", pairs
    else:
        source, table = str(pairs), read_pairs(pairs)
    frame, num_overall = prepare_pairs(table, dimensions, source)
    unknown = sorted(set(config.alpha_override) - set(dimensions))
    if unknown:
        raise RewardTrainingError(
            f"reward.alpha_override names {unknown}, which the reward model has no head for "
            f"({list(dimensions)})"
        )
    check_images(frame, ImageStore(images_root), source)
    return CheckedPairs(frame, num_overall)


def check_images(frame: pd.DataFrame, store: ImageStore, source: str) -> None:
    """Every image the table names must be a file under the images root."""
    problems = []
    for column in ("image_w", "image_l"):
        for row, relative in zip(frame["row"], frame[column], strict=True):
            if not store.path(relative).is_file():
                problems.append(f"row {row}: {column} {str(store.path(relative))!r}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RewardTrainingError(f"{source}: image files not found: {shown}{more}")


def split_by_prompt(
    frame: pd.DataFrame, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation rows with no prompt in both; the split depends only on `seed`.

    `val_fraction` of the prompts, in a seeded random order, go to validation. A dimension
    whose validation pairs are then all ties (its accuracy and `alpha_d` could not be
    measured) takes the next prompt in that order with a decided pair of it, while at least
    one prompt stays in training: a small label set would otherwise fail by chance.
    """
    prompts = np.array(sorted(frame["prompt"].unique()), dtype=object)
    if len(prompts) < 2:
        raise RewardTrainingError(
            f"need at least 2 distinct prompts to split by prompt, got {len(prompts)}"
        )
    ranked = list(prompts[np.random.default_rng(seed).permutation(len(prompts))])
    num_val = min(len(prompts) - 1, max(1, round(val_fraction * len(prompts))))
    val_prompts = set(ranked[:num_val])
    decided = frame[~frame["tie"].to_numpy(bool)]
    for dim in sorted(frame["dimension"].unique()):
        with_decided_pair = set(decided.loc[decided["dimension"] == dim, "prompt"])
        if with_decided_pair & val_prompts or len(val_prompts) == len(prompts) - 1:
            continue
        extra = next((p for p in ranked[num_val:] if p in with_decided_pair), None)
        if extra is not None:
            val_prompts.add(extra)
    is_val = frame["prompt"].isin(val_prompts).to_numpy()
    return frame[~is_val].reset_index(drop=True), frame[is_val].reset_index(drop=True)


def _check_split(train: pd.DataFrame, val: pd.DataFrame, dimensions: Sequence[str]) -> None:
    for dim in dimensions:
        if not (train["dimension"] == dim).any():
            raise RewardTrainingError(
                f"dimension {dim!r}: no training pairs after the prompt split; "
                "lower reward.val_fraction or add pairs"
            )
        if not ((val["dimension"] == dim) & ~val["tie"]).any():
            raise RewardTrainingError(
                f"dimension {dim!r}: no non-tie validation pairs after the prompt split, so "
                "accuracy and alpha cannot be measured; raise reward.val_fraction or add pairs"
            )


# --------------------------------------------------------------------- scoring rows
def _encode_images(model: DecoupledRewardModel, images: torch.Tensor | list) -> torch.Tensor:
    if isinstance(images, list):  # mixed sizes: each is resized by the model on its own
        return torch.cat([model.encode_images(image.unsqueeze(0)) for image in images])
    return model.encode_images(images)


def score_rows(
    model: DecoupledRewardModel, store: ImageStore, rows: pd.DataFrame
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of each row's preferred and other image under the row's own dimension head.

    Each distinct image and prompt of the batch goes through the backbone once;
    all heads are evaluated and the row's dimension is picked out.
    """
    device = model.device
    paths = sorted(set(rows["image_w"]) | set(rows["image_l"]))
    path_index = {path: i for i, path in enumerate(paths)}
    prompts = sorted(set(rows["prompt"]))
    prompt_index = {prompt: i for i, prompt in enumerate(prompts)}
    image_embeds = _encode_images(model, store.batch(paths))
    tokens = model.tokenize(prompts)
    text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"])

    text_rows = torch.tensor([prompt_index[p] for p in rows["prompt"]], device=device)
    w_rows = torch.tensor([path_index[p] for p in rows["image_w"]], device=device)
    l_rows = torch.tensor([path_index[p] for p in rows["image_l"]], device=device)
    both_images = image_embeds[torch.cat([w_rows, l_rows])]
    both_texts = text_embeds[torch.cat([text_rows, text_rows])]
    scores = model.score_embeddings(both_images, both_texts)
    table = torch.stack([scores[dim] for dim in model.dimensions], dim=1)  # [2B, K]
    dim_index = {dim: k for k, dim in enumerate(model.dimensions)}
    column = torch.tensor([dim_index[d] for d in rows["dimension"]], device=device)
    column = torch.cat([column, column]).unsqueeze(1)
    rewards = table.gather(1, column).squeeze(1)
    return rewards[: len(rows)], rewards[len(rows) :]


def _as_tensor(values: pd.Series, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values.to_numpy().copy(), dtype=dtype, device=device)


@torch.no_grad()
def evaluate_pairs(
    model: DecoupledRewardModel,
    store: ImageStore,
    frame: pd.DataFrame,
    batch_size: int,
    tie_rule: TieRule = "soft",
) -> tuple[dict[str, float], pd.DataFrame]:
    """Loss, per-dimension accuracy and alpha on `frame`, plus per-row rewards.

    Returns metrics `loss`, `accuracy/<dim>`, `accuracy_mean`, `alpha/<dim>`
    (mean reward of preferred images, non-tie rows) and the frame with
    `reward_w`/`reward_l` columns.
    """
    was_training = model.training
    model.eval()
    reward_w, reward_l = [], []
    for start in range(0, len(frame), batch_size):
        r_w, r_l = score_rows(model, store, frame.iloc[start : start + batch_size])
        reward_w.append(r_w.float().cpu())
        reward_l.append(r_l.float().cpu())
    model.train(was_training)
    scored = frame.assign(
        reward_w=torch.cat(reward_w).numpy(), reward_l=torch.cat(reward_l).numpy()
    )
    device = torch.device("cpu")
    metrics: dict[str, float] = {
        "loss": float(
            bradley_terry_loss(
                _as_tensor(scored["reward_w"], torch.float32, device),
                _as_tensor(scored["reward_l"], torch.float32, device),
                _as_tensor(scored["tie"], torch.bool, device),
                _as_tensor(scored["weight"], torch.float32, device),
                tie_rule=tie_rule,
            )
        )
    }
    accuracies = []
    for dim in model.dimensions:
        rows = scored[scored["dimension"] == dim]
        accuracy = pairwise_accuracy(
            _as_tensor(rows["reward_w"], torch.float32, device),
            _as_tensor(rows["reward_l"], torch.float32, device),
            _as_tensor(rows["tie"], torch.bool, device),
        )
        metrics[f"accuracy/{dim}"] = accuracy
        accuracies.append(accuracy)
        preferred = rows.loc[~rows["tie"], "reward_w"]
        metrics[f"alpha/{dim}"] = float(preferred.mean()) if len(preferred) else math.nan
    metrics["accuracy_mean"] = float(np.nanmean(accuracies)) if accuracies else math.nan
    return metrics, scored


# ----------------------------------------------------------------------- training
def _optimizer(model: DecoupledRewardModel, config: RewardConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(model.heads.parameters()), "lr": config.learning_rate}]
    if config.backbone_learning_rate > 0:
        model.backbone.requires_grad_(True)
        groups.append(
            {"params": list(model.backbone.parameters()), "lr": config.backbone_learning_rate}
        )
    else:
        model.backbone.requires_grad_(False)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def train_reward_model(
    pairs: pd.DataFrame | str | Path | CheckedPairs,
    images_root: str | Path,
    model: DecoupledRewardModel,
    config: RewardConfig | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    metrics_callback: MetricsCallback | None = None,
    progress: bool = True,
) -> RewardTrainingResult:
    """Train `model`'s heads (and backbone, unless its learning rate is 0) on preference pairs.

    `pairs` is the majority pair table (a DataFrame or a Parquet path, checked
    here, or `checked_pairs`' result) with image paths relative to `images_root`.
    After training, `alpha_d` is calibrated on the validation split and
    `config.alpha_override` applied.
    With `out_dir`, writes `model/`, `metrics.json`, `history.jsonl` and
    `split.json` (the validation prompts) as one directory, all or nothing.
    `metrics_callback(step, metrics)` receives `train/loss`, `train/accuracy`
    every step and `val/...` after every epoch.
    """
    config = config or RewardConfig()
    if not isinstance(pairs, CheckedPairs):
        pairs = checked_pairs(pairs, images_root, model.dimensions, config)
    frame, num_overall = pairs.frame, pairs.num_overall
    store = ImageStore(images_root, max_cached_bytes=config.image_cache_mib * 2**20)
    train, val = split_by_prompt(frame, config.val_fraction, seed)
    _check_split(train, val, model.dimensions)

    device = model.device
    optimizer = _optimizer(model, config)
    generator = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    history: list[dict[str, float]] = []
    val_metrics: dict[str, float] = {}
    step = 0
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="reward training", disable=not progress)
    try:
        for epoch in range(config.epochs):
            order = generator.permutation(len(train))
            epoch_loss, epoch_correct, epoch_decided = 0.0, 0, 0
            for start in range(0, len(train), config.batch_size):
                rows = train.iloc[order[start : start + config.batch_size]]
                reward_w, reward_l = score_rows(model, store, rows)
                tie = _as_tensor(rows["tie"], torch.bool, device)
                loss = bradley_terry_loss(
                    reward_w,
                    reward_l,
                    tie,
                    _as_tensor(rows["weight"], torch.float32, device),
                    tie_rule=config.tie_rule,
                )
                if not torch.isfinite(loss):
                    raise RewardTrainingError(
                        f"epoch {epoch}, step {step}: loss is {float(loss)}; lower "
                        "reward.learning_rate or check the images for NaN values"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for group in optimizer.param_groups for p in group["params"]],
                    config.max_grad_norm,
                )
                optimizer.step()
                step += 1
                loss_value = float(loss.detach())
                decided = ~tie
                correct = int((reward_w.detach() > reward_l.detach())[decided].sum())
                epoch_loss += loss_value * len(rows)
                epoch_correct += correct
                epoch_decided += int(decided.sum())
                batch_accuracy = correct / max(1, int(decided.sum()))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", acc=f"{batch_accuracy:.2f}")
                if metrics_callback is not None:
                    metrics_callback(
                        step, {"train/loss": loss_value, "train/accuracy": batch_accuracy}
                    )
            val_metrics, _ = evaluate_pairs(model, store, val, config.batch_size, config.tie_rule)
            if not math.isfinite(val_metrics["loss"]):
                # The last update can make the weights non-finite after the last finite loss.
                raise RewardTrainingError(
                    f"epoch {epoch}: the validation loss is {val_metrics['loss']} after step "
                    f"{step}: the model's rewards are no longer finite; lower "
                    "reward.learning_rate (nothing was written)"
                )
            entry = {
                "epoch": float(epoch),
                "step": float(step),
                "train/loss": epoch_loss / len(train),
                "train/accuracy": epoch_correct / max(1, epoch_decided),
                **{f"val/{key}": value for key, value in val_metrics.items()},
            }
            history.append(entry)
            bar.set_postfix(
                epoch=epoch,
                loss=f"{entry['train/loss']:.3f}",
                val_acc=f"{val_metrics['accuracy_mean']:.2f}",
            )
            if metrics_callback is not None:
                metrics_callback(
                    step, {key: value for key, value in entry.items() if key.startswith("val/")}
                )
    finally:
        bar.close()
    model.eval()
    train_seconds = time.perf_counter() - started

    # `val_metrics` of the last epoch describe the final weights: calibrate from them.
    calibrated = {dim: val_metrics[f"alpha/{dim}"] for dim in model.dimensions}
    unset = [
        dim
        for dim, alpha in calibrated.items()
        if not math.isfinite(alpha) and dim not in config.alpha_override
    ]
    if unset:
        raise RewardTrainingError(
            f"alpha of {unset} cannot be calibrated: the validation split has no pair with a "
            "preferred image for it; raise reward.val_fraction or set reward.alpha_override "
            "(nothing was written)"
        )
    model.set_alphas({**calibrated, **config.alpha_override})
    metrics: dict[str, float] = {
        "val/loss": val_metrics["loss"],
        "val/accuracy_mean": val_metrics["accuracy_mean"],
        "train/loss": history[-1]["train/loss"] if history else math.nan,
        "train_seconds": train_seconds,
        "num_train_pairs": float(len(train)),
        "num_val_pairs": float(len(val)),
        "num_train_prompts": float(train["prompt"].nunique()),
        "num_val_prompts": float(val["prompt"].nunique()),
        "num_ties": float(frame["tie"].sum()),
        "num_overall_ignored": float(num_overall),
    }
    for dim in model.dimensions:
        metrics[f"val/accuracy/{dim}"] = val_metrics[f"accuracy/{dim}"]
        metrics[f"alpha_calibrated/{dim}"] = calibrated[dim]
        metrics[f"alpha/{dim}"] = model.alphas[dim]
    if out_dir is not None:
        write_training_outputs(out_dir, model, metrics, history, val)
    return RewardTrainingResult(model=model, metrics=metrics, history=history)


def write_training_outputs(
    out_dir: str | Path,
    model: DecoupledRewardModel,
    metrics: dict[str, float],
    history: list[dict[str, float]],
    val: pd.DataFrame,
) -> None:
    """`model/`, `metrics.json`, `history.jsonl`, `split.json` under `out_dir`, all or nothing."""
    from unifl.io import atomic_directory, write_json, write_jsonl

    with atomic_directory(out_dir) as tmp:
        model.save(tmp / "model")
        write_json(tmp / "metrics.json", _json_safe(metrics))
        write_jsonl(tmp / "history.jsonl", [_json_safe(entry) for entry in history])
        write_json(tmp / "split.json", {"val_prompts": sorted(val["prompt"].unique())})


def _json_safe(values: dict[str, float]) -> dict[str, float | None]:
    """NaN is not JSON: write it as null."""
    return {
        key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in values.items()
    }


def train_reward_stage(
    params: Params,
    pairs: pd.DataFrame | str | Path,
    images_root: str | Path,
    out_dir: str | Path,
    metrics_callback: MetricsCallback | None = None,
    progress: bool = True,
) -> RewardTrainingResult:
    """The `reward-train` stage: build the model `params.reward` names, train it, write `out_dir`.

    `reward.backbone: toy` is the toy bootstrap's pretrained CLIP (trained once per
    configuration, then cached), or a random toy CLIP at the toy world's resolution when
    `bootstrap.clip_steps` is 0. Seeds come from `params.project.seed`.
    """
    from unifl.io import check_output_apart
    from unifl.models.precision import resolve_device
    from unifl.models.reward import build_reward_model

    pairs_path = None if isinstance(pairs, pd.DataFrame) else pairs
    check_output_apart(out_dir, [pairs_path, images_root])
    config = params.reward
    # Bad pairs fail before the backbone is built: the toy one may train a bootstrap first.
    pairs = checked_pairs(pairs, images_root, DIMENSIONS, config)
    backbone = config.backbone
    if backbone == "toy" and params.bootstrap.clip_steps:
        from unifl.toy.bootstrap import bootstrap_toy_world

        backbone = str(bootstrap_toy_world(params, progress=progress).clip_dir)
    model = build_reward_model(
        backbone,
        image_size=params.toy.resolution,
        seed=params.project.seed,
        dimensions=DIMENSIONS,
        head_hidden_dim=config.head_hidden_dim,
    ).to(resolve_device(params.project.device))
    return train_reward_model(
        pairs,
        images_root,
        model,
        config,
        out_dir=out_dir,
        seed=params.project.seed,
        metrics_callback=metrics_callback,
        progress=progress,
    )
