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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="directory with labels/, pairs/ and reward/")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch

    from unifl.config import DIMENSIONS, load_params
    from unifl.feedback.images import ImageStore
    from unifl.feedback.reward_training import score_rows
    from unifl.labeling.annotators import load_scorer
    from unifl.models.precision import apply_num_threads
    from unifl.models.reward import DecoupledRewardModel

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    pairs_dir = args.data / "pairs"
    table = pd.read_parquet(args.data / "labels" / "pairs.parquet")
    decided = table[table["dimension"].isin(DIMENSIONS) & ~table["tie"]].reset_index(drop=True)
    val_prompts = set(json.loads((args.data / "reward" / "split.json").read_text())["val_prompts"])
    is_val = decided["prompt"].isin(val_prompts).to_numpy()

    scorer = load_scorer(params.labeling.scorer, params)
    prompts = list(decided["prompt"])
    preferred = scorer([pairs_dir / p for p in decided["image_w"]], prompts)
    other = scorer([pairs_dir / p for p in decided["image_l"]], prompts)
    oracle_gap = np.empty(len(decided))
    for dimension in DIMENSIONS:
        rows = (decided["dimension"] == dimension).to_numpy()
        oracle_gap[rows] = (preferred[dimension] - other[dimension])[rows]

    model = DecoupledRewardModel.load(args.data / "reward" / "model")
    with torch.no_grad():
        reward_w, reward_l = score_rows(model, ImageStore(pairs_dir), decided)
    reward_gap = (reward_w - reward_l).numpy()
    agrees = np.sign(reward_gap) == np.sign(oracle_gap)

    def share(mask: np.ndarray, hits: np.ndarray) -> str:
        """Share of `hits` among `mask`, with the count."""
        return f"{hits[mask].mean():.3f} ({mask.sum()})" if mask.any() else "-"

    header = f"{'dimension':<10} {'decided':>8} {'equal oracle':>13} {'labels = oracle':>16}"
    print(f"{header} {'reward = oracle (train)':>24} {'(validation)':>13}")
    for dimension in DIMENSIONS:
        rows = (decided["dimension"] == dimension).to_numpy()
        gap = rows & (oracle_gap != 0)
        print(
            f"{dimension:<10} {rows.sum():>8} {1 - gap.sum() / max(rows.sum(), 1):>13.3f} "
            f"{share(gap, oracle_gap > 0):>16} {share(gap & ~is_val, agrees):>24} "
            f"{share(gap & is_val, agrees):>13}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
