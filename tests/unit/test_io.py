"""Whole-or-nothing outputs: they never replace their own inputs, and others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unifl.config import load_params
from unifl.data.prompts import run_curate_stage
from unifl.io import (
    OutputPathError,
    atomic_directory,
    atomic_path,
    check_output_apart,
    split_lines,
)


def test_an_output_directory_that_is_or_holds_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    source = data / "prompts" / "raw.csv"
    for out in (data, data / "prompts", source):
        with pytest.raises(OutputPathError, match=rf"{out}.*would delete that input"):
            check_output_apart(out, [None, source])
    # Beside or inside an input directory, nothing of the input is replaced.
    check_output_apart(data / "curated", [source])
    check_output_apart(data / "prompts" / "curated", [data / "prompts"])


def test_a_stage_refuses_to_write_over_its_inputs_before_it_starts(tmp_path: Path) -> None:
    source = tmp_path / "data" / "raw.csv"
    source.parent.mkdir()
    source.write_text("prompt\na red circle on a dark background\n")
    with pytest.raises(OutputPathError, match="raw.csv"):
        # The model is never loaded: the check comes first.
        run_curate_stage(load_params(), [source], tmp_path / "no-model", tmp_path / "data")
    assert source.read_text() == "prompt\na red circle on a dark background\n"


def test_labels_and_feedback_stages_refuse_to_replace_their_inputs(tmp_path: Path) -> None:
    from unifl.feedback.stages import check_outputs_apart, run_decoupled, run_pefl
    from unifl.labeling.pipeline import label_pairs

    params = load_params()
    pairs = tmp_path / "pairs"
    with pytest.raises(OutputPathError, match="pairs"):
        label_pairs(params, pairs, pairs)
    # A later stage pointed at the previous stage's directory would replace its model.
    previous = tmp_path / "pefl"
    with pytest.raises(OutputPathError, match=r"pefl/model holds the input .*pefl/model"):
        run_decoupled(params, previous / "model", ["a red circle"], tmp_path / "reward", previous)
    with pytest.raises(OutputPathError, match="holds the input"):
        run_pefl(params, "toy-sd15", previous / "model" / "data", previous)
    # The stage directory itself may hold inputs: multi-node runs stage them there.
    staged = tmp_path / "stage"
    check_outputs_apart(staged, staged / "inputs" / "base", staged / "inputs" / "data", None)


def test_the_working_directory_is_never_an_output(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for out in (".", "..", tmp_path):
        with (
            pytest.raises(OutputPathError, match="working directory"),
            atomic_directory(out) as tmp,
        ):
            (tmp / "result.txt").write_text("new")
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_outputs_get_the_modes_of_a_plain_write(tmp_path, umask, file_mode, dir_mode) -> None:
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "table.json") as tmp:
            tmp.write_text("{}")
        with atomic_directory(tmp_path / "report") as tmp:
            (tmp / "index.html").write_text("<p>")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "table.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == dir_mode


def test_lines_split_at_newlines_alone() -> None:
    text = 'a\r\n{"prompt": "one\u2028two\x85three"}\nlast'
    assert split_lines(text) == ["a", '{"prompt": "one\u2028two\x85three"}', "last"]
