"""Why the layout reward model stays at chance: what the toy CLIP tells apart, and a head on patches.

    python benchmarks/layout_reward.py [--negative-steps 2000] [--mirror-steps 3000] [--data DIR]
    python benchmarks/layout_reward.py --matching-steps 3000 [--matching-features clip pixels]
    python benchmarks/layout_reward.py --matching-steps 3000 --matching-head grounded --data DIR

Caption tests. For the bootstrap's pretrained toy CLIP (`bootstrap.clip_steps`),
and with `--negative-steps N` for a toy CLIP trained N steps on the same images
with a changed caption of every image added to each batch as a hard negative
(the same seed, batch size and learning rate), and with `--mirror-steps N`
for one trained N steps on batches whose second half is the first half
mirrored left to right with "left of" and "right of" exchanged in the
captions (the same scenes with the one relation reversed), it prints on training and on
held-out images the image-to-caption retrieval top-1 and, for each way of
changing a caption, the share of images whose own caption scores higher than
the changed one (0.5: the CLIP cannot tell them apart):

* `color`: one object's colour replaced by another;
* `shape`: one object's shape replaced by another;
* `left/right`: one "left of" made "right of" or the other way round;
* `above/below`: one "above" made "below" or the other way round;
* `swap`: the subject and another object swapped, which also reverses their relation.

Layout asks for the last three. With `--matching-steps N`, the same tests for
an image-text matching head on the bootstrap's frozen CLIP (`MatchingHead`: the
caption's tokens attend to each other and over the image's patch tokens), trained N
steps on the training images to score each image's own caption above a changed
one (one change of the five per image, drawn among those its caption allows;
logistic loss on the difference), so that the supervision is as dense as the
training set rather than as the labelled pairs. `--matching-features pixels`
trains the same head on the raw 4x4 pixel patches instead (both: `clip
pixels`), where every object's place is plain: the control that tells whether
the CLIP's features or the head's learning is what stops it. `--matching-scenes N`
trains it on N scenes instead of the training images: the first N of them, or
all and the training seed's next images (generated, none of them held out).
`--matching-head grounded` trains `GroundedHead` instead (both: `matching
grounded`): each entity of the caption's scene graph (`RuleBasedSceneGraphParser`)
is found on the patch grid, which gives it a position and a presence, and
each relation scores the offset between its two entities' positions, so that
comparing positions by the relation word is built in rather than learned.
With `--data DIR` as well, DIR's decided layout pairs are sorted by where
the oracle's gap comes from (more of the caption's objects present; the same
objects with more relations true; composition alone, on the segmenter's
masks as the oracle reads them) and each matching head's preference is
compared with each kind: the heads learned from caption changes alone, never
from the labels.

Head test, with `--data DIR` (a toy table's data
directory): three layout heads on the bootstrap's CLIP, frozen, trained on DIR's
layout labels with the reward stage's Bradley-Terry loss (ties soft), epochs,
batch size and learning rate, over `--seeds`, on DIR's own validation prompts
(`reward/split.json`): the reward model's head on the pooled embeddings
`[i, t, i*t]`, a cross-attention head in which the caption's tokens attend
over the image's patch tokens (with learned patch positions), so that it can
see where the objects are, and `GroundedHead` on the patch tokens. For each: held-out accuracy against the labels,
and on the pairs with an oracle gap how often it prefers the image the oracle
scores higher, on training and on validation prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from label_agreement import oracle_gaps
from toy_table import toy_arguments

CHANGES = ("color", "shape", "left/right", "above/below", "swap")
FLIPS = {
    "left/right": {"left of": "right of", "right of": "left of"},
    "above/below": {"above": "below", "below": "above"},
}


def mirrored_caption(caption: str) -> str:
    """The caption of the scene mirrored left to right: "left of" and "right of" exchanged."""
    from unifl.toy.world import ParsedCaption, format_caption, parse_caption

    parsed = parse_caption(caption)
    flip = FLIPS["left/right"]
    relations = tuple((i, flip.get(word, word), j) for i, word, j in parsed.relations)
    return format_caption(ParsedCaption(parsed.objects, relations, parsed.background))


def changed_caption(caption: str, change: str, rng: random.Random) -> str | None:
    """`caption` with one `change` (see the module docstring); None where it has none to make."""
    from unifl.toy.vocabulary import COLORS, SHAPES
    from unifl.toy.world import ParsedCaption, format_caption, parse_caption

    parsed = parse_caption(caption)
    objects, relations = list(parsed.objects), list(parsed.relations)
    if change in ("color", "shape"):
        number = rng.randrange(len(objects))
        size, color, shape = objects[number]
        if change == "color":
            color = rng.choice([other for other in COLORS if other != color])
        else:
            shape = rng.choice([other for other in SHAPES if other != shape])
        objects[number] = (size, color, shape)
    elif change in FLIPS:
        flip = FLIPS[change]
        flippable = [n for n, (_, word, _) in enumerate(relations) if word in flip]
        if not flippable:
            return None
        number = rng.choice(flippable)
        subject, word, other = relations[number]
        relations[number] = (subject, flip[word], other)
    elif change == "swap":
        if len(objects) < 2:
            return None
        other = rng.randrange(1, len(objects))
        objects[0], objects[other] = objects[other], objects[0]
    else:
        raise ValueError(f"unknown change {change!r}; choose from {CHANGES}")
    changed = format_caption(ParsedCaption(tuple(objects), tuple(relations), parsed.background))
    return None if changed == caption else changed


def change_pairs(
    captions: list[str], change: str, rng: random.Random
) -> tuple[torch.Tensor, list[str]]:
    """The rows of the captions that allow `change`, and each one's changed caption."""
    pairs = [
        (number, changed)
        for number, caption in enumerate(captions)
        if (changed := changed_caption(caption, change, rng)) is not None
    ]
    return torch.tensor([number for number, _ in pairs]), [changed for _, changed in pairs]


