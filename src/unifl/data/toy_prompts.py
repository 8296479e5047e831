"""Synthetic prompts of the toy world: the embedded default source and the benchmark's input.

Captions are drawn straight from the toy caption grammar
(`unifl.toy.world.format_caption`) without placing objects, so millions can be
made in seconds, every word is in the toy tokenizer's vocabulary, and each
caption obeys the world's rules (one to three objects, no two with the same
shape and colour, relations from the subject). A share of *bare* prompts
("a circle", "a shape on a dark background") stands in for the attribute-poor
prompts that the semantic filter is there to drop.
"""

from __future__ import annotations

import numpy as np

from unifl.toy.vocabulary import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES
from unifl.toy.world import ParsedCaption, format_caption

_SIZE_CHOICES: tuple[str | None, ...] = (SIZES[0], None, SIZES[1])


def toy_caption(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3) -> str:
    """One caption of the toy grammar with random objects, relations and background."""
    count = int(rng.integers(min_objects, max_objects + 1))
    classes = rng.choice(len(SHAPES) * len(COLORS), size=count, replace=False)
    objects = tuple(
        (
            _SIZE_CHOICES[int(rng.integers(len(_SIZE_CHOICES)))],
            COLORS[int(c) % len(COLORS)],
            SHAPES[int(c) // len(COLORS)],
        )
        for c in classes
    )
    relations = tuple((0, RELATIONS[int(rng.integers(len(RELATIONS)))], j) for j in range(1, count))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return format_caption(ParsedCaption(objects, relations, background))


def bare_prompt(rng: np.random.Generator) -> str:
    """A prompt without attributes or relations (semantic score 0)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if rng.random() < 0.5:
        return f"a {shape}"
    return f"{shape} and {SHAPES[int(rng.integers(len(SHAPES)))]}"


def toy_prompts(
    count: int,
    seed: int,
    min_objects: int = 1,
    max_objects: int = 3,
    bare_fraction: float = 0.0,
) -> list[str]:
    """`count` synthetic prompts; the same `seed` gives the same list.

    `bare_fraction` of them (at random positions) are bare prompts that the
    semantic filter drops at `tau1 >= 1`.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0.0 <= bare_fraction <= 1.0:
        raise ValueError(f"bare_fraction must be in [0, 1], got {bare_fraction}")
    rng = np.random.default_rng(seed)
    bare = rng.random(count) < bare_fraction
    return [
        bare_prompt(rng) if is_bare else toy_caption(rng, min_objects, max_objects)
        for is_bare in bare
    ]
