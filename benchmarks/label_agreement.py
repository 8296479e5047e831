"""Preference labels against the oracle and the reward model, per aesthetic dimension.

    python benchmarks/label_agreement.py runs/toy_table/data   # the toy table's labels and reward

Reads `DATA/labels/pairs.parquet` (the label step's pair table), the images under
`DATA/pairs` and the reward stage's output `DATA/reward` (`model/`, `split.json`),
scores both images of every decided pair with the labeling scorer of
`params.labeling.scorer` (the toy oracle) and prints per dimension:

* `decided`: pairs that are not ties; `equal oracle`: the share of them whose two
  images have exactly the same oracle score (a label there is the annotators'
  noise alone);
* `labels = oracle`: the share of decided pairs with an oracle gap whose label
  prefers the image the oracle scores higher;
* `reward = oracle` on training and on validation prompts: the same share for
  the reward model's scores, i.e. how much of the oracle it learned and how much
  of that generalises to prompts it has not seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def oracle_gaps(params, pairs_dir: Path, table):
    """Per row of a pair table: the labeling scorer's score of the preferred image minus the
    other's, on the row's dimension (images under `pairs_dir`), as a numpy array."""
    import numpy as np

    from unifl.labeling.annotators import load_scorer

    scorer = load_scorer(params.labeling.scorer, params)
    prompts = list(table["prompt"])
    preferred = scorer([pairs_dir / path for path in table["image_w"]], prompts)
    other = scorer([pairs_dir / path for path in table["image_l"]], prompts)
    gaps = np.empty(len(table))
    for dimension in table["dimension"].unique():
        rows = (table["dimension"] == dimension).to_numpy()
        gaps[rows] = (np.asarray(preferred[dimension]) - np.asarray(other[dimension]))[rows]
    return gaps


def oracle_agreement(params, data: Path, reward_dir: Path) -> dict[str, dict[str, float]]:
    """Per dimension: decided pairs, the share with equal oracle scores, and how often the
    labels and the reward model in `reward_dir` (its `model/` and `split.json`) prefer the
    image the oracle scores higher, on training and on validation prompts, with the counts."""
    import numpy as np
    import pandas as pd
    import torch

    from unifl.config import DIMENSIONS
    from unifl.feedback.images import ImageStore
    from unifl.feedback.reward_training import score_rows
    from unifl.models.reward import DecoupledRewardModel

    pairs_dir = data / "pairs"
    table = pd.read_parquet(data / "labels" / "pairs.parquet")
    decided = table[table["dimension"].isin(DIMENSIONS) & ~table["tie"]].reset_index(drop=True)
    val_prompts = set(json.loads((reward_dir / "split.json").read_text())["val_prompts"])
    is_val = decided["prompt"].isin(val_prompts).to_numpy()

    oracle_gap = oracle_gaps(params, pairs_dir, decided)

    model = DecoupledRewardModel.load(reward_dir / "model")
    with torch.no_grad():
        reward_w, reward_l = score_rows(model, ImageStore(pairs_dir), decided)
    agrees = np.sign((reward_w - reward_l).numpy()) == np.sign(oracle_gap)

    result = {}
    for dimension in DIMENSIONS:
        rows = (decided["dimension"] == dimension).to_numpy()
        gap = rows & (oracle_gap != 0)
        train, val = gap & ~is_val, gap & is_val
        result[dimension] = {
            "decided": int(rows.sum()),
            "equal_oracle": 1 - gap.sum() / max(rows.sum(), 1),
            "labels": float((oracle_gap > 0)[gap].mean()) if gap.any() else float("nan"),
            "pairs": int(gap.sum()),
            "reward_train": float(agrees[train].mean()) if train.any() else float("nan"),
            "train_pairs": int(train.sum()),
            "reward_val": float(agrees[val].mean()) if val.any() else float("nan"),
            "val_pairs": int(val.sum()),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="directory with labels/, pairs/ and reward/")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    agreement = oracle_agreement(params, args.data, args.data / "reward")

    header = f"{'dimension':<10} {'decided':>8} {'equal oracle':>13} {'labels = oracle':>16}"
    print(f"{header} {'reward = oracle (train)':>24} {'(validation)':>13}")
    for dimension, row in agreement.items():
        labels = f"{row['labels']:.3f} ({row['pairs']})"
        train = f"{row['reward_train']:.3f} ({row['train_pairs']})"
        val = f"{row['reward_val']:.3f} ({row['val_pairs']})"
        print(
            f"{dimension:<10} {row['decided']:>8} {row['equal_oracle']:>13.3f} "
            f"{labels:>16} {train:>24} {val:>13}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
