"""The lean Llama forward the targeted defense's proxy uses gives transformers' hidden states."""

from __future__ import annotations

import pytest
import torch

from defense.models import TinyLMConfig, build_lm
from defense.models.fastpath import last_hidden_states, supported


@pytest.mark.parametrize("shape", [dict(hidden_size=32, num_layers=1, num_heads=2),
                                   dict(hidden_size=64, num_layers=3, num_heads=4, tie_embeddings=False)])
@pytest.mark.parametrize("length", [1, 7, 130])
def test_matches_transformers(shape, length):
    model = build_lm(TinyLMConfig(vocab_size=300, max_positions=256, **shape), seed=3)
    with torch.no_grad():  # random weights are small: give the layers something to do
        for p in model.parameters():
            p.mul_(4.0)
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.inference_mode():
        want = model.model(ids, use_cache=False).last_hidden_state
        got = last_hidden_states(model, ids)
        again = last_hidden_states(model, ids)  # from the rotary cache
    assert supported(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)


def test_grouped_query_attention_matches():
    model = build_lm(TinyLMConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4), seed=1)
    model.config.num_key_value_heads = 2  # rebuild with 2 kv heads: the config drives the module shapes
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    gqa = AutoModelForCausalLM.from_config(model.config).eval()
    ids = torch.randint(0, 100, (1, 33))
    with torch.inference_mode():
        torch.testing.assert_close(last_hidden_states(gqa, ids), gqa.model(ids, use_cache=False).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_other_architectures_go_through_the_model():
    gpt2 = build_lm(TinyLMConfig(arch="gpt2", vocab_size=100, hidden_size=32, num_layers=1, num_heads=2), seed=0)
    assert not supported(gpt2)
    ids = torch.randint(0, 100, (1, 9))
    with torch.inference_mode():
        assert torch.equal(last_hidden_states(gpt2, ids), gpt2.transformer(ids, use_cache=False).last_hidden_state)


def test_decoder_with_left_padding_and_cached_steps_matches_transformers():
    from defense.models.fastpath import LlamaDecoder

    model = build_lm(TinyLMConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, max_positions=64), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    rows = [[1, 2, 3], [7], [9, 8, 7, 6, 5]]
    width = max(map(len, rows))
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1

    def want(prefixes):  # each row alone, unpadded, through transformers
        return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prefixes])

    dec = LlamaDecoder(model)
    with torch.inference_mode():
        torch.testing.assert_close(dec.prefill(ids, mask), want(rows), rtol=1e-5, atol=1e-5)
        for new in ([11, 12, 13], [1, 2, 3]):
            rows = [r + [t] for r, t in zip(rows, new, strict=True)]
            got = dec.step(torch.tensor(new)[:, None])
            torch.testing.assert_close(got, want(rows), rtol=1e-5, atol=1e-5)
    gpt2 = build_lm(TinyLMConfig(arch="gpt2", vocab_size=50, hidden_size=32, num_layers=1, num_heads=2), seed=0)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LlamaDecoder(gpt2)
