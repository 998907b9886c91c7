"""Config validation: bad values fail at construction with a message naming the field."""

import pytest

from defense.models import ClassifierConfig, LMTrainConfig, TinyLMConfig


def test_tiny_lm_config_resolves_default_ffn_per_arch():
    assert TinyLMConfig(arch="gpt2", hidden_size=128).intermediate_size == 512
    llama = TinyLMConfig(arch="llama", hidden_size=128)
    assert llama.intermediate_size % 32 == 0 and llama.intermediate_size >= 8 * 128 // 3


def test_tiny_lm_config_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_heads, got 250 and 4"):
        TinyLMConfig(hidden_size=250, num_heads=4)


def test_tiny_lm_config_unknown_arch_lists_known():
    with pytest.raises(ValueError, match=r"unknown arch 'mamba'; known: gpt2, llama"):
        TinyLMConfig(arch="mamba")


@pytest.mark.parametrize(
    ("field", "value"),
    [("vocab_size", 0), ("hidden_size", -8), ("num_layers", 0), ("num_heads", 0), ("max_positions", 0)],
)
def test_tiny_lm_config_rejects_non_positive(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive int, got {value}"):
        TinyLMConfig(**{field: value})


def test_tiny_lm_config_llama_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head dim"):
        TinyLMConfig(arch="llama", hidden_size=12, num_heads=4)
    TinyLMConfig(arch="gpt2", hidden_size=12, num_heads=4)  # gpt2 has no rotary embedding


def test_tiny_lm_config_is_frozen():
    cfg = TinyLMConfig()
    with pytest.raises(AttributeError):
        cfg.hidden_size = 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive int, got 0"),
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"log_every": 0}, "log_every must be a positive int"),
    ],
)
def test_lm_train_config_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMTrainConfig(**kwargs)


def test_classifier_config_messages_and_tuple_hidden():
    with pytest.raises(ValueError, match="n_classes must be an int >= 2, got 1"):
        ClassifierConfig(n_classes=1)
    with pytest.raises(ValueError, match="hidden sizes must be positive ints"):
        ClassifierConfig(hidden=(64, 0))
    assert ClassifierConfig(hidden=[32, 16]).hidden == (32, 16)
