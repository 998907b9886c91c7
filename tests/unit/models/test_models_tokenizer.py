"""The trained tokenizer round-trips text and survives save/load through AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from defense.models import EOS_TOKEN, PAD_TOKEN, synthetic_corpus, train_tokenizer


@pytest.fixture(scope="module")
def texts():
    return synthetic_corpus(300, seed=0)


def test_specials_and_size(texts):
    tok = train_tokenizer(texts, 600)
    assert tok.eos_token == tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert len(tok) <= 600


@pytest.mark.parametrize("text", ["3 plus 4 is 7.", "Unseen wörds, émoji 🙂 and\ttabs\n"])
def test_encode_decode_round_trip(texts, text):
    tok = train_tokenizer(texts, 600)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_training_is_deterministic(texts):
    assert train_tokenizer(texts, 600).get_vocab() == train_tokenizer(texts, 600).get_vocab()


def test_save_and_load_with_auto_tokenizer(texts, tmp_path):
    tok = train_tokenizer(texts, 600, model_max_length=128)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(texts[:3])["input_ids"] == tok(texts[:3])["input_ids"]
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (0, 0, 1)
    assert loaded.model_max_length == 128
    batch = loaded(["1 plus 1 is 2.", "Counting from 3: 3, 4, 5."], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and (batch["input_ids"] == loaded.pad_token_id).any()


def test_vocab_size_too_small(texts):
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        train_tokenizer(texts, 100)
