"""Prompt curation: reading files, bad input, normalisation, filters, dedupe, the curated table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from unifl.config import CurateConfig
from unifl.data.prompts import (
    PROMPTS_FILE,
    REPORT_FILE,
    CurationError,
    PromptSourceError,
    clean_prompts,
    curate_prompts,
    normalize_prompt,
    prompt_id,
    prompts_frame,
    read_prompt_source,
    read_prompts,
    remove_near_duplicates,
)
from unifl.data.selection import text_encoder_embedder
from unifl.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, toy_tokenizer

CAPTIONS = [
    "a small red circle above a blue square on a dark background",
    "a large green triangle on a bright background",
    "a yellow square left of a red triangle on a gray background",
]


@pytest.fixture(scope="module")
def toy_embed():
    """The production embedder over a tiny random CLIP text encoder and the toy tokenizer."""
    tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    return text_encoder_embedder(tokenizer, CLIPTextModel(config), show_progress=False)


# --------------------------------------------------------------------------- normalisation


def test_normalize_prompt_nfkc_invisible_characters_and_whitespace() -> None:
    assert normalize_prompt("ａ　ｒｅｄ circle") == "a red circle"  # full-width forms
    assert normalize_prompt("a ﬁne\u200bday") == "a fineday"  # ligature, zero-width space
    assert normalize_prompt("  a\tred\n\r circle\u00a0 ") == "a red circle"
    assert normalize_prompt("\ufeffa cat") == "a cat"  # byte-order mark inside a cell


def test_prompt_id_is_stable_and_follows_the_normalised_text() -> None:
    assert prompt_id("a red circle") == "a1e4a280d27cad5b"  # pinned: ids key labels and DVC data
    assert prompt_id(normalize_prompt(" a  red\tcircle ")) == prompt_id("a red circle")
    assert prompt_id("a red circle") != prompt_id("a red square")


# --------------------------------------------------------------------------- reading


def test_csv_jsonl_and_parquet_sources_read_alike(tmp_path: Path) -> None:
    frame = pd.DataFrame({"prompt": CAPTIONS, "user": ["u1", "u2", "u3"], "score": [1, 2, 3]})
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_json(tmp_path / "p.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "p.parquet")
    for name, first_row in (("p.csv", 2), ("p.jsonl", 1), ("p.parquet", 1)):
        read = read_prompt_source(tmp_path / name)
        assert read["prompt"].tolist() == CAPTIONS
        assert read["user"].tolist() == ["u1", "u2", "u3"]
        assert read["source_row"].tolist() == [first_row, first_row + 1, first_row + 2]
        assert set(read["source"]) == {str(tmp_path / name)}


def test_csv_with_quoted_newlines_reports_the_record_start_line(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('prompt,note\n"a red\ncircle",x\n"",y\na blue square,z\n', encoding="utf-8")
    read = read_prompt_source(path)
    assert read["prompt"].fillna("<missing>").tolist() == [
        "a red\ncircle",
        "<missing>",
        "a blue square",
    ]
    assert read["source_row"].tolist() == [2, 4, 5]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "latin1.csv",
            "prompt\na red circle\nun caf\xe9 rouge\n".encode("latin-1"),
            r"line 3, column 7: byte 0xe9 is not UTF-8",
        ),
        ("utf16.csv", "prompt\na red circle\n".encode("utf-16"), "UTF-16"),
        ("nul.jsonl", b'{"prompt": "a"}\n{"prompt": "b\x00"}\n', "line 2: NUL byte"),
        ("empty.csv", b"", "the file is empty"),
        ("blank.jsonl", b"\n  \n", "the file is empty"),
        ("header.csv", b"prompt,user\n", "no data rows"),
        (
            "nocolumn.csv",
            b"text,user\na red circle,u\n",
            r"missing column 'prompt' \(the header has \['text', 'user'\]\)",
        ),
        (
            "ragged.csv",
            b"prompt,user\na red circle,u\na blue square\n",
            "line 3: 1 fields, the header has 2",
        ),
        ("badjson.jsonl", b'{"prompt": "a red circle"}\n{"prompt": \n', "line 2: not valid JSON"),
        ("nokey.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n', "line 2: missing key 'prompt'"),
        (
            "number.jsonl",
            b'{"prompt": "a"}\n{"prompt": 42}\n',
            "line 2: column 'prompt' must be text, got int",
        ),
        ("array.jsonl", b'["a red circle"]\n', "line 1: expected a JSON object"),
        ("prompts.txt", b"a red circle\n", "unsupported prompt file type '.txt'"),
    ],
)
def test_malformed_files_are_errors_naming_file_and_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptSourceError, match=message) as info:
        read_prompt_source(path)
    assert str(path) in str(info.value)


def test_jsonl_rows_keep_the_line_separators_json_strings_may_hold(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    prompts = ["a red circle\u2028above a blue square", "a green\x85triangle"]
    rows = [json.dumps({"prompt": prompt}, ensure_ascii=False) for prompt in prompts]
    path.write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    read = read_prompt_source(path)
    assert read["prompt"].tolist() == prompts
    assert read["source_row"].tolist() == [1, 2]


def test_enormous_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "x" * 500}) + "\n")
    with pytest.raises(PromptSourceError, match=r"line 2 has 514 characters.*max_line_chars=100"):
        read_prompt_source(path, max_line_chars=100)


def test_bad_parquet_files_are_errors(tmp_path: Path) -> None:
    pd.DataFrame({"prompt": ["a red circle", 7]}, dtype=object).astype(str).to_parquet(
        tmp_path / "ok.parquet"
    )
    pd.DataFrame({"prompt": [1, 2]}).to_parquet(tmp_path / "ints.parquet")
    pd.DataFrame({"prompt": pd.Series([], dtype="string")}).to_parquet(tmp_path / "empty.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert read_prompt_source(tmp_path / "ok.parquet")["prompt"].tolist() == ["a red circle", "7"]
    with pytest.raises(
        PromptSourceError, match=r"ints.parquet: row 1: column 'prompt' must be text"
    ):
        read_prompt_source(tmp_path / "ints.parquet")
    with pytest.raises(PromptSourceError, match="has no rows"):
        read_prompt_source(tmp_path / "empty.parquet")
    with pytest.raises(PromptSourceError, match="not a readable Parquet file"):
        read_prompt_source(tmp_path / "junk.parquet")
    with pytest.raises(PromptSourceError, match="prompt file not found"):
        read_prompt_source(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- cleaning


def test_clean_prompts_counts_every_skip_reason() -> None:
    config = CurateConfig(min_words=2, max_words=8, max_chars=60, blocked_words=["Gore", "hot dog"])
    prompts = [
        "a red circle",  # kept
        None,  # empty (missing / NaN)
        "   ",  # empty after normalisation
        "a \x1b[31mred\x1b[0m circle",  # control characters
        "x" * 61 + " y",  # too_many_chars
        "circle",  # too_few_words
        "one two three four five six seven eight nine",  # too_many_words
        "a GORE scene",  # blocked word, case-insensitive
        "a hot   dog stand",  # blocked phrase after whitespace normalisation
        "a goreless catalog of circles",  # no whole-word match: kept
        "a  red\tcircle",  # exact duplicate after normalisation
        "ａ red circle",  # exact duplicate after NFKC
    ]
    frame = prompts_frame(prompts)
    kept, counts = clean_prompts(frame, config)
    assert kept["prompt"].tolist() == ["a red circle", "a goreless catalog of circles"]
    assert kept["source_row"].tolist() == [1, 10]
    assert kept["prompt_id"].tolist() == [prompt_id(p) for p in kept["prompt"]]
    assert counts == {
        "empty": 2,
        "control_characters": 1,
        "too_many_chars": 1,
        "too_few_words": 1,
        "too_many_words": 1,
        "blocked_word": 2,
        "exact_duplicate": 2,
        "semantic_filter": 0,
        "near_duplicate": 0,
        "similarity_compression": 0,
        "not_sampled": 0,
    }


def test_missing_markers_and_nan_are_empty_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt\na red circle\nNaN\nnull\n\n,\n", encoding="utf-8")
    with pytest.raises(PromptSourceError, match="line 6: 2 fields"):
        read_prompt_source(path)
    path.write_text("prompt\na red circle\nNaN\nnull\nN/A\n", encoding="utf-8")
    kept, counts = clean_prompts(read_prompt_source(path), CurateConfig())
    assert len(kept) == 1 and counts["empty"] == 3


def test_near_duplicates_keep_the_first_occurrence() -> None:
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    near = torch.nn.functional.normalize(base[0] + 0.1 * base[1], dim=0)  # cosine 0.995
    far = torch.nn.functional.normalize(base[0] + 0.5 * base[1], dim=0)  # cosine 0.894
    embeddings = torch.stack([base[0], base[1], near, far, base[2], base[1]])
    kept = remove_near_duplicates(embeddings, threshold=0.95, block_size=2)
    assert kept.tolist() == [0, 1, 3, 4]


# --------------------------------------------------------------------------- curation


def test_curate_prompts_writes_table_and_report(tmp_path: Path, toy_embed) -> None:
    rows = [
        {"prompt": c, "user": f"u{i}", "meta": m}
        for i, (c, m) in enumerate(zip(CAPTIONS, [7, "seven", {"n": 7}], strict=True))
    ]  # mixed metadata types are stored as text
    rows += [{"prompt": "a circle", "user": "bare"}, {"prompt": None, "user": "nan"}]
    rows += [{"prompt": CAPTIONS[0].upper(), "user": "shouting"}]  # same tokens: near-duplicate
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "curated"
    # the random tiny encoder puts all captions close together: thresholds near 1
    config = CurateConfig(num_prompts=2, tau2=0.9999, near_duplicate_threshold=0.99999)
    report = curate_prompts([source], out, config, seed=0, embed=toy_embed, show_progress=False)

    table = read_prompts(out)
    assert list(table.columns[:5]) == [
        "prompt_id",
        "prompt",
        "semantic_score",
        "source",
        "source_row",
    ]
    assert "user" in table.columns
    expected_meta = dict(zip(CAPTIONS, ["7", "seven", '{"n": 7}'], strict=True))
    for text, meta in zip(table["prompt"], table["meta"], strict=True):
        assert meta == expected_meta[text]
    assert len(table) == report.output_rows == 2
    assert set(table["prompt"]) <= set(CAPTIONS)
    assert (table["semantic_score"] >= 1).all()
    assert report.dropped["empty"] == 1
    assert report.dropped["semantic_filter"] == 1  # "a circle"
    assert report.dropped["near_duplicate"] == 1  # the upper-cased caption
    assert report.dropped["not_sampled"] == 1
    assert report.input_rows == report.output_rows + sum(report.dropped.values())
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["dropped"] == report.dropped and saved["selection"]["selected"] == 2

    again = tmp_path / "again"
    curate_prompts([source], again, config, seed=0, embed=toy_embed, show_progress=False)
    assert read_prompts(again)["prompt_id"].tolist() == table["prompt_id"].tolist()


def test_failed_curation_leaves_the_previous_output_untouched(tmp_path: Path, toy_embed) -> None:
    out = tmp_path / "curated"
    good = prompts_frame(CAPTIONS)
    curate_prompts([good], out, CurateConfig(), seed=0, embed=toy_embed, show_progress=False)
    before = (out / PROMPTS_FILE).read_bytes()
    with pytest.raises(CurationError, match="no prompts left.*too_few_words=2"):
        curate_prompts(
            [prompts_frame(["cat", "dog"])], out, CurateConfig(), 0, toy_embed, show_progress=False
        )
    assert (out / PROMPTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated"]  # no temp leftovers


def test_curation_without_active_selection_only_cleans_and_dedupes(
    tmp_path: Path, toy_embed
) -> None:
    frame = prompts_frame([*CAPTIONS, "a circle", CAPTIONS[1]])
    config = CurateConfig(active_selection=False, near_duplicate_threshold=0.99999)
    report = curate_prompts([frame], tmp_path / "o", config, 0, toy_embed, show_progress=False)
    table = read_prompts(tmp_path / "o")
    assert table["prompt"].tolist() == [*CAPTIONS, "a circle"]
    assert table["semantic_score"].tolist()[-1] == 0
    assert report.selection is None and report.dropped["exact_duplicate"] == 1
