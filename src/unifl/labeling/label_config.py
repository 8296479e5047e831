"""The Label Studio labeling interface for aesthetic preference pairs, built from code.

The dimension names come from `unifl.config.DIMENSIONS` and `OVERALL`, and the
choice values from `unifl.data.preferences.CHOICES`, so the interface, the export
conversion and the preference tables cannot drift apart.

Layout: the prompt on top, image A and image B side by side, then one single-choice
`<Choices>` (A / B / Tie) per dimension with a one-line instruction, then the
overall choice. Deliberately not `<Pairwise>` (it has no tie) and not a
multi-target `<Rating>` (it has been seen to lose annotations).

Only the overall choice is required: an annotator who cannot judge one
dimension may leave it empty, which the export conversion reads as "no vote".
"""

from __future__ import annotations

from xml.etree import ElementTree

from unifl.config import DIMENSIONS
from unifl.data.preferences import CHOICES, OVERALL

PROMPT_FIELD = "prompt"
IMAGE_A_FIELD = "image_a"
IMAGE_B_FIELD = "image_b"
CHOICES_TO_NAME = PROMPT_FIELD
"""Every `<Choices>` is attached to the prompt text: a single object, valid for the pair."""

LABELED_DIMENSIONS: tuple[str, ...] = (*DIMENSIONS, OVERALL)
"""The `from_name` of every choice control, in display order."""

DIMENSION_INSTRUCTIONS: dict[str, str] = {
    "color": "Which image has the more pleasing colours: harmonious, well saturated, no colour casts?",
    "layout": "Which image has the better composition: clear subject, balanced placement, nothing cut off?",
    "detail": "Which image shows finer, cleaner detail: sharp edges and textures, no smudges or artefacts?",
    "lighting": "Which image has the more convincing light: sensible shadows and contrast, not flat or blown out?",
    OVERALL: "All things considered, which image do you prefer for this prompt?",
}

DIMENSION_TITLES: dict[str, str] = {
    "color": "Colour",
    "layout": "Layout",
    "detail": "Detail",
    "lighting": "Lighting",
    OVERALL: "Overall",
}

# One row of keys per dimension, in the order of CHOICES (A, B, Tie). Digits and
# the left-hand letter rows keep every hotkey reachable without moving the hand.
_HOTKEY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("1", "2", "3"),
    ("4", "5", "6"),
    ("7", "8", "9"),
    ("q", "w", "e"),
    ("a", "s", "d"),
    ("z", "x", "c"),
)


class LabelConfigError(ValueError):
    """The labeling configuration cannot be built (e.g. a dimension without instructions)."""


def choice_hotkeys() -> dict[str, dict[str, str]]:
    """Hotkey of every (dimension, choice), unique over the whole interface."""
    if len(LABELED_DIMENSIONS) > len(_HOTKEY_ROWS):
        raise LabelConfigError(
            f"{len(LABELED_DIMENSIONS)} dimensions but only {len(_HOTKEY_ROWS)} hotkey rows"
        )
    return {
        dimension: dict(zip(CHOICES, row, strict=True))
        for dimension, row in zip(LABELED_DIMENSIONS, _HOTKEY_ROWS, strict=False)
    }


def _choice_label(choice: str) -> str:
    return {"A": "A is better", "B": "B is better", "Tie": "Tie"}.get(choice, choice)


def build_label_config() -> str:
    """The labeling configuration XML (Label Studio's `label_config`) as a string."""
    missing = [d for d in LABELED_DIMENSIONS if d not in DIMENSION_INSTRUCTIONS]
    if missing:
        raise LabelConfigError(f"no instructions for dimensions {missing}")
    hotkeys = choice_hotkeys()

    root = ElementTree.Element("View")
    ElementTree.SubElement(root, "Header", value="Prompt", size="4")
    ElementTree.SubElement(root, "Text", name=PROMPT_FIELD, value=f"${PROMPT_FIELD}")

    images = ElementTree.SubElement(
        root, "View", style="display: flex; gap: 16px; align-items: flex-start;"
    )
    for side, field in (("A", IMAGE_A_FIELD), ("B", IMAGE_B_FIELD)):
        column = ElementTree.SubElement(images, "View", style="flex: 1 1 50%; min-width: 0;")
        ElementTree.SubElement(column, "Header", value=f"Image {side}", size="5")
        ElementTree.SubElement(
            column, "Image", name=field, value=f"${field}", zoom="true", zoomControl="true"
        )

    for dimension in LABELED_DIMENSIONS:
        block = ElementTree.SubElement(
            root, "View", style="margin-top: 12px; padding-top: 6px; border-top: 1px solid #ddd;"
        )
        ElementTree.SubElement(block, "Header", value=DIMENSION_TITLES[dimension], size="5")
        ElementTree.SubElement(block, "Header", value=DIMENSION_INSTRUCTIONS[dimension], size="6")
        control = ElementTree.SubElement(
            block,
            "Choices",
            name=dimension,
            toName=CHOICES_TO_NAME,
            choice="single-radio",
            showInline="true",
            required="true" if dimension == OVERALL else "false",
        )
        for choice in CHOICES:
            ElementTree.SubElement(
                control,
                "Choice",
                value=choice,
                hotkey=hotkeys[dimension][choice],
                hint=_choice_label(choice),
            )

    ElementTree.indent(root, space="  ")
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def build_instructions_html() -> str:
    """Longer instructions shown above the task (the project's `expert_instruction`)."""
    hotkeys = choice_hotkeys()
    items = []
    for dimension in LABELED_DIMENSIONS:
        keys = " / ".join(
            f"{choice}: <kbd>{hotkeys[dimension][choice]}</kbd>" for choice in CHOICES
        )
        items.append(
            f"<li><b>{DIMENSION_TITLES[dimension]}</b>: {DIMENSION_INSTRUCTIONS[dimension]} ({keys})</li>"
        )
    return (
        "<p>Two images were generated from the same prompt. For each aspect, pick the better "
        "image, or <b>Tie</b> when you see no clear difference. Leave an aspect empty if you "
        "cannot judge it; the overall choice is required.</p><ul>" + "".join(items) + "</ul>"
    )
