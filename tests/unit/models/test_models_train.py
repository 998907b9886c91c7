"""LM training: packing, determinism, and a short run that learns the synthetic corpus."""

import pytest
import torch

from defense.models import (
    LMTrainConfig,
    TinyLMConfig,
    build_lm,
    build_tiny_lm_folder,
    lm_loss,
    load_model,
    pack_tokens,
    synthetic_corpus,
    train_lm,
    train_tokenizer,
    unigram_loss,
)


@pytest.fixture(scope="module")
def texts():
    return synthetic_corpus(400, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return synthetic_corpus(60, seed=99)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(texts, 800)


def _model(tokenizer, arch="llama", hidden=32):
    cfg = TinyLMConfig(
        arch=arch, vocab_size=len(tokenizer), hidden_size=hidden, num_layers=2, num_heads=4, max_positions=64
    )
    return build_lm(cfg, tokenizer=tokenizer, seed=0)


def test_pack_tokens_separates_documents_with_eos(tokenizer):
    (blocks,) = pack_tokens(tokenizer, ["1 plus 1 is 2.", "2 plus 2 is 4."], 4)
    full, tail = pack_tokens(tokenizer, ["1 plus 1 is 2.", "2 plus 2 is 4."], 4, keep_tail=True)
    stream = torch.cat([full.flatten(), tail.flatten()])
    assert torch.equal(blocks, full) and blocks.shape[1] == 4
    assert (stream == tokenizer.eos_token_id).sum() == 2 and stream[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(stream, skip_special_tokens=True) == "1 plus 1 is 2.2 plus 2 is 4."


def test_training_is_deterministic_given_seed(tokenizer, texts):
    cfg = LMTrainConfig(steps=4, batch_size=4, seq_len=32, seed=7)
    a, b = _model(tokenizer), _model(tokenizer)
    stats_a = train_lm(a, tokenizer, texts, cfg)
    stats_b = train_lm(b, tokenizer, texts, cfg)
    assert stats_a["loss"] == stats_b["loss"] and stats_a["tokens"] == 4 * 4 * 32
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    c = _model(tokenizer)
    train_lm(c, tokenizer, texts, LMTrainConfig(steps=4, batch_size=4, seq_len=32, seed=8))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_progress_and_eval_mode(tokenizer, texts):
    seen = []
    model = _model(tokenizer)
    train_lm(
        model,
        tokenizer,
        texts,
        LMTrainConfig(steps=5, batch_size=2, seq_len=16, log_every=2),
        progress=seen.append,
    )
    assert [d["step"] for d in seen] == [2, 4, 5]
    assert not model.training


def test_corpus_shorter_than_a_block(tokenizer):
    with pytest.raises(ValueError, match="shorter than one block of seq_len=64"):
        train_lm(_model(tokenizer), tokenizer, ["1 plus 1 is 2."], LMTrainConfig(steps=1, seq_len=64))


def test_untrained_loss_is_near_uniform(tokenizer, held_out):
    stats = lm_loss(_model(tokenizer), tokenizer, held_out, 64)
    uniform = torch.log(torch.tensor(float(len(tokenizer)))).item()
    assert abs(stats["loss"] - uniform) < 0.5 and stats["tokens"] > 1000


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_short_run_beats_unigram(arch, tokenizer, texts, held_out):
    model = _model(tokenizer, arch=arch, hidden=64)
    before = lm_loss(model, tokenizer, held_out, 64)["loss"]
    stats = train_lm(
        model, tokenizer, texts, LMTrainConfig(steps=60, batch_size=8, seq_len=64, lr=1e-2, warmup=5)
    )
    after = lm_loss(model, tokenizer, held_out, 64)["loss"]
    unigram = unigram_loss(tokenizer, texts, held_out)["loss"]
    assert stats["loss"] < stats["first_loss"] - 2.0
    assert after < unigram - 0.5 < before


@pytest.mark.slow
def test_build_tiny_lm_folder_with_training(tmp_path):
    folder = build_tiny_lm_folder(
        tmp_path / "m",
        arch="gpt2",
        hidden=32,
        train_steps=10,
        train_config=LMTrainConfig(batch_size=4, seq_len=32),
        corpus=synthetic_corpus(200, seed=0),
    )
    model, tok = load_model(folder)
    assert (
        lm_loss(model, tok, synthetic_corpus(20, seed=5), 32)["loss"]
        < torch.log(torch.tensor(float(len(tok)))).item()
    )