def caption_tests(model, images: torch.Tensor, captions: list[str], seed: int) -> dict[str, dict]:
    """Retrieval top-1 and, per change, {share own > changed, images} for a reward-model wrapper."""
    from unifl.toy.clip import retrieval_accuracy

    def text(batch: list[str]) -> torch.Tensor:
        tokens = model.tokenize(batch)
        return F.normalize(model.encode_text(tokens["input_ids"], tokens["attention_mask"]), dim=-1)

    rng = random.Random(seed)
    with torch.no_grad():
        image_embeds = F.normalize(model.encode_images(images), dim=-1)
        own = text(captions)
        retrieval, chance = retrieval_accuracy(image_embeds, own, captions)
        result = {"retrieval": {"share": retrieval, "chance": chance, "images": len(captions)}}
        for change in CHANGES:
            rows, changed = change_pairs(captions, change, rng)
            other = text(changed)
            wins = (image_embeds[rows] * own[rows]).sum(-1) > (image_embeds[rows] * other).sum(-1)
            result[change] = {"share": wins.float().mean().item(), "images": len(changed)}
    return result


def train_clip(params, steps: int, batch_of):
    """The bootstrap's toy CLIP recipe on the batches `batch_of(index)` gives.

    `batch_of(index)` returns (images, captions, negative captions): the
    negatives are extra captions that match none of the images.
    """
    from unifl.models.minibatch import train_on_minibatches
    from unifl.models.reward import build_toy_reward_model
    from unifl.toy.clip import contrastive_loss

    boot, seed = params.bootstrap, params.project.seed
    model = build_toy_reward_model(image_size=params.toy.resolution, seed=seed, head_hidden_dim=1)
    clip = model.backbone

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        images, captions, negatives = batch_of(index)
        tokens = model.tokenize(captions + negatives)
        text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        return contrastive_loss(
            model.encode_images(images),
            text_embeds[: len(captions)],
            captions,
            clip.logit_scale.exp(),
            negative_text_embeds=text_embeds[len(captions) :],
        )

    clip.train()
    train_on_minibatches(
        clip.parameters(),
        loss_of,
        params.toy.num_train,
        steps,
        boot.clip_batch_size,
        boot.clip_learning_rate,
        weight_decay=0.01,
        generator=torch.Generator().manual_seed(seed),
        description="toy CLIP",
    )
    clip.eval()
    return model.eval()


def with_negatives(images: torch.Tensor, captions: list[str], seed: int):
    """Batches with one changed caption per image as a hard negative."""
    rng = random.Random(seed)

    def batch_of(index: torch.Tensor):
        batch = [captions[i] for i in index.tolist()]
        own = set(batch)
        changed = [changed_caption(caption, rng.choice(CHANGES), rng) for caption in batch]
        negatives = [caption for caption in changed if caption is not None and caption not in own]
        return images[index], batch, negatives

    return batch_of


