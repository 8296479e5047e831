"""Active prompt selection (UniFL section 2): semantic filter, then similarity compression.

Feedback learning over-fits a reward model quickly when its prompts are
redundant; UniFL therefore (1) drops prompts whose scene graph is poor (no
entity with at least `tau1` attributes/relations) and (2) compresses the rest
so that no two kept prompts are closer than cosine `tau2` (paper: 0.8), then
samples `num_prompts`. The paper reports the mean nearest-neighbour similarity
falling from 0.89 to 0.73.

Compression is the greedy walk of the paper: shuffle with the seed, walk the
list, keep a prompt that no earlier kept prompt is similar to (> tau2), which
is the same as "keep it and remove its not-yet-visited neighbours". It is
computed blockwise so memory stays bounded for millions of prompts: a block of
`block_size` candidates is compared with the kept prompts in slices of
`block_size` (never an N x N matrix), candidates similar to a kept prompt are
dropped, and the survivors are resolved among themselves in walk order. The
work is (candidates x kept) rather than N^2, so it is cheap when compression
is strong. With exact similarities one pass already leaves no kept pair above
`tau2`; the kept set is checked again (on the same sample of queries the
report uses) and compressed once more if rounding let a pair through.

Embeddings come from a callable `embed(prompts) -> Tensor[N, D]`. The
production embedder uses the base model's own text encoder (mean of the last
hidden state over non-padding tokens, or SDXL's pooled projection),
L2-normalised, so "similar" means similar to the model being tuned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from unifl.config import CurateConfig
from unifl.data.scene_graph import SceneGraphParser, semantic_scores

logger = logging.getLogger(__name__)

Embedder = Callable[[list[str]], torch.Tensor]
"""Maps prompts to a [N, D] tensor of embeddings (normalised by `select_prompts`)."""

SimilarityBackend = Literal["torch", "faiss", "auto"]


class SelectionError(ValueError):
    """Selection inputs are inconsistent (shapes, non-finite embeddings, thresholds)."""


def normalize_embeddings(embeddings: torch.Tensor, source: str = "embeddings") -> torch.Tensor:
    """Float32, L2-normalised rows; a non-2-D or non-finite input is an error."""
    if embeddings.ndim != 2:
        raise SelectionError(
            f"{source}: expected a [N, D] tensor, got shape {tuple(embeddings.shape)}"
        )
    embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32)
    finite = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise SelectionError(f"{source}: row {row} has non-finite values (NaN or inf)")
    return torch.nn.functional.normalize(embeddings, dim=1)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: SimilarityBackend) -> Literal["torch", "faiss"]:
    """'auto' picks faiss when it is importable; 'faiss' without faiss is an error."""
    if backend == "auto":
        return "faiss" if _faiss_available() else "torch"
    if backend == "faiss" and not _faiss_available():
        raise SelectionError("similarity backend 'faiss' requested but faiss is not installed")
    return backend


class _KeptIndex:
    """The kept embeddings, answering "how similar is each query to its closest kept row"."""

    def __init__(self, dim: int, block_size: int, backend: Literal["torch", "faiss"]) -> None:
        self.block_size = block_size
        self.backend = backend
        self.size = 0
        if backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(dim)
        else:
            # Grown by doubling so appends are amortised O(1) and memory is O(kept).
            self._buffer = torch.empty(0, dim)

    def add(self, vectors: torch.Tensor) -> None:
        if vectors.shape[0] == 0:
            return
        if self.backend == "faiss":
            self._faiss.add(np.ascontiguousarray(vectors.numpy()))
        else:
            needed = self.size + vectors.shape[0]
            if needed > self._buffer.shape[0]:
                grown = torch.empty(max(needed, 2 * self._buffer.shape[0]), vectors.shape[1])
                grown[: self.size] = self._buffer[: self.size]
                self._buffer = grown
            self._buffer[self.size : needed] = vectors
        self.size += vectors.shape[0]

    def max_similarity(self, queries: torch.Tensor) -> torch.Tensor:
        best = torch.full((queries.shape[0],), -float("inf"))
        if self.size == 0 or queries.shape[0] == 0:
            return best
        if self.backend == "faiss":
            sims, _ = self._faiss.search(np.ascontiguousarray(queries.numpy()), 1)
            return torch.from_numpy(sims[:, 0]).float()
        for start in range(0, self.size, self.block_size):
            chunk = self._buffer[start : min(start + self.block_size, self.size)]
            best = torch.maximum(best, (queries @ chunk.T).amax(dim=1))
        return best


def _greedy_within_block(block: torch.Tensor, threshold: float) -> np.ndarray:
    """Walk-order greedy among one block's candidates: a boolean keep mask."""
    adjacent = (block @ block.T > threshold).numpy()
    keep = np.ones(block.shape[0], dtype=bool)
    for row in range(block.shape[0]):
        if keep[row]:
            keep[row + 1 :] &= ~adjacent[row, row + 1 :]
    return keep


