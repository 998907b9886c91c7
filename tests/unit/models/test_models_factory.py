"""build -> save -> load through the ordinary transformers loaders gives the same model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from defense.models import (
    TinyLMConfig,
    build_lm,
    build_tiny_lm_folder,
    load_model,
    save_model,
    synthetic_corpus,
    train_tokenizer,
)
from defense.models.tiny import STATS_FILE


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(synthetic_corpus(300, seed=0), 600)


def _cfg(arch, tokenizer):
    return TinyLMConfig(
        arch=arch, vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, max_positions=64
    )


def _logits(model, tokenizer, text="Counting from 3: 3, 4,"):
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])  # [1, T] int64
    with torch.inference_mode():
        return model(input_ids=input_ids).logits  # [1, T, V] float32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_through_auto_classes(arch, tokenizer, tmp_path):
    model = build_lm(_cfg(arch, tokenizer), tokenizer=tokenizer, seed=1)
    save_model(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()

    # a user's loading path: nothing of ours involved
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    plain_tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert torch.equal(_logits(model, tokenizer), _logits(plain, plain_tok))

    loaded, loaded_tok = load_model(tmp_path)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert torch.equal(_logits(model, tokenizer), _logits(loaded, loaded_tok))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(loaded.config, name) == getattr(tokenizer, name)
        assert getattr(loaded.generation_config, name) == getattr(tokenizer, name)
    text = "Where does Bob live? 12 plus 9 is 21."
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text


def test_gpt2_special_ids_are_not_the_50256_default(tokenizer):
    model = build_lm(_cfg("gpt2", tokenizer), tokenizer=tokenizer)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 0, 1)


def test_seed_fixes_init_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_lm(_cfg("llama", tokenizer), tokenizer=tokenizer, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_lm(_cfg("llama", tokenizer), tokenizer=tokenizer, seed=5)
    c = build_lm(_cfg("llama", tokenizer), tokenizer=tokenizer, seed=6)
    assert torch.equal(_logits(a, tokenizer), _logits(b, tokenizer))
    assert not torch.equal(_logits(a, tokenizer), _logits(c, tokenizer))


def test_tokenizer_larger_than_vocab_is_rejected(tokenizer):
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but vocab_size is 300"):
        build_lm(TinyLMConfig(vocab_size=300), tokenizer=tokenizer)


def test_missing_folder_error_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="model folder does not exist: .*no-such-model"):
        load_model(missing)


def test_folder_without_config_error_names_what_is_missing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"model folder {tmp_path} has no config.json"):
        load_model(tmp_path)


def test_folder_without_weights_or_tokenizer(tokenizer, tmp_path):
    model = build_lm(_cfg("gpt2", tokenizer), tokenizer=tokenizer)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no weights; expected one of: model.safetensors"):
        load_model(tmp_path)
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_model(tmp_path)


def test_half_precision_folder_loads_as_fp32_on_cpu(tokenizer, tmp_path):
    model = build_lm(_cfg("llama", tokenizer), tokenizer=tokenizer)
    save_model(model.to(torch.bfloat16), tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, _ = load_model(tmp_path)
    assert loaded.dtype == torch.float32
    loaded, _ = load_model(tmp_path, dtype=torch.float16)  # still fp32: half matmuls crawl on this CPU
    assert loaded.dtype == torch.float32


def test_user_folder_without_pad_token_gets_eos_as_pad(tokenizer, tmp_path):
    model = build_lm(_cfg("gpt2", tokenizer), tokenizer=tokenizer)
    model.config.pad_token_id = None
    tokenizer_copy = train_tokenizer(synthetic_corpus(300, seed=0), 600)
    tokenizer_copy.pad_token = None
    save_model(model, tokenizer_copy, tmp_path)
    loaded, loaded_tok = load_model(tmp_path)
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id == loaded.config.pad_token_id


def test_build_tiny_lm_folder_default_is_loadable(tmp_path):
    folder = build_tiny_lm_folder(tmp_path / "tiny", hidden=32, heads=4)
    model, tok = load_model(folder)
    record = json.loads((folder / STATS_FILE).read_text())
    assert record["model"]["vocab_size"] == len(tok) == model.config.vocab_size
    assert "train_stats" not in record


def test_import_defense_does_not_import_torch():
    repo_root = Path(__file__).resolve().parents[3]
    code = "import sys, defense; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
