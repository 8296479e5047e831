"""Active prompt selection: scene-graph parser, blockwise greedy compression, sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from unifl.config import CurateConfig
from unifl.data.scene_graph import RuleBasedSceneGraphParser, SceneGraph, SceneGraphParser
from unifl.data.selection import (
    SelectionError,
    base_model_embedder,
    greedy_similarity_compression,
    mean_nearest_neighbour_similarity,
    nearest_neighbour_similarity,
    normalize_embeddings,
    select_prompts,
    text_encoder_embedder,
)
from unifl.data.toy_prompts import toy_prompts
from unifl.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, toy_tokenizer

# --------------------------------------------------------------------------- scene graphs

PARSER_TABLE = [
    # prompt, score, entities (name, attributes), relations (subject, predicate, object)
    (
        "a small red circle above a blue square on a dark background",
        3,
        [("circle", ("small", "red")), ("square", ("blue",)), ("background", ("dark",))],
        [("circle", "above", "square"), ("square", "on", "background")],
    ),
    (
        "a large green triangle left of a yellow circle and next to a red square "
        "on a striped background",
        4,
        [
            ("triangle", ("large", "green")),
            ("circle", ("yellow",)),
            ("square", ("red",)),
            ("background", ("striped",)),
        ],
        [
            ("triangle", "left of", "circle"),
            ("triangle", "next to", "square"),
            ("square", "on", "background"),
        ],
    ),
    (
        "a red circle above a blue square and a green triangle on a dark background",
        3,
        [
            ("circle", ("red",)),
            ("square", ("blue",)),
            ("triangle", ("green",)),
            ("background", ("dark",)),
        ],
        [("circle", "above", "square"), ("circle", "above", "triangle")],
    ),
    ("a cat", 0, [("cat", ())], []),
    ("sunset", 0, [("sunset", ())], []),
    ("cats and dogs", 0, [("cats", ()), ("dogs", ())], []),
    ("highly detailed, 8k, trending on artstation", 0, [("artstation", ())], []),
    (
        "a man in a red hat holding a cup of coffee",
        2,
        [("man", ()), ("hat", ("red",)), ("cup", ()), ("coffee", ())],
        [("man", "in", "hat"), ("man", "holding", "cup"), ("cup", "of", "coffee")],
    ),
    (
        "a black and white cat sitting on a wooden table",
        3,
        [("cat", ("black", "white")), ("table", ("wooden",))],
        [("cat", "sitting on", "table")],
    ),
    ("a dog running in the park", 1, [("dog", ()), ("park", ())], [("dog", "running in", "park")]),
    ("the sky is blue", 1, [("sky", ("blue",))], []),
    ("a woman smiling", 1, [("woman", ("smiling",))], []),
    (
        "two dogs playing with a ball",
        2,
        [("dogs", ("two",)), ("ball", ())],
        [("dogs", "playing with", "ball")],
    ),
    (
        "A woman wearing a long blue dress, standing in front of an old castle",
        3,
        [("woman", ()), ("dress", ("long", "blue")), ("castle", ("old",))],
        [("woman", "wearing", "dress"), ("woman", "standing in front of", "castle")],
    ),
    (
        "an oil painting of a lighthouse on a cliff",
        2,
        [("painting", ("oil",)), ("lighthouse", ()), ("cliff", ())],
        [("painting", "of", "lighthouse"), ("lighthouse", "on", "cliff")],
    ),
    (
        "a dog with long curled hair",
        3,
        [("dog", ()), ("hair", ("long", "curled"))],
        [("dog", "with", "hair")],
    ),
]


@pytest.mark.parametrize(("prompt", "score", "entities", "relations"), PARSER_TABLE)
def test_rule_based_parser_reads_captions_and_ordinary_prompts(
    prompt: str, score: int, entities: list, relations: list
) -> None:
    graph = RuleBasedSceneGraphParser().parse(prompt)
    assert [(e.name, e.attributes) for e in graph.entities] == entities
    got = [
        (graph.entities[r.subject].name, r.predicate, graph.entities[r.object].name)
        for r in graph.relations
    ]
    for relation in relations:
        assert relation in got
    assert graph.score() == score


def test_scene_graph_score_counts_attributes_and_relations_per_entity() -> None:
    graph = RuleBasedSceneGraphParser().parse("a small red circle above a blue square")
    # circle: 2 attributes + 1 relation; square: 1 attribute + 1 relation
    assert graph.entity_scores() == [3, 2]
    assert SceneGraph().score() == 0
    assert isinstance(RuleBasedSceneGraphParser(), SceneGraphParser)


# --------------------------------------------------------------------------- compression


def clustered_embeddings(
    count: int, dim: int = 8, clusters: int = 12, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    members = torch.randint(0, clusters, (count,), generator=generator)
    noise = 0.35 * torch.randn(count, dim, generator=generator)
    return normalize_embeddings(centres[members] + noise)


def brute_force_greedy(embeddings: torch.Tensor, threshold: float, order: list[int]) -> list[int]:
    """The paper's walk, literally: keep, then remove the not-yet-visited neighbours."""
    sims = embeddings @ embeddings.T
    removed: set[int] = set()
    visited: set[int] = set()
    kept = []
    for index in order:
        visited.add(index)
        if index in removed:
            continue
        kept.append(index)
        for other in order:
            if other not in visited and sims[index, other] > threshold:
                removed.add(other)
    return kept


