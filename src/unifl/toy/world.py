"""The toy world: procedural scenes of coloured shapes, their pixels, masks and captions.

It is the toy analogue of COCO (image + caption + annotation). Everything is
numpy and deterministic: scene `i` of a seed is the same whatever the batch it
is generated in, because each scene draws from its own generator seeded with
``(seed, i)``.

Geometry is in *normalised* units (fractions of the image side, origin top-left,
``y`` grows downwards), so one scene renders at 32 or 64 pixels alike.

Scene rules (which every caption can rely on):

* 1 to 3 objects; each a shape from `SHAPES` in a colour from `COLORS`, and no
  two objects of a scene share the same (shape, colour) pair, so a semantic
  mask identifies every object (the layout oracle and caption-match rely on it).
* Objects lie inside the frame (`FRAME_BORDER`) and their bounding boxes are
  at least `OBJECT_GAP` apart, so their masks never touch.
* Shapes are axis-aligned: circles, squares, and equilateral triangles with
  a flat base pointing up.
* The size word is a fact: "small" and "large" objects have radii in
  `SIZE_RANGES["small"]` / `["large"]`; an object without a size word is medium.
* Objects 1.. are related to object 0 (the caption's subject) by a word of
  `RELATIONS`, true of the object centroids by `relation_holds` (checked with a
  safety `SAMPLING_SLACK` so that rasterised centroids still satisfy it).
* Backgrounds are achromatic (dark, bright, gray, striped, noisy), objects are
  saturated colours.

Semantic classes: 0 is background, then one class per (shape, colour) pair in
the order of `SHAPES` x `COLORS`: ``class = 1 + shape_index * len(COLORS) +
colour_index`` (see `CLASS_NAMES`). Instance masks number the objects of a
scene 1..k in caption order (0 is background).

Caption grammar (every caption is canonical, `parse_caption` inverts it)::

    caption  := subject [tail] " on a " BACKGROUND " background"
    subject  := object
    tail     := " " RELATION " " object (" and " [RELATION " "] object)*
    object   := "a " [SIZE " "] COLOR " " SHAPE

A relation word after "and" is written only when it differs from the previous
one: "a red circle above a blue square and a green triangle" means the circle
is above both; "... above a blue square and left of a green triangle" gives
each its own relation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from unifl.toy.vocabulary import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES

WORLD_VERSION = 1
"""Bumped whenever sampling or rendering changes, so cached data and models are rebuilt."""

CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(
    f"{color} {shape}" for shape in SHAPES for color in COLORS
)
"""Semantic class names by class id: 'background', then 'red circle', 'green circle', ..."""

NUM_SEMANTIC_CLASSES: int = len(CLASS_NAMES)

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.16, 0.30, 0.90),
    "yellow": (0.93, 0.84, 0.14),
}
"""Nominal object colours in [0, 1]; each object jitters around its colour."""

SIZE_RANGES: dict[str | None, tuple[float, float]] = {
    "small": (0.09, 0.12),
    None: (0.14, 0.18),
    "large": (0.20, 0.25),
}
"""Object radius (fraction of the image side) per size word; None is the unnamed medium size."""

SHAPE_SCALE: dict[str, float] = {"circle": 1.0, "square": 0.85, "triangle": 1.3}
"""Radius -> shape extent: circle radius, square half-side, triangle circumradius.