def greedy_similarity_compression(
    embeddings: torch.Tensor,
    threshold: float,
    order: torch.Tensor | None = None,
    block_size: int = 4096,
    backend: SimilarityBackend = "torch",
    show_progress: bool = False,
) -> torch.Tensor:
    """Indices kept by the greedy walk in `order`, in walk order.

    A prompt is kept when no earlier kept prompt has cosine similarity
    > `threshold` with it; every dropped prompt therefore has an earlier kept
    neighbour above the threshold, and no two kept prompts exceed it.
    `embeddings` must be L2-normalised (see `normalize_embeddings`).
    """
    if not 0 < threshold <= 1:
        raise SelectionError(f"threshold must be in (0, 1], got {threshold}")
    if block_size < 1:
        raise SelectionError(f"block_size must be >= 1, got {block_size}")
    count, dim = embeddings.shape
    order = torch.arange(count) if order is None else order.to(torch.long)
    if order.shape != (count,):
        raise SelectionError(f"order has shape {tuple(order.shape)}, expected ({count},)")
    index = _KeptIndex(dim, block_size, resolve_backend(backend))
    kept: list[torch.Tensor] = []
    starts = range(0, count, block_size)
    for start in tqdm(starts, desc="compress", unit="block", disable=not show_progress):
        block_ids = order[start : start + block_size]
        block = embeddings[block_ids]
        alive = index.max_similarity(block) <= threshold
        candidates = block_ids[alive]
        if candidates.numel() == 0:
            continue
        keep = torch.from_numpy(_greedy_within_block(embeddings[candidates], threshold))
        newly_kept = candidates[keep]
        index.add(embeddings[newly_kept])
        kept.append(newly_kept)
    return torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)


def nearest_neighbour_similarity(
    embeddings: torch.Tensor,
    queries: torch.Tensor | None = None,
    block_size: int = 4096,
    show_progress: bool = False,
) -> torch.Tensor:
    """For each query row, the largest cosine similarity to any *other* row.

    Blockwise: at most `block_size` x `block_size` similarities exist at once.
    Rows need at least one other row (N >= 2).
    """
    count = embeddings.shape[0]
    if count < 2:
        raise SelectionError(f"nearest neighbours need at least 2 rows, got {count}")
    queries = torch.arange(count) if queries is None else queries.to(torch.long)
    result = torch.empty(queries.shape[0])
    query_starts = range(0, queries.shape[0], block_size)
    for q_start in tqdm(query_starts, desc="nearest neighbours", disable=not show_progress):
        query_ids = queries[q_start : q_start + block_size]
        query_block = embeddings[query_ids]
        best = torch.full((query_ids.shape[0],), -float("inf"))
        for start in range(0, count, block_size):
            stop = min(start + block_size, count)
            sims = query_block @ embeddings[start:stop].T
            inside = (query_ids >= start) & (query_ids < stop)
            rows = inside.nonzero().squeeze(1)
            sims[rows, query_ids[rows] - start] = -float("inf")  # a row is not its own neighbour
            best = torch.maximum(best, sims.amax(dim=1))
        result[q_start : q_start + query_ids.shape[0]] = best
    return result


def mean_nearest_neighbour_similarity(
    embeddings: torch.Tensor,
    max_queries: int,
    generator: torch.Generator,
    block_size: int = 4096,
) -> tuple[float | None, float | None, int]:
    """(mean, max, queries used): exact when N <= max_queries, else over a random sample.

    Exact statistics cost N^2 similarities; for millions of prompts a sample of
    queries (each compared with all rows) estimates the mean closely.
    """
    count = embeddings.shape[0]
    if count < 2:
        return None, None, 0
    if count <= max_queries:
        queries = None
    else:
        queries = torch.randperm(count, generator=generator)[:max_queries]
    sims = nearest_neighbour_similarity(embeddings, queries, block_size)
    return float(sims.mean()), float(sims.max()), int(sims.shape[0])