@pytest.mark.parametrize("block_size", [1, 5, 64, 1000])
def test_blockwise_compression_equals_brute_force(block_size: int) -> None:
    embeddings = clustered_embeddings(240)
    order = torch.randperm(240, generator=torch.Generator().manual_seed(3))
    kept = greedy_similarity_compression(embeddings, 0.8, order, block_size)
    assert kept.tolist() == brute_force_greedy(embeddings, 0.8, order.tolist())
    assert 12 <= len(kept) < 240  # it compresses, but keeps at least one per cluster


def test_compression_threshold_semantics_by_brute_force() -> None:
    embeddings = clustered_embeddings(300, seed=1)
    tau2 = 0.8
    kept = greedy_similarity_compression(embeddings, tau2, None, block_size=32)
    sims = embeddings @ embeddings.T
    kept_set = set(kept.tolist())
    kept_sims = sims[kept][:, kept].clone().fill_diagonal_(-1)
    assert float(kept_sims.max()) <= tau2  # no kept pair above tau2
    for index in set(range(300)) - kept_set:
        assert float(sims[index, kept].max()) > tau2  # every removed prompt has a kept neighbour


def test_nearest_neighbour_similarity_blockwise_equals_full_matrix() -> None:
    embeddings = clustered_embeddings(101, seed=2)
    full = (embeddings @ embeddings.T).fill_diagonal_(-2).max(dim=1).values
    assert torch.allclose(nearest_neighbour_similarity(embeddings, block_size=7), full, atol=1e-6)
    queries = torch.tensor([0, 50, 100])
    sub = nearest_neighbour_similarity(embeddings, queries, block_size=16)
    assert torch.allclose(sub, full[queries], atol=1e-6)
    with pytest.raises(SelectionError, match="at least 2 rows"):
        nearest_neighbour_similarity(embeddings[:1])


def test_compression_rejects_bad_input() -> None:
    with pytest.raises(SelectionError, match="threshold"):
        greedy_similarity_compression(clustered_embeddings(4), 1.5)
    with pytest.raises(SelectionError, match="row 1 has non-finite"):
        normalize_embeddings(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))


# --------------------------------------------------------------------------- selection


def vector_embedder(table: dict[str, torch.Tensor]):
    return lambda prompts: torch.stack([table[p] for p in prompts])


def test_select_prompts_filters_compresses_samples_and_is_deterministic() -> None:
    prompts = toy_prompts(400, seed=5, bare_fraction=0.25)
    embeddings = clustered_embeddings(400, seed=4)
    embed = vector_embedder(dict(zip(prompts, embeddings, strict=False)))
    # toy_prompts may repeat a caption; the table then holds its last vector, which is fine
    config = CurateConfig(tau1=1, tau2=0.8, num_prompts=10, block_size=50)
    first = select_prompts(prompts, embed, config, seed=7, show_progress=False)
    again = select_prompts(prompts, embed, config, seed=7, show_progress=False)
    other = select_prompts(prompts, embed, config, seed=8, show_progress=False)
    report = first.report
    assert first.indices == again.indices
    assert first.indices != other.indices
    bare = sum(1 for p in prompts if first.scores[prompts.index(p)] == 0)
    assert report.semantic_dropped == bare > 50
    assert all(first.scores[i] >= 1 for i in first.indices)
    assert report.selected == len(first.indices) == 10 and report.shortfall == 0
    assert report.mean_nn_similarity_after_compression < report.mean_nn_similarity_before
    assert report.max_nn_similarity_after_compression <= 0.8
    assert report.compression_passes == 1
    # How many queries the similarity report samples does not change the selection.
    sampled = select_prompts(
        prompts, embed, config.model_copy(update={"nn_queries": 20}), seed=7, show_progress=False
    )
    assert sampled.indices == first.indices
    assert sampled.report.mean_nn_similarity_before != report.mean_nn_similarity_before


