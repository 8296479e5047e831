"""The toy world's word-level tokenizer, in a format transformers loads.

Real Stable Diffusion checkpoints ship a byte-pair CLIP tokenizer; the toy world
has a closed vocabulary of a few dozen words (`unifl.toy.vocabulary`), so one
token per word is enough and makes every caption exactly as long as it reads.
The tokenizer is a `tokenizers.Tokenizer` (WordLevel model, lower-casing
normaliser, whitespace/punctuation pre-tokeniser) wrapped in transformers'
fast-tokenizer class, so `save_pretrained` writes `tokenizer.json` and
`AutoTokenizer.from_pretrained(dir)` loads it back: toy checkpoints have the
same directory layout as real ones and go through the same loader.

Special-token ids are fixed: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3.
The order matters for CLIP text models: transformers' CLIPTextTransformer
pools the hidden state at the first position holding ``config.eos_token_id``,
*except* when that id is 2, which it treats as a legacy config and pools at
the highest token id instead. With eos at 3 (and `CLIPTextConfig.eos_token_id`
set to `EOS_TOKEN_ID`) the pooled embedding is the one at the end-of-text
token, as in real CLIP. Every encoding is ``<bos> words... <eos>`` padded with
``<pad>`` to `max_length`; truncation keeps the ``<eos>``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
PAD_TOKEN_ID, UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = range(len(SPECIAL_TOKENS))


def build_word_tokenizer(words: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` that pads and truncates to `max_length`.

    Words are lower-cased and must be single tokens (no whitespace, not a
    special token); duplicates are an error because they would silently shift
    every later id. Ids follow the order of `words` after the special tokens.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 (bos, one word, eos), got {max_length}")
    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        token = word.strip().lower()
        if not token or any(char.isspace() for char in token):
            raise ValueError(f"tokenizer word {word!r} must be one non-empty word without spaces")
        if token in vocab:
            raise ValueError(f"tokenizer word {word!r} is duplicated or a special token")
        vocab[token] = len(vocab)

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="removed")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID), (EOS_TOKEN, EOS_TOKEN_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


TOY_MAX_LENGTH = 24
"""Tokens of the toy text encoders: the longest toy caption (21 words, three
objects with sizes, two relations and a background) plus bos and eos, rounded
up; shorter and a third of the captions would lose their ends."""


def toy_tokenizer(max_length: int = TOY_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """The tokenizer of the toy text encoders, over the toy caption vocabulary.

    The vocabulary is read at call time so words added to the caption grammar
    are picked up without touching this module.
    """
    from unifl.toy.vocabulary import vocabulary

    return build_word_tokenizer(vocabulary(), max_length=max_length)