Chosen so that the three shapes of one radius cover similar areas."""

FRAME_BORDER = 0.03
"""Objects keep at least this distance (fraction of the side) from the image edge."""

OBJECT_GAP = 0.05
"""Bounding boxes of two objects are at least this far apart: at 32 px and above that
leaves at least one background pixel between any two objects' masks, so every object
is its own connected component."""

RELATION_MARGIN = 0.1
"""A directional relation needs the centroids this far apart along its axis."""

NEXT_TO_MAX_DY = 0.12
"""'next to' means side by side: centroids at most this far apart vertically."""

SAMPLING_SLACK = 0.04
"""The sampler makes relations hold by this extra margin, so pixels keep them true."""

_BACKGROUND_LEVELS: dict[str, tuple[float, float]] = {
    "dark": (0.04, 0.18),
    "bright": (0.78, 0.95),
    "gray": (0.40, 0.60),
    "striped": (0.30, 0.70),
    "noisy": (0.30, 0.70),
}
_STRIPE_AMPLITUDE = (0.08, 0.20)
_STRIPE_PERIOD = (0.12, 0.25)
_NOISE_STD = (0.05, 0.12)
_ORIENTATIONS = ("horizontal", "vertical", "diagonal")
_COLOR_JITTER = 0.05
_MAX_ATTEMPTS = 200
_CANDIDATES = 192
_MAX_OFFSET = 0.7

if set(_BACKGROUND_LEVELS) != set(BACKGROUNDS):
    raise RuntimeError("world backgrounds and vocabulary BACKGROUNDS disagree")
if any(size not in SIZE_RANGES for size in SIZES):
    raise RuntimeError("every SIZES word needs a range in SIZE_RANGES")


class CaptionError(ValueError):
    """A caption is not a sentence of the toy grammar; the message names caption and word."""


@dataclass(frozen=True)
class ToyObject:
    """One object: shape, colour, optional size word, centroid and radius (normalised)."""

    shape: str
    color: str
    size: str | None
    x: float
    y: float
    radius: float
    rgb: tuple[float, float, float]

    @property
    def class_id(self) -> int:
        return semantic_class(self.shape, self.color)

    def extents(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) offsets of the shape from its centroid, normalised."""
        return _shape_extents(self.shape, self.radius)

    def bbox(self) -> tuple[float, float, float, float]:
        """Normalised (x0, y0, x1, y1) of the ideal (not rasterised) shape."""
        left, top, right, bottom = self.extents()
        return (self.x - left, self.y - top, self.x + right, self.y + bottom)


@dataclass(frozen=True)
class Background:
    """An achromatic background: a level plus stripes or pixel noise of some amplitude."""

    kind: str
    level: float
    amplitude: float = 0.0
    period: float = 0.0
    orientation: str = ""
    noise_seed: int = 0


@dataclass(frozen=True)
class ParsedCaption:
    """A caption as data: objects (size|None, colour, shape), relations (i, word, j), background."""

    objects: tuple[tuple[str | None, str, str], ...]
    relations: tuple[tuple[int, str, int], ...]
    background: str


@dataclass(frozen=True)
class Scene:
    """Objects (object 0 is the caption's subject), relations to it, and the background."""

    objects: tuple[ToyObject, ...]
    relations: tuple[tuple[int, str, int], ...]
    background: Background

    def parsed(self) -> ParsedCaption:
        return ParsedCaption(
            objects=tuple((o.size, o.color, o.shape) for o in self.objects),
            relations=self.relations,
            background=self.background.kind,
        )

    def caption(self) -> str:
        return format_caption(self.parsed())


@dataclass
class Rendering:
    """Pixels and masks of one scene: image uint8 [H,W,3], masks uint8 [H,W]."""

    image: np.ndarray
    instance_mask: np.ndarray
    semantic_mask: np.ndarray
    scene: Scene = field(repr=False)


def semantic_class(shape: str, color: str) -> int:
    """Class id of a (shape, colour) pair: 1 + shape_index * len(COLORS) + colour_index."""
    try:
        return 1 + SHAPES.index(shape) * len(COLORS) + COLORS.index(color)
    except ValueError:
        raise ValueError(f"unknown toy object {color!r} {shape!r}") from None


def class_parts(class_id: int) -> tuple[str, str]:
    """(shape, colour) of an object class id (1..NUM_SEMANTIC_CLASSES-1)."""
    if not 1 <= class_id < NUM_SEMANTIC_CLASSES:
        raise ValueError(f"class id {class_id} is not an object class")
    shape_index, color_index = divmod(class_id - 1, len(COLORS))
    return SHAPES[shape_index], COLORS[color_index]