@dataclass
class SelectionReport:
    """Counts and similarity statistics of one selection run (written as JSON)."""

    input_prompts: int
    semantic_dropped: int
    compressed_dropped: int
    kept_after_compression: int
    selected: int
    shortfall: int
    compression_passes: int
    tau1: int
    tau2: float
    seed: int
    backend: str
    nn_queries: int
    mean_nn_similarity_before: float | None
    mean_nn_similarity_after_compression: float | None
    max_nn_similarity_after_compression: float | None
    mean_nn_similarity_selected: float | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SelectionResult:
    """Selected prompt indices (into the input, in sampled order) and the report."""

    indices: list[int]
    scores: list[int]
    report: SelectionReport


def compress_and_sample(
    embeddings: torch.Tensor, config: CurateConfig, seed: int, show_progress: bool = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Similarity compression at `config.tau2` in a seeded walk, then a seeded sample.

    `embeddings` must be L2-normalised. Returns the chosen row indices (in
    sampled order) and the statistics of `SelectionReport` (all fields except
    `input_prompts` and `semantic_dropped`).
    """
    timings: dict[str, float] = {}
    count = int(embeddings.shape[0])
    generator = torch.Generator().manual_seed(seed)
    # The statistics' query sample draws from its own stream: `nn_queries`, a report
    # setting, must not change which prompts are selected.
    statistics = torch.Generator().manual_seed(seed + 1)
    backend = resolve_backend(config.similarity_backend)
    clock = time.perf_counter()
    before_mean, _, _ = mean_nearest_neighbour_similarity(
        embeddings, config.nn_queries, statistics, config.block_size
    )
    timings["nn_before"] = time.perf_counter() - clock

    clock = time.perf_counter()
    walk = torch.randperm(count, generator=generator)
    kept = greedy_similarity_compression(
        embeddings, config.tau2, walk, config.block_size, backend, show_progress
    )
    timings["compress"] = time.perf_counter() - clock
    clock = time.perf_counter()
    passes = 1
    after_mean, after_max, queries = mean_nearest_neighbour_similarity(
        embeddings[kept], config.nn_queries, statistics, config.block_size
    )
    while after_max is not None and after_max > config.tau2 and passes < 10:
        # Only floating-point disagreement between blockings can get here.
        sub = greedy_similarity_compression(
            embeddings[kept], config.tau2, None, config.block_size, backend
        )
        kept = kept[sub]
        passes += 1
        after_mean, after_max, queries = mean_nearest_neighbour_similarity(
            embeddings[kept], config.nn_queries, statistics, config.block_size
        )
    timings["nn_after"] = time.perf_counter() - clock

    sample = torch.randperm(kept.shape[0], generator=generator)[: config.num_prompts]
    chosen = kept[sample]
    selected_mean, _, _ = mean_nearest_neighbour_similarity(
        embeddings[chosen], config.nn_queries, statistics, config.block_size
    )
    if chosen.shape[0] < config.num_prompts:
        logger.warning(
            "active selection kept %d prompts, fewer than curate.num_prompts=%d: %d of %d "
            "survived the similarity compression at tau2=%s; add prompts or raise tau2",
            int(chosen.shape[0]),
            config.num_prompts,
            int(kept.shape[0]),
            count,
            config.tau2,
        )
    stats: dict[str, Any] = {
        "compressed_dropped": count - int(kept.shape[0]),
        "kept_after_compression": int(kept.shape[0]),
        "selected": int(chosen.shape[0]),
        "shortfall": max(0, config.num_prompts - int(chosen.shape[0])),
        "compression_passes": passes,
        "tau1": config.tau1,
        "tau2": config.tau2,
        "seed": seed,
        "backend": backend,
        "nn_queries": queries,
        "mean_nn_similarity_before": before_mean,
        "mean_nn_similarity_after_compression": after_mean,
        "max_nn_similarity_after_compression": after_max,
        "mean_nn_similarity_selected": selected_mean,
        "seconds": {name: round(value, 3) for name, value in timings.items()},
    }
    return chosen, stats


def select_prompts(
    prompts: Sequence[str],
    embed: Embedder,
    config: CurateConfig,
    seed: int,
    parser: SceneGraphParser | None = None,
    show_progress: bool = True,
) -> SelectionResult:
    """Active prompt selection: semantic filter (tau1), compression (tau2), sample.

    `scores` holds every input prompt's semantic score. Prompts that fail the
    semantic filter are never embedded, and a repeated prompt is parsed and
    embedded once (its copies share the vector, so compression drops them).
    Same inputs and seed give the same selection.
    """
    clock = time.perf_counter()
    distinct = list(dict.fromkeys(prompts))
    row_of = {text: row for row, text in enumerate(distinct)}
    distinct_scores = semantic_scores(distinct, parser)
    scores = [distinct_scores[row_of[text]] for text in prompts]
    passing = [index for index, score in enumerate(scores) if score >= config.tau1]
    semantic_seconds = time.perf_counter() - clock

    clock = time.perf_counter()
    texts = [prompts[index] for index in passing]
    if texts:
        to_embed = list(dict.fromkeys(texts))
        vectors = embed(to_embed)
        if vectors.shape[0] != len(to_embed):
            raise SelectionError(
                f"embed returned {vectors.shape[0]} rows for {len(to_embed)} prompts"
            )
        vectors = normalize_embeddings(vectors, "embed(prompts)")
        embed_row = {text: row for row, text in enumerate(to_embed)}
        embeddings = vectors[torch.tensor([embed_row[text] for text in texts])]
    else:
        embeddings = torch.empty(0, 1)
    embed_seconds = time.perf_counter() - clock

    chosen, stats = compress_and_sample(embeddings, config, seed, show_progress)
    stats["seconds"] = {
        "semantic_filter": round(semantic_seconds, 3),
        "embed": round(embed_seconds, 3),
        **stats["seconds"],
    }
    report = SelectionReport(
        input_prompts=len(prompts), semantic_dropped=len(prompts) - len(passing), **stats
    )
    return SelectionResult(
        indices=[passing[int(local)] for local in chosen], scores=scores, report=report
    )


def text_encoder_embedder(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    batch_size: int = 256,
    max_length: int | None = None,
    pooled: bool = False,
    show_progress: bool = True,
) -> Embedder:
    """An `Embedder` from a tokenizer and a CLIP-style text encoder.

    The embedding is the mean of the last hidden state over non-padding tokens
    (`pooled=False`), or the encoder's pooled/projected output (`pooled=True`,
    SDXL's second encoder). Padding is to the longest prompt of each batch:
    CLIP text encoders are causal, so non-padding states do not depend on it.
    """
    max_length = max_length or getattr(tokenizer, "model_max_length", 77)

    def embed(prompts: list[str]) -> torch.Tensor:
        parameter = next(text_encoder.parameters())
        was_training = text_encoder.training
        text_encoder.eval()
        rows: list[torch.Tensor] = []
        starts = range(0, len(prompts), batch_size)
        try:
            with torch.inference_mode():
                for start in tqdm(
                    starts, desc="embed prompts", unit="batch", disable=not show_progress
                ):
                    batch = tokenizer(
                        list(prompts[start : start + batch_size]),
                        padding="longest",
                        truncation=True,
                        max_length=max_length,
                        return_tensors="pt",
                    )
                    input_ids = batch["input_ids"].to(parameter.device)
                    output = text_encoder(input_ids=input_ids)
                    if pooled:
                        vectors = getattr(output, "text_embeds", None)
                        if vectors is None:
                            vectors = output.pooler_output
                    else:
                        mask = batch["attention_mask"].to(
                            parameter.device, output.last_hidden_state.dtype
                        )
                        summed = (output.last_hidden_state * mask.unsqueeze(-1)).sum(dim=1)
                        vectors = summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
                    rows.append(torch.nn.functional.normalize(vectors.float(), dim=1).cpu())
        finally:
            text_encoder.train(was_training)
        if not rows:
            return torch.empty(0, int(text_encoder.config.hidden_size))
        return torch.cat(rows)

    return embed


def base_model_embedder(model: Any, batch_size: int = 256, show_progress: bool = True) -> Embedder:
    """The production `Embedder`: the base model's own text encoder.

    SD1.5: mean of the text encoder's last hidden state over non-padding
    tokens (the states `unifl.models.base.encode_prompt` feeds the UNet).
    SDXL: the pooled projection of the second encoder, the same vector as
    `encode_prompt(...).pooled_prompt_embeds`. Prompts are therefore "similar"
    when the model being tuned reads them alike.
    """
    if model.family == "sdxl":
        return text_encoder_embedder(
            model.tokenizer_2,
            model.text_encoder_2,
            batch_size,
            pooled=True,
            show_progress=show_progress,
        )
    return text_encoder_embedder(
        model.tokenizer, model.text_encoder, batch_size, pooled=False, show_progress=show_progress
    )
