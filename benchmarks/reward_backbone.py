"""Reward models on a random and on a pretrained toy CLIP, trained on the same labels.

    python benchmarks/reward_backbone.py runs/toy_table/data [--seeds 0 1 2] [--jobs 2]

Production reward models put their heads on a pretrained CLIP; the toy world's
`reward.backbone: toy` is the bootstrap's contrastively pretrained toy CLIP
(`bootstrap.clip_steps`). This trains the reward model on `DATA/labels` (the
images under `DATA/pairs`) once per backbone setting and seed (the seed draws
the validation prompts and the heads), writes each to `--out`, and prints per
dimension, mean ± std over seeds: the held-out pairwise accuracy against the
labels, and how often the reward model prefers the image the oracle scores
higher on the validation prompts' pairs with an oracle gap
(`label_agreement.py`'s last column). Settings:

* random CLIP, backbone learning rate 1e-3 (the default before the pretrained CLIP);
* random CLIP at the pretrained one's backbone learning rate (`reward.backbone_learning_rate`);
* the pretrained CLIP at that learning rate (the default);
* the pretrained CLIP frozen (heads only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from label_agreement import oracle_agreement
from toy_table import run_jobs, toy_arguments


def settings(params, clip_dir: Path) -> dict[str, tuple[str, float]]:
    """{name: (backbone for `build_reward_model`, backbone learning rate)}; 'toy' is random."""
    rate = params.reward.backbone_learning_rate
    return {
        "random CLIP, backbone lr 1e-3": ("toy", 1e-3),
        f"random CLIP, backbone lr {rate:g}": ("toy", rate),
        f"pretrained CLIP, backbone lr {rate:g}": (str(clip_dir), rate),
        "pretrained CLIP, frozen": (str(clip_dir), 0.0),
    }


def train_one(params, data: Path, out: Path, backbone: str, rate: float, seed: int) -> dict:
    """Train one reward model into `out` and measure it: {dimension: {accuracy, oracle}}."""
    from unifl.feedback.reward_training import train_reward_model
    from unifl.models.precision import apply_num_threads
    from unifl.models.reward import build_reward_model

    apply_num_threads(params.project)
    config = params.reward.model_copy(update={"backbone_learning_rate": rate})
    model = build_reward_model(
        backbone,
        image_size=params.toy.resolution,
        seed=seed,
        head_hidden_dim=config.head_hidden_dim,
    )
    result = train_reward_model(
        data / "labels" / "pairs.parquet",
        data / "pairs",
        model,
        config,
        out_dir=out,
        seed=seed,
        progress=False,
    )
    agreement = oracle_agreement(params, data, out)
    return {
        dimension: {
            "accuracy": float(result.metrics[f"val/accuracy/{dimension}"]),
            "oracle": agreement[dimension]["reward_val"],
        }
        for dimension in agreement
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="directory with labels/ and pairs/")
    toy_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/reward_backbone"))
    parser.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    args = parser.parse_args(argv)

    from unifl.config import DIMENSIONS, load_params
    from unifl.toy.bootstrap import bootstrap_toy_world

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    started = time.perf_counter()
    clip_dir = bootstrap_toy_world(params).clip_dir
    if clip_dir is None:
        parser.error("bootstrap.clip_steps is 0: there is no pretrained toy CLIP to compare")
    named = settings(params, clip_dir)
    jobs = [
        (params, args.data, args.out / f"setting-{number}" / f"seed-{seed}", *setting, seed)
        for number, setting in enumerate(named.values())
        for seed in args.seeds
    ]
    results = iter(run_jobs(train_one, jobs, args.jobs))
    per_setting = {name: [next(results) for _ in args.seeds] for name in named}

    def cell(runs: list[dict], dimension: str, key: str) -> str:
        values = [run[dimension][key] for run in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {spread:.3f}"

    seeds = " ".join(map(str, args.seeds))
    elapsed = time.perf_counter() - started
    lines = [f"reward backbones on {args.data}, seeds {seeds}, {elapsed:.0f} s", ""]
    for key, title in (("accuracy", "held-out accuracy"), ("oracle", "agrees with the oracle")):
        lines.append(f"| {title} | " + " | ".join(DIMENSIONS) + " |")
        lines.append("|---" * (len(DIMENSIONS) + 1) + "|")
        for name, runs in per_setting.items():
            cells = " | ".join(cell(runs, dimension, key) for dimension in DIMENSIONS)
            lines.append(f"| {name} | {cells} |")
        lines.append("")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reward_backbone.md").write_text(text)
    (args.out / "reward_backbone.json").write_text(json.dumps(per_setting, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