def relation_holds(
    relation: str, subject: tuple[float, float], other: tuple[float, float], slack: float = 0.0
) -> bool:
    """Whether `subject` RELATION `other` is true of two centroids (normalised x, y).

    Directional relations need the offset along their axis to be at least
    `RELATION_MARGIN` and to dominate the offset across it ("above": the subject
    is higher, and more so than it is to either side). "next to": side by side,
    at least `RELATION_MARGIN` apart horizontally and at most `NEXT_TO_MAX_DY`
    apart vertically. `slack` makes every condition stricter by that amount.
    """
    dx = other[0] - subject[0]
    dy = other[1] - subject[1]
    if relation == "above":
        return dy >= RELATION_MARGIN + slack and dy >= abs(dx) + slack
    if relation == "below":
        return -dy >= RELATION_MARGIN + slack and -dy >= abs(dx) + slack
    if relation == "left of":
        return dx >= RELATION_MARGIN + slack and dx >= abs(dy) + slack
    if relation == "right of":
        return -dx >= RELATION_MARGIN + slack and -dx >= abs(dy) + slack
    if relation == "next to":
        return abs(dx) >= RELATION_MARGIN + slack and abs(dy) <= NEXT_TO_MAX_DY - slack
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _relation_mask(
    relation: str, x0: np.ndarray, y0: np.ndarray, xs: np.ndarray, ys: np.ndarray, slack: float
) -> np.ndarray:
    """Vectorised `relation_holds` of subjects (x0, y0) against others (xs, ys)."""
    dx = xs - x0
    dy = ys - y0
    margin = RELATION_MARGIN + slack
    if relation == "above":
        return (dy >= margin) & (dy >= np.abs(dx) + slack)
    if relation == "below":
        return (-dy >= margin) & (-dy >= np.abs(dx) + slack)
    if relation == "left of":
        return (dx >= margin) & (dx >= np.abs(dy) + slack)
    if relation == "right of":
        return (-dx >= margin) & (-dx >= np.abs(dy) + slack)
    return (np.abs(dx) >= margin) & (np.abs(dy) <= NEXT_TO_MAX_DY - slack)


# ----------------------------------------------------------------------------- captions


def _object_phrase(size: str | None, color: str, shape: str) -> str:
    return " ".join(["a"] + ([size] if size else []) + [color, shape])


def format_caption(parsed: ParsedCaption) -> str:
    """The canonical caption of a parsed scene (the inverse of `parse_caption`).

    Relations must be a star around object 0: exactly one (0, word, j) per
    other object j, in object order.
    """
    objects = parsed.objects
    if not objects:
        raise CaptionError("a caption needs at least one object")
    expected = list(range(1, len(objects)))
    if [j for _, _, j in parsed.relations] != expected or any(
        i != 0 for i, _, _ in parsed.relations
    ):
        raise CaptionError(
            f"relations {parsed.relations!r} must relate object 0 to objects {expected} in order"
        )
    for size, color, shape in objects:
        if size is not None and size not in SIZES:
            raise CaptionError(f"unknown size {size!r}")
        if color not in COLORS or shape not in SHAPES:
            raise CaptionError(f"unknown object {color!r} {shape!r}")
    if parsed.background not in BACKGROUNDS:
        raise CaptionError(f"unknown background {parsed.background!r}")
    words = [_object_phrase(*objects[0])]
    previous: str | None = None
    for number, (_, relation, j) in enumerate(parsed.relations):
        if relation not in RELATIONS:
            raise CaptionError(f"unknown relation {relation!r}")
        if number > 0:
            words.append("and")
        if relation != previous:
            words.append(relation)
        words.append(_object_phrase(*objects[j]))
        previous = relation
    words.append(f"on a {parsed.background} background")
    return " ".join(words)


_RELATION_WORDS: dict[str, tuple[str, ...]] = {r: tuple(r.split()) for r in RELATIONS}