def test_select_prompts_reports_shortfall_when_few_prompts_survive(caplog) -> None:
    prompts = ["a red circle on a dark background", "a blue square on a gray background", "a cat"]
    same = torch.ones(3, 4)
    config = CurateConfig(num_prompts=5)
    result = select_prompts(prompts, lambda p: same[: len(p)], config, seed=0, show_progress=False)
    assert result.report.semantic_dropped == 1  # "a cat"
    assert result.report.kept_after_compression == 1  # identical embeddings
    assert result.report.shortfall == 4
    assert "kept 1 prompts, fewer than curate.num_prompts=5: 1 of 2 survived" in caplog.text


def test_mean_nearest_neighbour_similarity_samples_queries_above_the_limit() -> None:
    embeddings = clustered_embeddings(200, seed=6)
    exact, _, used = mean_nearest_neighbour_similarity(embeddings, 1000, torch.Generator())
    sampled, _, used_sampled = mean_nearest_neighbour_similarity(
        embeddings, 50, torch.Generator().manual_seed(0)
    )
    assert used == 200 and used_sampled == 50
    assert abs(sampled - exact) < 0.05


# --------------------------------------------------------------------------- embedders


@pytest.fixture(scope="module")
def tiny_text_encoder() -> tuple[object, CLIPTextModel]:
    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=16,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    return tokenizer, CLIPTextModel(config).eval()


def test_text_encoder_embedder_means_non_padding_tokens(tiny_text_encoder) -> None:
    tokenizer, encoder = tiny_text_encoder
    embed = text_encoder_embedder(tokenizer, encoder, batch_size=2, show_progress=False)
    prompts = ["a red circle", "a large blue square above a small green triangle"]
    together = embed(prompts)
    alone = embed(prompts[:1])
    assert together.shape == (2, 16)
    assert torch.allclose(together.norm(dim=1), torch.ones(2), atol=1e-5)
    # padding the short prompt to the long one's length does not change its embedding
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    ids = tokenizer(prompts[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    assert torch.allclose(alone[0], expected, atol=1e-5)


def test_faiss_backend_matches_torch_when_installed() -> None:
    pytest.importorskip("faiss")
    embeddings = clustered_embeddings(200, seed=9)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    torch_kept = greedy_similarity_compression(embeddings, 0.8, order, 32, "torch")
    faiss_kept = greedy_similarity_compression(embeddings, 0.8, order, 32, "faiss")
    assert torch_kept.tolist() == faiss_kept.tolist()


@pytest.mark.parametrize("preset", ["toy-sd15", "toy-sdxl"])
def test_base_model_embedder_agrees_with_encode_prompt(preset: str) -> None:
    from unifl.models.base import encode_prompt
    from unifl.models.toy_presets import build_toy_model

    model = build_toy_model(preset, seed=0)
    prompts = ["a red circle on a dark background", "a small blue square above a green triangle"]
    embeddings = base_model_embedder(model, batch_size=1, show_progress=False)(prompts)
    with torch.no_grad():
        conditioning = encode_prompt(model, prompts)
    if preset == "toy-sdxl":
        expected = torch.nn.functional.normalize(conditioning.pooled_prompt_embeds, dim=1)
    else:
        mask = model.tokenizer(prompts, padding="max_length", return_tensors="pt")["attention_mask"]
        summed = (conditioning.prompt_embeds * mask.unsqueeze(-1)).sum(dim=1)
        expected = torch.nn.functional.normalize(summed / mask.sum(dim=1, keepdim=True), dim=1)
    assert torch.allclose(embeddings, expected, atol=1e-5)