def with_mirrors(images: torch.Tensor, captions: list[str]):
    """Batches of half the images and the same images mirrored left to right."""
    mirrored = [mirrored_caption(caption) for caption in captions]

    def batch_of(index: torch.Tensor):
        half = index[: max(1, len(index) // 2)].tolist()
        pictures = torch.cat([images[half], images[half].flip(-1)])
        return pictures, [captions[i] for i in half] + [mirrored[i] for i in half], []

    return batch_of


class CrossAttentionHead(nn.Module):
    """The caption's token states attend over the image's patch tokens; mean over the caption."""

    def __init__(self, text_width: int, image_width: int, patches: int, width: int = 32) -> None:
        super().__init__()
        self.query = nn.Linear(text_width, width)
        self.key_value = nn.Linear(image_width, width)
        self.positions = nn.Parameter(torch.zeros(1, patches, width))
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.feed_forward = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.out = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, 1)
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = self.key_value(features["patches"]) + self.positions
        states = self.query(features["tokens"])
        mask = features["mask"].unsqueeze(-1).to(states.dtype)
        attended = self.attention(self.norm(states), patches, patches, need_weights=False)[0]
        states = states + attended
        states = states + self.feed_forward(states)
        pooled = (states * mask).sum(1) / mask.sum(1)
        return self.out(pooled).squeeze(-1)


class MatchingHead(nn.Module):
    """An image-text matching head: the caption's tokens attend to each other and to the patches.

    Transformer decoder layers over the caption's token states (self-attention,
    then cross-attention over the image's patch tokens with learned patch
    positions, then a feed-forward), mean over the caption, a score. Unlike
    `CrossAttentionHead`, the caption's words see each other after looking at
    the image, so "left of" can compare where its subject and its object are.
    """

    def __init__(
        self, text_width: int, image_width: int, patches: int, width: int = 64, layers: int = 2
    ) -> None:
        super().__init__()
        self.query = nn.Linear(text_width, width)
        self.key_value = nn.Linear(image_width, width)
        self.positions = nn.Parameter(torch.zeros(1, patches, width))
        layer = nn.TransformerDecoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, 1)
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = self.key_value(features["patches"]) + self.positions
        mask = features["mask"]
        states = self.decoder(self.query(features["tokens"]), patches, tgt_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(states.dtype)
        return self.out((states * weights).sum(1) / weights.sum(1)).squeeze(-1)


class PhraseTable:
    """The frozen CLIP text tower's embedding of each scene-graph phrase, by phrase.

    A phrase is an entity's words ("small red circle") or a relation's
    ("left of"); its embedding is the mean of its token states. Embedded once,
    when first asked for.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.rows: dict[str, int] = {}
        self.embeddings: list[torch.Tensor] = []

    def ids(self, phrases: list[str]) -> list[int]:
        new = [phrase for phrase in dict.fromkeys(phrases) if phrase not in self.rows]
        if new:
            text = frozen_text_features(self.model, new)
            weights = text["mask"].unsqueeze(-1).to(text["tokens"].dtype)
            means = (text["tokens"] * weights).sum(1) / weights.sum(1)
            for phrase, embedding in zip(new, means, strict=True):
                self.rows[phrase] = len(self.embeddings)
                self.embeddings.append(embedding)
        return [self.rows[phrase] for phrase in phrases]

    def table(self) -> torch.Tensor:
        return torch.stack(self.embeddings)


def scene_structure(
    captions: list[str], phrases: PhraseTable, entities: int = 4, relations: int = 3
) -> dict[str, torch.Tensor]:
    """Each caption's scene graph (`RuleBasedSceneGraphParser`) as padded phrase rows.

    `entities` [N, E] and `relations` [N, R, 3] (subject, object, predicate
    phrase) index `phrases.table()`, with their masks.
    """
    from unifl.data.scene_graph import RuleBasedSceneGraphParser

    parser = RuleBasedSceneGraphParser()
    entity_ids = torch.zeros(len(captions), entities, dtype=torch.long)
    entity_mask = torch.zeros(len(captions), entities, dtype=torch.bool)
    relation_ids = torch.zeros(len(captions), relations, 3, dtype=torch.long)
    relation_mask = torch.zeros(len(captions), relations, dtype=torch.bool)
    for number, caption in enumerate(captions):
        graph = parser.parse(caption)
        if not graph.entities:
            raise ValueError(f"caption {number} {caption!r} has no entity to ground")
        words = [" ".join((*entity.attributes, entity.name)) for entity in graph.entities]
        ids = phrases.ids(words[:entities])
        entity_ids[number, : len(ids)] = torch.tensor(ids)
        entity_mask[number, : len(ids)] = True
        kept = [r for r in graph.relations if max(r.subject, r.object) < entities][:relations]
        for slot, relation in enumerate(kept):
            predicate = phrases.ids([relation.predicate])[0]
            relation_ids[number, slot] = torch.tensor(
                [relation.subject, relation.object, predicate]
            )
            relation_mask[number, slot] = True
    return {
        "entities": entity_ids,
        "entity_mask": entity_mask,
        "relations": relation_ids,
        "relation_mask": relation_mask,
    }


class GroundedHead(nn.Module):
    """Each entity of the caption found on the patch grid, each relation checked on its position.

    An entity's phrase embedding is a query over the patches' keys (a linear
    map, a 3x3 convolution over the grid for context, another linear map): the
    softmax of the logits places it at the weighted mean of the patch centres
    (x, y in [0, 1]), and their log-mean-exp is how present it is. A
    relation's phrase embedding gives five weights for the offset from its
    subject to its object, (dx, dy, |dx|, |dy|, 1), so that "left of" can ask
    for dx > 0 and "next to" for |dx| large and |dy| small. The score is the
    entities' mean presence plus the relations' mean offset score (the toy
    captions' background is an entity like the objects). What the
    head cannot do is built out: it compares positions only through the
    relation words, and reads nothing else of the image than where each
    entity is and how strongly.
    """

    def __init__(self, text_width: int, patch_width: int, grid: int, width: int = 64) -> None:
        super().__init__()
        self.grid = grid
        self.patch_in = nn.Linear(patch_width, width)
        self.context = nn.Conv2d(width, width, 3, padding=1)
        self.key = nn.Linear(width, width)
        self.query = nn.Sequential(nn.Linear(text_width, width), nn.GELU(), nn.Linear(width, width))
        self.offset_weights = nn.Sequential(
            nn.Linear(text_width, width), nn.GELU(), nn.Linear(width, 5)
        )
        self.presence = nn.Parameter(torch.tensor([1.0, 0.0]))
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        centres = torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5], dim=-1) / grid
        self.register_buffer("centres", centres)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        patches = features["patches"]
        if patches.shape[1] == self.grid**2 + 1:  # a ViT's class token first
            patches = patches[:, 1:]
        count = patches.shape[0]
        hidden = F.gelu(self.patch_in(patches)).transpose(1, 2)
        hidden = hidden.reshape(count, -1, self.grid, self.grid)
        hidden = F.gelu(hidden + self.context(hidden)).flatten(2).transpose(1, 2)
        keys = self.key(hidden)
        table = features["phrases"]
        queries = self.query(table[features["entities"]])
        logits = queries @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        positions = logits.softmax(-1) @ self.centres
        presence = torch.logsumexp(logits, -1) - math.log(keys.shape[1])
        presence = self.presence[0] * presence + self.presence[1]
        entity_mask = features["entity_mask"].to(presence.dtype)
        score = (presence * entity_mask).sum(1) / entity_mask.sum(1).clamp_min(1)
        relations = features["relations"]

        def place(column: int) -> torch.Tensor:
            return positions.gather(1, relations[..., column : column + 1].expand(-1, -1, 2))

        offset = place(1) - place(0)
        terms = torch.cat([offset, offset.abs(), torch.ones_like(offset[..., :1])], dim=-1)
        # Offsets are fractions of the image: scaled so that a relation's check starts on the
        # scale of a presence logit.
        checks = (self.offset_weights(table[relations[..., 2]]) * terms).sum(-1) * 10
        relation_mask = features["relation_mask"].to(checks.dtype)
        return score + (checks * relation_mask).sum(1) / relation_mask.sum(1).clamp_min(1)


class PooledHead(nn.Module):
    """The reward model's own head on `[i, t, i*t]` of the pooled, projected embeddings."""

    def __init__(self, projection_dim: int, hidden: int) -> None:
        super().__init__()
        from unifl.models.reward import RewardHead

        self.head = RewardHead(3 * projection_dim, hidden)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        from unifl.models.reward import fuse_features

        return self.head(fuse_features(features["image"], features["text"])).squeeze(-1)


def frozen_image_features(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the pooled, projected embedding and the patch tokens of the frozen CLIP."""
    clip = model.backbone
    with torch.no_grad():
        vision = clip.vision_model(pixel_values=model.preprocess(images))
        return {
            "image": clip.visual_projection(vision.pooler_output),
            "patches": clip.vision_model.post_layernorm(vision.last_hidden_state),
        }


def frozen_text_features(model, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per prompt: the pooled, projected embedding, the token states and their mask."""
    clip = model.backbone
    with torch.no_grad():
        tokens = model.tokenize(prompts)
        text = clip.text_model(**tokens)
        return {
            "text": clip.text_projection(text.pooler_output),
            "tokens": text.last_hidden_state,
            "mask": tokens["attention_mask"].bool(),
        }


def changed_captions(captions: list[str], rng: random.Random) -> list[str]:
    """One changed caption per caption: a change drawn among those the caption allows."""
    changed = []
    for caption in captions:
        for change in rng.sample(CHANGES, len(CHANGES)):
            if (other := changed_caption(caption, change, rng)) is not None:
                changed.append(other)
                break
    return changed


def pixel_patches(images: torch.Tensor, size: int = 4) -> torch.Tensor:
    """[N, patches, 3 * size * size]: the images' non-overlapping size x size patches, in [-1, 1]."""
    patches = F.unfold(images * 2 - 1, kernel_size=size, stride=size)
    return patches.transpose(1, 2)


HEADS = ("matching", "grounded")


def caption_scorer(kind: str, model, patches: torch.Tensor):
    """An untrained head of `kind` (`HEADS`) for patch tokens shaped like `patches`, and its
    `score(patches, captions)`, the caption side read by `model`'s frozen CLIP text tower."""
    text_width = model.backbone.config.text_config.hidden_size
    if kind == "matching":
        head = MatchingHead(text_width, patches.shape[-1], patches.shape[1])

        def score(image_patches: torch.Tensor, texts: list[str]) -> torch.Tensor:
            return head({"patches": image_patches, **frozen_text_features(model, texts)})

    elif kind == "grounded":
        head = GroundedHead(text_width, patches.shape[-1], math.isqrt(patches.shape[1]))
        phrases = PhraseTable(model)

        def score(image_patches: torch.Tensor, texts: list[str]) -> torch.Tensor:
            structure = scene_structure(texts, phrases)
            return head({"patches": image_patches, **structure, "phrases": phrases.table()})

    else:
        raise ValueError(f"unknown head {kind!r}; choose from {HEADS}")
    return head, score


def train_matching_head(
    model,
    patches_of,
    images: torch.Tensor,
    captions: list[str],
    steps: int,
    seed: int,
    kind: str = "matching",
):
    """A head of `kind` (`caption_scorer`) on `patches_of(images)` scoring own captions above
    changed ones. Returns the trained head's `score(patches, captions)`."""
    from unifl.models.minibatch import train_on_minibatches

    patches = patches_of(images)
    torch.manual_seed(seed)
    head, score = caption_scorer(kind, model, patches)
    rng = random.Random(seed)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        own = [captions[i] for i in index.tolist()]
        margin = score(patches[index], own) - score(patches[index], changed_captions(own, rng))
        return F.softplus(-margin).mean()

    head.train()
    train_on_minibatches(
        head.parameters(),
        loss_of,
        len(captions),
        steps,
        128,
        1e-3,
        weight_decay=0.01,
        generator=torch.Generator().manual_seed(seed),
        description=f"{kind} head",
    )
    head.eval()
    return score


def matching_tests(score, patches: torch.Tensor, captions: list[str], seed: int) -> dict:
    """Per change, {share own > changed, images} for the matching head's `score` of `patches`."""
    rng = random.Random(seed)
    result = {}
    with torch.no_grad():
        for change in CHANGES:
            rows, changed = change_pairs(captions, change, rng)
            own = score(patches[rows], [captions[number] for number in rows.tolist()])
            other = score(patches[rows], changed)
            result[change] = {"share": (own > other).float().mean().item(), "images": len(changed)}
    return result


GAP_KINDS = ("objects present differ", "same objects, relations differ", "composition only")


def layout_gap_kinds(params, data: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """DATA's decided layout pairs sorted by what their oracle gap comes from.

    Returns the pairs' preferred images, other images (tensors) and prompts, and per
    `GAP_KINDS` entry the rows of that kind and the sign of the gap that
    kind is about (more objects present; then more relations true; then the
    oracle's layout gap), on the segmenter's masks as the oracle reads them.
    """
    import numpy as np
    import pandas as pd

    from unifl.feedback.images import ImageStore
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.bootstrap import bootstrap_toy_world
    from unifl.toy.caption_match import predicted_masks
    from unifl.toy.oracle import layout_parts

    table = pd.read_parquet(data / "labels" / "pairs.parquet")
    table = table[(table["dimension"] == "layout") & ~table["tie"]].reset_index(drop=True)
    segmenter = ToySegmenter.load(bootstrap_toy_world(params, progress=False).segmenter_dir)
    store = ImageStore(data / "pairs")
    prompts = list(table["prompt"])

    images = {side: store.batch(list(table[side])) for side in ("image_w", "image_l")}
    preferred, other = (
        layout_parts(prompts, predicted_masks(segmenter, images[side]))
        for side in ("image_w", "image_l")
    )
    gap = {key: (preferred[key] - other[key]).numpy() for key in preferred}
    objects = gap["objects_present"] != 0
    relations = ~objects & (gap["relations_hold"] != 0)
    composition = ~objects & ~relations & (gap["layout"] != 0)
    kinds = {
        GAP_KINDS[0]: (objects, np.sign(gap["objects_present"])),
        GAP_KINDS[1]: (relations, np.sign(gap["relations_hold"])),
        GAP_KINDS[2]: (composition, np.sign(gap["layout"])),
    }
    return images["image_w"], images["image_l"], prompts, kinds


def head_tests(params, data: Path, model, seeds: list[int]) -> dict[str, list[dict]]:
    """Layout heads on `model`'s frozen CLIP over seeds: {head: [{accuracy, oracle_val, oracle_train}]}."""
    import numpy as np
    import pandas as pd

    from unifl.feedback.images import ImageStore
    from unifl.feedback.reward_training import bradley_terry_loss

    config = params.reward
    table = pd.read_parquet(data / "labels" / "pairs.parquet")
    table = table[table["dimension"] == "layout"].reset_index(drop=True)
    val_prompts = set(json.loads((data / "reward" / "split.json").read_text())["val_prompts"])
    is_val = table["prompt"].isin(val_prompts).to_numpy()
    tie = torch.tensor(table["tie"].to_numpy(bool))
    weight = torch.tensor(table["weight"].to_numpy(float), dtype=torch.float32)

    oracle_gap = oracle_gaps(params, data / "pairs", table)
    prompts = list(table["prompt"])

    paths = sorted(set(table["image_w"]) | set(table["image_l"]))
    image_row = {path: number for number, path in enumerate(paths)}
    distinct = sorted(set(prompts))
    prompt_row = {prompt: number for number, prompt in enumerate(distinct)}
    store = ImageStore(data / "pairs")
    image_side = frozen_image_features(model, store.batch(paths))
    text_side = frozen_text_features(model, distinct)
    phrases = PhraseTable(model)
    text_side.update(scene_structure(distinct, phrases))
    phrase_table = phrases.table()  # every prompt's phrases are in it now
    winner = torch.tensor([image_row[path] for path in table["image_w"]])
    loser = torch.tensor([image_row[path] for path in table["image_l"]])
    prompt = torch.tensor([prompt_row[text] for text in prompts])

    def features(images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        picked = {key: value[images] for key, value in image_side.items()}
        picked |= {key: value[texts] for key, value in text_side.items()}
        return {**picked, "phrases": phrase_table}

    heads = {
        "pooled [i, t, i*t]": lambda: PooledHead(
            image_side["image"].shape[-1], config.head_hidden_dim
        ),
        "cross-attention on patches": lambda: CrossAttentionHead(
            text_side["tokens"].shape[-1],
            image_side["patches"].shape[-1],
            image_side["patches"].shape[1],
        ),
        "grounded (entity positions, relation offsets)": lambda: GroundedHead(
            text_side["tokens"].shape[-1],
            image_side["patches"].shape[-1],
            math.isqrt(image_side["patches"].shape[1]),
        ),
    }
    train_rows = np.flatnonzero(~is_val)
    decided = ~tie.numpy()
    results: dict[str, list[dict]] = {}
    for name, build in heads.items():
        results[name] = []
        for seed in seeds:
            torch.manual_seed(seed)
            head = build()
            optimizer = torch.optim.AdamW(
                head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
            )
            order = np.random.default_rng(seed)
            for _ in range(config.epochs):
                shuffled = order.permutation(train_rows)
                for start in range(0, len(shuffled), config.batch_size):
                    rows = torch.from_numpy(shuffled[start : start + config.batch_size])
                    loss = bradley_terry_loss(
                        head(features(winner[rows], prompt[rows])),
                        head(features(loser[rows], prompt[rows])),
                        tie[rows],
                        weight[rows],
                        tie_rule=config.tie_rule,
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                margin = (head(features(winner, prompt)) - head(features(loser, prompt))).numpy()
            agrees = np.sign(margin) == np.sign(oracle_gap)
            gap = decided & (oracle_gap != 0)
            results[name].append(
                {
                    "accuracy": float((margin > 0)[is_val & decided].mean()),
                    "oracle_val": float(agrees[gap & is_val].mean()),
                    "oracle_train": float(agrees[gap & ~is_val].mean()),
                    "val_pairs": int((gap & is_val).sum()),
                    "train_pairs": int((gap & ~is_val).sum()),
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    toy_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument(
        "--negative-steps", type=int, default=0, help="also train a CLIP with hard negatives"
    )
    parser.add_argument(
        "--mirror-steps", type=int, default=0, help="also train a CLIP with mirrored scenes"
    )
    parser.add_argument(
        "--matching-steps",
        type=int,
        default=0,
        help="also train a matching head on the bootstrap CLIP's patch tokens",
    )
    parser.add_argument(
        "--matching-features",
        nargs="+",
        choices=["clip", "pixels"],
        default=["clip"],
        help="what the matching head attends over: the CLIP's patch tokens, the raw 4x4 patches",
    )
    parser.add_argument(
        "--matching-head",
        nargs="+",
        choices=HEADS,
        default=["matching"],
        help="the matching head: transformer-decoder layers over the caption's tokens, or one "
        "that finds each scene-graph entity on the patch grid and checks each relation on the "
        "positions (both: matching grounded)",
    )
    parser.add_argument(
        "--matching-scenes",
        type=int,
        default=None,
        help="train the matching head on this many scenes: the first of the bootstrap's "
        "training images, then the training seed's next ones (default: the training images)",
    )
    parser.add_argument("--data", type=Path, default=None, help="a toy table's data directory")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("runs/layout_reward"))
    args = parser.parse_args(argv)
    if args.matching_scenes is not None and args.matching_scenes < 1:
        parser.error(f"--matching-scenes must be at least 1, got {args.matching_scenes}")

    from unifl.config import load_params
    from unifl.models.precision import apply_num_threads
    from unifl.models.reward import load_pretrained_reward_backbone
    from unifl.toy.bootstrap import bootstrap_toy_world
    from unifl.toy.dataset import load_toy_arrays

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    started = time.perf_counter()
    boot = bootstrap_toy_world(params)
    if boot.clip_dir is None:
        parser.error("bootstrap.clip_steps is 0: there is no pretrained toy CLIP to test")
    train = load_toy_arrays(boot.train_data_dir)
    held_out = load_toy_arrays(boot.eval_data_dir)
    images, captions = train.image_tensor(), train.captions
    sets = {
        f"training images (first {args.train_images})": (
            images[: args.train_images],
            captions[: args.train_images],
        ),
        "held-out images": (held_out.image_tensor(), held_out.captions),
    }
    bootstrap_clip = load_pretrained_reward_backbone(str(boot.clip_dir), head_hidden_dim=1)
    clips = {f"bootstrap CLIP ({params.bootstrap.clip_steps} steps)": bootstrap_clip}
    if args.negative_steps:
        clips[f"with hard negatives ({args.negative_steps} steps)"] = train_clip(
            params, args.negative_steps, with_negatives(images, captions, params.project.seed)
        )
    if args.mirror_steps:
        clips[f"with mirrored scenes ({args.mirror_steps} steps)"] = train_clip(
            params, args.mirror_steps, with_mirrors(images, captions)
        )
    record: dict = {"captions": {}}
    lines = ["| CLIP | images | retrieval top-1 | " + " | ".join(CHANGES) + " |"]
    lines.append("|---" * (3 + len(CHANGES)) + "|")
    for clip_name, model in clips.items():
        for set_name, (set_images, set_captions) in sets.items():
            tests = caption_tests(model, set_images, set_captions, params.project.seed)
            record["captions"][f"{clip_name}, {set_name}"] = tests
            cells = " | ".join(
                f"{tests[change]['share']:.3f} ({tests[change]['images']})" for change in CHANGES
            )
            retrieval = tests["retrieval"]
            lines.append(
                f"| {clip_name} | {set_name} | {retrieval['share']:.3f} "
                f"(chance {retrieval['chance']:.3f}) | {cells} |"
            )

    def clip_patches(batch: torch.Tensor) -> torch.Tensor:
        return frozen_image_features(bootstrap_clip, batch)["patches"]

    features = {
        "clip": ("the bootstrap CLIP's patches", clip_patches),
        "pixels": ("raw 4x4 pixel patches", pixel_patches),
    }

    scenes = args.matching_scenes or len(captions)
    scene_images, scene_captions = images[:scenes], captions[:scenes]
    if scenes > len(captions):
        from unifl.toy.dataset import generate_toy_batch

        toy = params.toy
        more = generate_toy_batch(
            scenes - len(captions),
            toy.seed,
            toy.resolution,
            toy.min_objects,
            toy.max_objects,
            start_index=len(captions),
        )
        scene_images = torch.cat([images, more.image_tensor()])
        scene_captions = captions + more.captions
    scorers = {}
    runs = [(f, k) for f in args.matching_features for k in args.matching_head]
    for feature, kind in runs if args.matching_steps else []:
        label, patches_of = features[feature]
        score = train_matching_head(
            bootstrap_clip,
            patches_of,
            scene_images,
            scene_captions,
            args.matching_steps,
            params.project.seed,
            kind=kind,
        )
        name = f"{kind} head on {label} ({args.matching_steps} steps, {len(scene_captions)} scenes)"
        scorers[name] = (score, patches_of)
        for set_name, (set_images, set_captions) in sets.items():
            tests = matching_tests(score, patches_of(set_images), set_captions, params.project.seed)
            record["captions"][f"{name}, {set_name}"] = tests
            cells = " | ".join(
                f"{tests[change]['share']:.3f} ({tests[change]['images']})" for change in CHANGES
            )
            lines.append(f"| {name} | {set_name} | | {cells} |")
    lines.append("")
    lines.append("share of images whose own caption scores higher than the changed one (images)")
    if args.data is not None:
        preferred_images, other_images, prompts, kinds = layout_gap_kinds(params, args.data)
        record["gap_kinds"] = {kind: int(rows.sum()) for kind, (rows, _) in kinds.items()}
        lines += [
            "",
            f"{args.data}'s {len(prompts)} decided layout pairs by what the oracle's gap comes "
            "from, and how often each matching head (trained on caption changes alone) "
            "prefers the image that kind of gap favours",
            "",
            "| head | " + " | ".join(f"{k} ({int(r.sum())})" for k, (r, _) in kinds.items()) + " |",
            "|---" * (1 + len(kinds)) + "|",
        ]
        for name, (score, patches_of) in scorers.items():
            with torch.no_grad():
                higher = score(patches_of(preferred_images), prompts)
                margin = (higher - score(patches_of(other_images), prompts)).sign().numpy()
            shares = {
                kind: float((margin == sign)[rows].mean()) for kind, (rows, sign) in kinds.items()
            }
            record["captions"][f"{name}, layout pairs"] = shares
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in shares.values()) + " |")
    if args.data is not None:
        heads = head_tests(params, args.data, bootstrap_clip, args.seeds)
        record["heads"] = heads

        def cell(runs: list[dict], key: str) -> str:
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.3f} ± {spread:.3f}"

        first = next(iter(heads.values()))[0]
        lines += [
            "",
            f"layout heads on the frozen bootstrap CLIP, {args.data}, seeds "
            + " ".join(map(str, args.seeds)),
            "",
            "| head | held-out accuracy | agrees with the oracle, validation "
            f"({first['val_pairs']} pairs) | training ({first['train_pairs']} pairs) |",
            "|---|---|---|---|",
        ]
        for name, runs in heads.items():
            lines.append(
                f"| {name} | {cell(runs, 'accuracy')} | {cell(runs, 'oracle_val')} "
                f"| {cell(runs, 'oracle_train')} |"
            )
    lines.append("")
    lines.append(f"{time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layout_reward.md").write_text(text + "\n")
    (args.out / "layout_reward.json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