def parse_caption(caption: str) -> ParsedCaption:
    """Read a caption of the toy grammar back into objects, relations and background.

    Raises `CaptionError` naming the caption, the word position and what was
    expected there. Canonical captions round-trip exactly:
    ``format_caption(parse_caption(c)) == c``.
    """
    words = caption.split(" ")
    position = 0

    def fail(expected: str) -> CaptionError:
        found = repr(words[position]) if position < len(words) else "the end"
        return CaptionError(
            f"caption {caption!r}: expected {expected} at word {position + 1}, found {found}"
        )

    def peek() -> str | None:
        return words[position] if position < len(words) else None

    def take(allowed: tuple[str, ...], expected: str) -> str:
        nonlocal position
        word = peek()
        if word not in allowed:
            raise fail(expected)
        position += 1
        return word

    def take_relation() -> str | None:
        nonlocal position
        for relation, parts in _RELATION_WORDS.items():
            if tuple(words[position : position + len(parts)]) == parts:
                position += len(parts)
                return relation
        return None

    def take_object() -> tuple[str | None, str, str]:
        nonlocal position
        take(("a", "an"), "'a'")
        size = peek() if peek() in SIZES else None
        if size is not None:
            position += 1
        color = take(COLORS, f"a colour {COLORS}")
        shape = take(SHAPES, f"a shape {SHAPES}")
        return (size, color, shape)

    objects = [take_object()]
    relations: list[tuple[int, str, int]] = []
    relation = take_relation()
    if relation is not None:
        objects.append(take_object())
        relations.append((0, relation, 1))
        while peek() == "and":
            position += 1
            relation = take_relation() or relation
            objects.append(take_object())
            relations.append((0, relation, len(objects) - 1))
    take(("on",), "'on' or a relation")
    take(("a",), "'a'")
    background = take(BACKGROUNDS, f"a background {BACKGROUNDS}")
    take(("background",), "'background'")
    if position != len(words):
        raise fail("the end of the caption")
    return ParsedCaption(objects=tuple(objects), relations=tuple(relations), background=background)


def max_caption_words(max_objects: int = 3) -> int:
    """Words in the longest caption with `max_objects` objects (for text-encoder lengths)."""
    longest_relation = max(len(parts) for parts in _RELATION_WORDS.values())
    object_words = 4  # a, size, colour, shape
    words = object_words * max_objects + 4  # "on a <background> background"
    if max_objects > 1:
        words += (max_objects - 1) * longest_relation + (max_objects - 2)  # relations and "and"
    return words


# ----------------------------------------------------------------------------- sampling


def _shape_extents(shape: str, radius: float) -> tuple[float, float, float, float]:
    extent = SHAPE_SCALE[shape] * radius
    if shape == "triangle":
        half_width = extent * math.sqrt(3.0) / 2.0
        return (half_width, extent, half_width, extent / 2.0)
    return (extent, extent, extent, extent)


def _boxes_apart(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _sample_background(rng: np.random.Generator) -> Background:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    level = float(rng.uniform(*_BACKGROUND_LEVELS[kind]))
    if kind == "striped":
        return Background(
            kind,
            level,
            amplitude=float(rng.uniform(*_STRIPE_AMPLITUDE)),
            period=float(rng.uniform(*_STRIPE_PERIOD)),
            orientation=_ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))],
        )
    if kind == "noisy":
        return Background(
            kind,
            level,
            amplitude=float(rng.uniform(*_NOISE_STD)),
            noise_seed=int(rng.integers(2**31)),
        )
    return Background(kind, level)


