"""Offline tokenizer for the random presets.

The ``tiny`` preset has no pretrained LLM, so ``astrea create --preset tiny`` builds a byte-level
BPE tokenizer with the `tokenizers` library, without any download: the 256 byte symbols, the
special tokens ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2) and ``<image>`` (3) -- the ids the tiny
preset's config expects -- and merges learnt from a small built-in English text, up to the LLM's
vocabulary size (fewer when the text has no more pairs to merge; the LLM may have unused rows).
Byte-level coverage means any text round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]

_CORPUS = """
USER: What is in the image? ASSISTANT: A red circle and a blue square on a grey background.
USER: How many shapes are there? ASSISTANT: There are three shapes.
USER: What colour is the triangle? ASSISTANT: The triangle is green.
USER: Is there a yellow star? ASSISTANT: No, there is no yellow star.
USER: Where is the circle relative to the square? ASSISTANT: The circle is left of the square.
caption recognition detection segmentation the a an of on in is are there what where which
red green blue yellow white black purple orange grey circle square triangle star shape shapes
left right above below small large one two three four five six seven eight nine ten yes no
"""


def build_byte_level_tokenizer(vocab_size: int = 320, model_max_length: int = 512, corpus: Iterable[str] | None = None
                               ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most ``vocab_size`` entries (at least 260), built offline.

    The merges are learned from ``corpus`` (texts; e.g. a training split's captions and answers,
    so that its frequent words become single tokens) or, by default, from a small built-in corpus.
    """
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {base} entries")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus) if corpus is not None else [_CORPUS] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=model_max_length,
        padding_side="left",
    )
    return wrapped
