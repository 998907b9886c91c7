"""Train a byte-level BPE tokenizer from texts, wrapped as a transformers fast tokenizer.

No pretrained tokenizer exists offline, so every tiny model gets one trained here. Byte-level BPE
never produces an unknown token: any text, including the user's own, encodes and decodes back.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "MIN_VOCAB_SIZE", "PAD_TOKEN", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"  # doubles as bos, as in GPT-2: documents are separated by one token
PAD_TOKEN = "<pad>"
_SPECIALS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
MIN_VOCAB_SIZE = 256 + len(_SPECIALS)  # every byte plus the specials


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and return a tokenizer with eos/bos/pad set.

    ``vocab_size`` is an upper bound: a corpus with few distinct words runs out of merges earlier,
    so use ``len(tokenizer)`` for the model's vocabulary. Training is deterministic for the same
    texts. The result saves with ``save_pretrained`` and loads back with ``AutoTokenizer``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if model_max_length is not None and model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")

    backend = Tokenizer(models.BPE())
    # no prefix space: "Bob" at a document start and " Bob" mid-sentence stay distinct tokens, as in GPT-2
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        **extra,
    )
