"""The toy word-level tokenizer: ids, padding/truncation, save/load, CLIP pooling."""

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from unifl.models.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    UNK_TOKEN_ID,
    build_word_tokenizer,
    toy_tokenizer,
)
from unifl.toy.vocabulary import vocabulary

CAPTIONS = [
    "a red circle above a blue square on a dark background",
    "A large Yellow triangle, left of a green circle",
    "a zebra",
]


def _ids(tokenizer, texts):
    return tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def test_word_ids_special_tokens_and_padding():
    tokenizer = build_word_tokenizer(["red", "circle", "a"], max_length=6)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (PAD_TOKEN_ID, UNK_TOKEN_ID)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    assert len(tokenizer) == 4 + 3
    ids = _ids(tokenizer, ["A RED circle", "red zebra", "a red circle a red circle"])
    assert ids.tolist() == [
        [BOS_TOKEN_ID, 6, 4, 5, EOS_TOKEN_ID, PAD_TOKEN_ID],
        [BOS_TOKEN_ID, 4, UNK_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, PAD_TOKEN_ID],
        # truncation keeps the end-of-text token that CLIP pools on
        [BOS_TOKEN_ID, 6, 4, 5, 6, EOS_TOKEN_ID],
    ]


def test_bad_words_are_rejected():
    with pytest.raises(ValueError, match="duplicated"):
        build_word_tokenizer(["red", "Red"], max_length=8)
    with pytest.raises(ValueError, match="without spaces"):
        build_word_tokenizer(["left of"], max_length=8)
    with pytest.raises(ValueError, match="special token"):
        build_word_tokenizer(["<eos>"], max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        build_word_tokenizer(["red"], max_length=2)


def test_toy_tokenizer_covers_the_caption_vocabulary():
    tokenizer = toy_tokenizer(max_length=16)
    assert len(tokenizer) == 4 + len(vocabulary())
    ids = _ids(tokenizer, CAPTIONS[:2])
    assert UNK_TOKEN_ID not in ids.tolist()[0] + ids.tolist()[1]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == CAPTIONS[0]


def test_save_pretrained_round_trip_through_auto_tokenizer(tmp_path):
    tokenizer = toy_tokenizer(max_length=12)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 12
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (EOS_TOKEN_ID, PAD_TOKEN_ID)
    assert torch.equal(_ids(loaded, CAPTIONS), _ids(tokenizer, CAPTIONS))


def test_clip_text_model_pools_on_the_eos_token():
    tokenizer = toy_tokenizer(max_length=10)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=10,
        projection_dim=16,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    model = CLIPTextModel(config).eval()
    ids = _ids(tokenizer, ["a red circle", "a blue square above a green triangle"])
    with torch.no_grad():
        out = model(input_ids=ids)
    eos_positions = (ids == EOS_TOKEN_ID).int().argmax(dim=-1)
    assert eos_positions.tolist() == [4, 8]
    expected = out.last_hidden_state[torch.arange(2), eos_positions]
    torch.testing.assert_close(out.pooler_output, expected)