def _object_rgb(rng: np.random.Generator, color: str) -> tuple[float, float, float]:
    base = np.asarray(COLOR_RGB[color])
    jittered = np.clip(base + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=3), 0.0, 1.0)
    return (float(jittered[0]), float(jittered[1]), float(jittered[2]))


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3) -> Scene:
    """Draw one scene that satisfies the rules in the module docstring."""
    if not 1 <= min_objects <= max_objects <= len(SHAPES) * len(COLORS):
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {len(SHAPES) * len(COLORS)}, "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )
    count = int(rng.integers(min_objects, max_objects + 1))
    background = _sample_background(rng)
    classes = rng.choice(len(SHAPES) * len(COLORS), size=count, replace=False)
    size_words: tuple[str | None, ...] = (SIZES[0], None, SIZES[1])
    # Relations are drawn once, so that every relation word is equally frequent;
    # sizes and positions are redrawn until the scene fits.
    relations = [RELATIONS[int(rng.integers(len(RELATIONS)))] for _ in range(count - 1)]
    for attempt in range(_MAX_ATTEMPTS):
        if attempt < _MAX_ATTEMPTS // 2:
            sizes = [size_words[int(rng.integers(3))] for _ in range(count)]
        else:  # a crowded relation pattern (three in a row): only small objects fit
            sizes = [SIZES[0]] * count
        radii = [float(rng.uniform(*SIZE_RANGES[s])) for s in sizes]
        shapes = [SHAPES[int(c) // len(COLORS)] for c in classes]
        extents = [_shape_extents(shape, r) for shape, r in zip(shapes, radii, strict=True)]
        placed = _place_objects(rng, extents, relations)
        if placed is None:
            continue
        objects = []
        for index, class_index in enumerate(classes):
            color = COLORS[int(class_index) % len(COLORS)]
            x, y = placed[index]
            objects.append(
                ToyObject(
                    shapes[index], color, sizes[index], x, y, radii[index], _object_rgb(rng, color)
                )
            )
        return Scene(
            objects=tuple(objects),
            relations=tuple((0, r, j + 1) for j, r in enumerate(relations)),
            background=background,
        )
    raise RuntimeError(f"could not place {count} objects after {_MAX_ATTEMPTS} attempts")


def _relation_offsets(rng: np.random.Generator, relation: str) -> tuple[np.ndarray, np.ndarray]:
    """Candidate offsets (other - subject) that make `relation` hold with `SAMPLING_SLACK`."""
    margin = RELATION_MARGIN + SAMPLING_SLACK
    along = margin + (_MAX_OFFSET - margin) * rng.random(_CANDIDATES)
    if relation == "next to":
        side = np.where(rng.random(_CANDIDATES) < 0.5, -1.0, 1.0)
        across = (NEXT_TO_MAX_DY - SAMPLING_SLACK) * (2.0 * rng.random(_CANDIDATES) - 1.0)
        return side * along, across
    across = (along - SAMPLING_SLACK) * (2.0 * rng.random(_CANDIDATES) - 1.0)
    if relation == "above":
        return across, along
    if relation == "below":
        return across, -along
    if relation == "left of":
        return along, across
    return -along, across


def _place_objects(
    rng: np.random.Generator,
    extents: list[tuple[float, float, float, float]],
    relations: list[str],
) -> list[tuple[float, float]] | None:
    """Centroids for objects with these extents and relations to object 0, or None.

    Draws `_CANDIDATES` joint layouts at once (object 0 uniform in the frame,
    the others at offsets drawn inside their relation's region) and keeps the
    first that meets every constraint.
    """
    ext = np.asarray(extents, dtype=np.float64)  # [k, 4]: left, top, right, bottom
    low_x, low_y = FRAME_BORDER + ext[:, 0], FRAME_BORDER + ext[:, 1]
    high_x, high_y = 1.0 - FRAME_BORDER - ext[:, 2], 1.0 - FRAME_BORDER - ext[:, 3]
    xs = np.empty((_CANDIDATES, len(extents)))
    ys = np.empty((_CANDIDATES, len(extents)))
    # The subject's range leaves room for the others on the sides its relations need.
    subject_x = [float(low_x[0]), float(high_x[0])]
    subject_y = [float(low_y[0]), float(high_y[0])]
    margin = RELATION_MARGIN + SAMPLING_SLACK
    for j, relation in enumerate(relations, start=1):
        if relation == "left of":
            subject_x[1] = min(subject_x[1], float(high_x[j]) - margin)
        elif relation == "right of":
            subject_x[0] = max(subject_x[0], float(low_x[j]) + margin)
        elif relation == "above":
            subject_y[1] = min(subject_y[1], float(high_y[j]) - margin)
        elif relation == "below":
            subject_y[0] = max(subject_y[0], float(low_y[j]) + margin)
    if subject_x[0] > subject_x[1] or subject_y[0] > subject_y[1]:
        return None
    xs[:, 0] = subject_x[0] + (subject_x[1] - subject_x[0]) * rng.random(_CANDIDATES)
    ys[:, 0] = subject_y[0] + (subject_y[1] - subject_y[0]) * rng.random(_CANDIDATES)
    for j, relation in enumerate(relations, start=1):
        dx, dy = _relation_offsets(rng, relation)
        xs[:, j] = xs[:, 0] + dx
        ys[:, j] = ys[:, 0] + dy
    valid = (
        np.all(xs >= low_x, axis=1)
        & np.all(xs <= high_x, axis=1)
        & np.all(ys >= low_y, axis=1)
        & np.all(ys <= high_y, axis=1)
    )
    for j, relation in enumerate(relations, start=1):
        valid &= _relation_mask(relation, xs[:, 0], ys[:, 0], xs[:, j], ys[:, j], SAMPLING_SLACK)
    x0, y0, x1, y1 = xs - ext[:, 0], ys - ext[:, 1], xs + ext[:, 2], ys + ext[:, 3]
    for a in range(len(extents)):
        for b in range(a + 1, len(extents)):
            valid &= (
                (x1[:, a] + OBJECT_GAP <= x0[:, b])
                | (x1[:, b] + OBJECT_GAP <= x0[:, a])
                | (y1[:, a] + OBJECT_GAP <= y0[:, b])
                | (y1[:, b] + OBJECT_GAP <= y0[:, a])
            )
    hits = np.flatnonzero(valid)
    if hits.size == 0:
        return None
    row = int(hits[0])
    return [(float(xs[row, i]), float(ys[row, i])) for i in range(len(extents))]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene `index` of `seed` (independent of batch boundaries)."""
    return np.random.default_rng([int(seed), int(index)])


def generate_scenes(
    count: int, seed: int, min_objects: int = 1, max_objects: int = 3, start_index: int = 0
) -> list[Scene]:
    """Scenes `start_index .. start_index+count-1` of `seed`."""
    return [
        sample_scene(scene_rng(seed, start_index + i), min_objects, max_objects)
        for i in range(count)
    ]


# ----------------------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> np.ndarray:
    return np.arange(resolution, dtype=np.float32) + 0.5


def _render_background(background: Background, resolution: int) -> np.ndarray:
    centres = _pixel_centres(resolution) / resolution
    gray = np.full((resolution, resolution), background.level, dtype=np.float32)
    if background.kind == "striped":
        if background.orientation == "horizontal":
            coordinate = centres[:, None] + np.zeros((1, resolution), dtype=np.float32)
        elif background.orientation == "vertical":
            coordinate = np.zeros((resolution, 1), dtype=np.float32) + centres[None, :]
        else:
            coordinate = (centres[:, None] + centres[None, :]) / math.sqrt(2.0)
        phase = np.floor(2.0 * coordinate / background.period) % 2.0
        gray = gray + background.amplitude * (2.0 * phase - 1.0)
    elif background.kind == "noisy":
        noise = np.random.default_rng(background.noise_seed).standard_normal(
            (resolution, resolution), dtype=np.float32
        )
        gray = gray + background.amplitude * noise
    return np.repeat(np.clip(gray, 0.0, 1.0)[:, :, None], 3, axis=2)


_TRIANGLE_NORMALS = (
    (0.0, 1.0),
    (-math.sqrt(3.0) / 2.0, -0.5),
    (math.sqrt(3.0) / 2.0, -0.5),
)


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, extent: float) -> np.ndarray:
    """Exact signed distance in pixels from the shape's outline (negative inside).

    Exactness matters outside sharp corners, where a max of edge distances
    would under-estimate the distance and smear colour a pixel beyond the tip.
    """
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - extent
    if shape == "square":
        outside = np.sqrt(
            np.maximum(np.abs(dx) - extent, 0.0) ** 2 + np.maximum(np.abs(dy) - extent, 0.0) ** 2
        )
        inside = np.minimum(np.maximum(np.abs(dx), np.abs(dy)) - extent, 0.0)
        return outside + inside
    inradius = extent / 2.0
    inside = np.maximum.reduce([nx * dx + ny * dy - inradius for nx, ny in _TRIANGLE_NORMALS])
    half_width = extent * math.sqrt(3.0) / 2.0
    corners = ((0.0, -extent), (-half_width, inradius), (half_width, inradius))
    nearest = None
    for index, (ax, ay) in enumerate(corners):
        bx, by = corners[(index + 1) % 3]
        ex, ey = bx - ax, by - ay
        along = np.clip(((dx - ax) * ex + (dy - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        edge = np.sqrt((dx - ax - along * ex) ** 2 + (dy - ay - along * ey) ** 2)
        nearest = edge if nearest is None else np.minimum(nearest, edge)
    return np.where(inside > 0.0, nearest, inside)


def render_scene(scene: Scene, resolution: int = 32) -> Rendering:
    """Pixels and masks of a scene at `resolution` pixels square.

    Edges are anti-aliased by coverage ``clip(0.5 - signed_distance, 0, 1)``; a
    pixel belongs to an object's masks when its centre is inside the shape
    (coverage >= 0.5). Later objects are painted over earlier ones (the
    sampler never lets them overlap).
    """
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    image = _render_background(scene.background, resolution)
    instance_mask = np.zeros((resolution, resolution), dtype=np.uint8)
    semantic_mask = np.zeros((resolution, resolution), dtype=np.uint8)
    centres = _pixel_centres(resolution)
    for instance_id, obj in enumerate(scene.objects, start=1):
        cx, cy = obj.x * resolution, obj.y * resolution
        left, top, right, bottom = (e * resolution for e in obj.extents())
        col0 = max(int(math.floor(cx - left - 1.0)), 0)
        col1 = min(int(math.ceil(cx + right + 1.0)), resolution)
        row0 = max(int(math.floor(cy - top - 1.0)), 0)
        row1 = min(int(math.ceil(cy + bottom + 1.0)), resolution)
        if col0 >= col1 or row0 >= row1:
            continue
        dx = centres[None, col0:col1] - cx
        dy = centres[row0:row1, None] - cy
        distance = _signed_distance(
            obj.shape, dx, dy, SHAPE_SCALE[obj.shape] * obj.radius * resolution
        )
        coverage = np.clip(0.5 - distance, 0.0, 1.0)[:, :, None]
        window = image[row0:row1, col0:col1]
        window *= 1.0 - coverage
        window += coverage * np.asarray(obj.rgb, dtype=np.float32)
        inside = distance <= 0.0
        instance_mask[row0:row1, col0:col1][inside] = instance_id
        semantic_mask[row0:row1, col0:col1][inside] = obj.class_id
    pixels = np.round(image * 255.0).astype(np.uint8)
    return Rendering(pixels, instance_mask, semantic_mask, scene)


def object_annotations(rendering: Rendering) -> list[dict[str, object]]:
    """Per object: instance id, class, shape, colour, size, pixel bbox, pixel centroid, area.

    Bounding boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ends and
    centroids ``[x, y]`` are means of pixel centres, both measured on the
    rendered instance mask (what a detector could know), not the ideal shape.
    """
    rows: list[dict[str, object]] = []
    for instance_id, obj in enumerate(rendering.scene.objects, start=1):
        ys, xs = np.nonzero(rendering.instance_mask == instance_id)
        if xs.size == 0:
            raise RuntimeError(f"object {instance_id} of a scene has no pixels")
        rows.append(
            {
                "instance_id": instance_id,
                "class_id": obj.class_id,
                "shape": obj.shape,
                "color": obj.color,
                "size": obj.size,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "centroid": [float(xs.mean() + 0.5), float(ys.mean() + 0.5)],
                "area": int(xs.size),
            }
        )
    return rows
