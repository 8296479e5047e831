"""The labeling interface: built from the dimension names, valid for Label Studio's parser."""

from xml.etree import ElementTree

import pytest
from label_studio_sdk.label_interface import LabelInterface

from unifl.config import DIMENSIONS
from unifl.data.preferences import CHOICES, OVERALL
from unifl.labeling.label_config import (
    DIMENSION_INSTRUCTIONS,
    build_instructions_html,
    build_label_config,
    choice_hotkeys,
)


@pytest.fixture(scope="module")
def root() -> ElementTree.Element:
    return ElementTree.fromstring(build_label_config())


def test_one_choices_per_dimension_plus_overall_with_a_b_tie(root):
    controls = root.findall(".//Choices")
    assert [c.get("name") for c in controls] == [*DIMENSIONS, OVERALL]
    for control in controls:
        assert [c.get("value") for c in control.findall("Choice")] == list(CHOICES)
        assert control.get("choice") == "single-radio"
        assert control.get("toName") == "prompt"
    required = {c.get("name"): c.get("required") for c in controls}
    assert required[OVERALL] == "true"
    assert all(required[d] == "false" for d in DIMENSIONS)


def test_no_pairwise_and_no_rating(root):
    tags = {element.tag for element in root.iter()}
    assert "Pairwise" not in tags
    assert "Rating" not in tags


def test_prompt_on_top_and_images_side_by_side(root):
    objects = [e for e in root.iter() if e.tag in ("Text", "Image")]
    assert [(e.tag, e.get("value")) for e in objects] == [
        ("Text", "$prompt"),
        ("Image", "$image_a"),
        ("Image", "$image_b"),
    ]
    # Both images sit in columns of one flex row.
    row = next(v for v in root.iter("View") if "display: flex" in (v.get("style") or ""))
    columns = row.findall("View")
    assert [c.find("Image").get("name") for c in columns] == ["image_a", "image_b"]


def test_every_dimension_has_its_instruction_shown(root):
    headers = [h.get("value") for h in root.iter("Header")]
    for dimension in (*DIMENSIONS, OVERALL):
        assert DIMENSION_INSTRUCTIONS[dimension] in headers
    html = build_instructions_html()
    assert all(DIMENSION_INSTRUCTIONS[d] in html for d in (*DIMENSIONS, OVERALL))


def test_hotkeys_unique_and_attached_to_every_choice(root):
    keys = [c.get("hotkey") for c in root.iter("Choice")]
    assert len(keys) == len(CHOICES) * (len(DIMENSIONS) + 1)
    assert all(keys) and len(set(keys)) == len(keys)
    assert choice_hotkeys()["color"] == {"A": "1", "B": "2", "Tie": "3"}


def test_label_studio_parser_accepts_config_and_checks_choices():
    interface = LabelInterface(build_label_config())
    interface.validate()
    assert [control.name for control in interface.controls] == [*DIMENSIONS, OVERALL]

    def annotation(choice: str) -> dict:
        return {
            "result": [
                {
                    "from_name": "color",
                    "to_name": "prompt",
                    "type": "choices",
                    "value": {"choices": [choice]},
                }
            ]
        }

    assert interface.validate_annotation(annotation("Tie"))
    assert not interface.validate_annotation(annotation("C"))
