"""Benchmark of active prompt selection: prompts per second and peak memory, with a baseline.

    .venv/bin/python benchmarks/prompt_selection.py                  # 100k and 1M prompts
    .venv/bin/python benchmarks/prompt_selection.py --sizes 100000 --baseline-size 20000

Each measurement runs in its own subprocess so that its peak resident memory
(`resource.getrusage(...).ru_maxrss`; tracemalloc does not see torch's
allocations) belongs to that measurement alone. Workers use `--threads`
torch threads (default 2, the CI machine) and, with `--pin`, are pinned to
that many CPUs.

What is timed: the whole `select_prompts` call on distinct synthetic toy-world
prompts (`distinct_prompts`: three-object captions and a few bare prompts, as
curation hands them over after exact deduplication): scene-graph filter, embedding
with the toy text encoder (the `toy-sd15` preset's CLIP text model over the
toy tokenizer, or the text encoder of `--model DIR`), nearest-neighbour
statistics and the blockwise compression. Making the prompts is not timed.

Baselines measured in the same run:
* ``naive``: the same embeddings, then the textbook method: the full N x N
  similarity matrix and the greedy walk over its rows; only possible where
  N^2 floats fit in memory.
* ``blockwise`` at the baseline size, for a like-for-like comparison.
* ``worst case`` (with `--stress`): compression of random Gaussian embeddings,
  where almost nothing is removed, so the kept set grows to N and the work is
  the full N^2/2 similarities.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def load_embedder(model_dir: str | None, batch_size: int):
    import torch

    from unifl.data.selection import base_model_embedder

    if model_dir:
        from unifl.models.base import load_base_model

        model = load_base_model(model_dir)
    else:
        from unifl.models.toy_presets import build_toy_model

        torch.manual_seed(0)
        model = build_toy_model("toy-sd15", seed=0)
    return base_model_embedder(model, batch_size=batch_size, show_progress=False)


def distinct_prompts(size: int) -> list[str]:
    """`size` distinct synthetic prompts: three-object toy captions plus a few bare prompts.

    Curation removes exact duplicates before selection, so selection is
    measured on distinct prompts; three-object captions are the part of the
    toy grammar with millions of distinct sentences.
    """
    from unifl.data.toy_prompts import toy_prompts

    distinct: dict[str, None] = {}
    seed = 0
    while len(distinct) < size:
        batch = toy_prompts(size + size // 4 + 100, seed, 3, 3, bare_fraction=0.02)
        distinct.update(dict.fromkeys(batch))
        seed += 1
    return list(distinct)[:size]


def naive_full_matrix_selection(embeddings, tau2: float, seed: int) -> int:
    """The baseline: an N x N similarity matrix, then the greedy walk over its rows."""
    import torch

    order = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))
    similarity = embeddings @ embeddings.T
    removed = torch.zeros(embeddings.shape[0], dtype=torch.bool)
    kept = 0
    for index in order.tolist():
        if removed[index]:
            continue
        kept += 1
        removed |= similarity[index] > tau2
    return kept


def worker(args: argparse.Namespace) -> dict[str, object]:
    import torch

    torch.set_num_threads(args.threads)
    if args.pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    from unifl.config import CurateConfig
    from unifl.data.selection import (
        greedy_similarity_compression,
        normalize_embeddings,
        select_prompts,
    )

    config = CurateConfig(num_prompts=args.num_prompts, block_size=args.block_size, tau2=args.tau2)
    result: dict[str, object] = {"method": args.method, "prompts": args.size}
    if args.method == "worst_case":
        embeddings = normalize_embeddings(
            torch.randn(args.size, 32, generator=torch.Generator().manual_seed(0))
        )
        start = time.perf_counter()
        kept = greedy_similarity_compression(embeddings, args.tau2, None, args.block_size)
        seconds = time.perf_counter() - start
        result.update(seconds=seconds, kept=int(kept.shape[0]))
    else:
        start = time.perf_counter()
        prompts = distinct_prompts(args.size)
        result["make_prompts_seconds"] = round(time.perf_counter() - start, 2)
        embed = load_embedder(args.model, args.embed_batch_size)
        if args.method == "blockwise":
            start = time.perf_counter()
            selection = select_prompts(prompts, embed, config, seed=0, show_progress=False)
            seconds = time.perf_counter() - start
            report = selection.report
            result.update(
                seconds=seconds,
                kept=report.kept_after_compression,
                selected=report.selected,
                nn_before=report.mean_nn_similarity_before,
                nn_after=report.mean_nn_similarity_after_compression,
                stage_seconds=report.seconds,
            )
        else:  # naive: same embedding, then the full matrix
            start = time.perf_counter()
            embeddings = normalize_embeddings(embed(prompts))
            kept = naive_full_matrix_selection(embeddings, args.tau2, seed=0)
            seconds = time.perf_counter() - start
            result.update(seconds=seconds, kept=kept)
    result["prompts_per_second"] = args.size / result["seconds"]  # type: ignore[operator]
    result["peak_rss_gib"] = peak_rss_bytes() / GIB
    return result


def run_worker(method: str, size: int, args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--size",
        str(size),
        "--threads",
        str(args.threads),
        "--block-size",
        str(args.block_size),
        "--embed-batch-size",
        str(args.embed_batch_size),
        "--num-prompts",
        str(args.num_prompts),
        "--tau2",
        str(args.tau2),
    ]
    if args.model:
        command += ["--model", args.model]
    if args.pin:
        command.append("--pin")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        return {"method": method, "prompts": size, "error": completed.stderr.strip()[-2000:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_row(row: dict[str, object]) -> None:
    if "error" in row:
        print(f"{row['method']:>11} {row['prompts']:>9,}  failed: {row['error']}")
        return
    extra = ""
    if row.get("nn_before") is not None:
        extra = f"  nn-sim {row['nn_before']:.3f} -> {row['nn_after']:.3f}"
    print(
        f"{row['method']:>11} {row['prompts']:>9,} {row['seconds']:>9.1f} s "
        f"{row['prompts_per_second']:>11,.0f}/s {row['peak_rss_gib']:>7.2f} GiB "
        f"kept {row['kept']:>8,}{extra}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-size", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pin", action="store_true", help="Pin workers to --threads CPUs.")
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--embed-batch-size", type=int, default=1024)
    parser.add_argument("--num-prompts", type=int, default=100_000)
    parser.add_argument("--tau2", type=float, default=0.8)
    parser.add_argument("--model", help="Base model directory whose text encoder embeds.")
    parser.add_argument("--stress", action="store_true", help="Also run the worst case.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="blockwise", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"prompt selection benchmark: {args.threads} threads, block {args.block_size}, "
        f"tau2 {args.tau2}, cpus {os.cpu_count()}, load average {load:.1f}"
    )
    print(f"{'method':>11} {'prompts':>9} {'time':>11} {'throughput':>13} {'peak RSS':>11}")
    runs = [("naive", args.baseline_size), ("blockwise", args.baseline_size)]
    runs += [("blockwise", size) for size in args.sizes]
    if args.stress:
        runs.append(("worst_case", min(args.sizes)))
    results = []
    for method, size in runs:
        row = run_worker(method, size, args)
        print_row(row)
        results.append(row)
    out = Path(os.environ.get("BENCHMARK_OUT", "")) if os.environ.get("BENCHMARK_OUT") else None
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
