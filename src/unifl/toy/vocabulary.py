"""Words of the toy world's caption grammar: the toy tokenizer's vocabulary.

The caption generator (`unifl.toy.world`) uses only these words, so the toy
text encoders never meet an unknown token on toy captions.
"""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of", "next to")
BACKGROUNDS: tuple[str, ...] = ("dark", "bright", "gray", "striped", "noisy")

FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "and", "on", "the", "background", "with")


def vocabulary() -> list[str]:
    """Every word a toy caption can contain, sorted and without duplicates."""
    words: set[str] = set(FUNCTION_WORDS)
    for group in (SHAPES, COLORS, SIZES, BACKGROUNDS):
        words.update(group)
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)
