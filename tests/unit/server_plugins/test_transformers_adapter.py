"""transformers adapter: the LogitsProcessor runs any sampling defense inside generate()."""

from __future__ import annotations

import pytest
import torch
from support.watermark import fixed_ring, one_thread

from defense.base import Deps
from defense.chain import ChainEntry, DefenseChain
from defense.models import TinyLMConfig, build_lm
from defense.types import RequestContext
from defense.watermark import GreenListParams, GreenListWatermark, GumbelParams, GumbelWatermark
from server_plugins.transformers import DefenseLogitsProcessor, generate


@pytest.fixture(scope="module")
def model():
    with one_thread():
        return build_lm(TinyLMConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, max_positions=128), seed=0)


@pytest.fixture
def kgw(tmp_path):
    return GreenListWatermark(GreenListParams(delta=4.0, context=2), deps=Deps(keys=fixed_ring(tmp_path, tag="hf")))


def ctx(i=0, **kw):
    return RequestContext(request_id=f"r{i}", client_id="c", **kw)


def test_processor_is_the_defense_step(kgw):
    proc = DefenseLogitsProcessor(kgw, [ctx(0), ctx(1)])
    ids = torch.randint(2, 300, (2, 7))
    scores = torch.randn(2, 300)
    assert torch.equal(proc(ids, scores), kgw.process_logits(scores, ids, proc.contexts(2)))
    half = proc(ids, scores.half())
    assert half.dtype == torch.float16  # the engine's dtype comes back


def test_contexts_follow_num_return_sequences(kgw):
    proc = DefenseLogitsProcessor(kgw, [ctx(0), ctx(1)])
    assert [c.request_id for c in proc.contexts(6)] == ["r0"] * 3 + ["r1"] * 3
    with pytest.raises(ValueError, match="2 request contexts cannot cover a batch of 5"):
        proc.contexts(5)
    with pytest.raises(TypeError, match="no process_logits"):
        DefenseLogitsProcessor(object(), ctx())


class _Recorder:
    """A sampling defense that changes nothing and keeps the prefixes it was shown."""

    def __init__(self):
        self.seen = []

    def process_logits(self, logits, prefixes, ctxs):
        self.seen.append([list(map(int, p)) for p in prefixes])
        return logits


def test_padded_rows_reach_the_defense_without_their_padding(model):
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    rec = _Recorder()
    with one_thread():
        out = generate(model, prompts, defense=rec, max_new_tokens=3, temperature=0.0, stop_at_eos=False)
    assert rec.seen[0] == prompts  # the first step: each prompt alone, no pad token in front
    assert rec.seen[-1] == [p + o[:2] for p, o in zip(prompts, out, strict=True)]
    proc = DefenseLogitsProcessor(rec, [ctx(0), ctx(1)], pad_lengths=[0, 2])  # copies share their prompt's pad
    proc(torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 4], [0, 0, 4]]), torch.zeros(4, 300))
    assert rec.seen[-1] == [[1, 2, 3], [1, 2, 3], [4], [4]]
    with pytest.raises(ValueError, match="pad lengths"):
        DefenseLogitsProcessor(rec, [ctx(0)], pad_lengths=[0, 1])


def test_generate_with_a_watermark_marks_the_text(model, kgw):
    with one_thread():
        prompts = [[5, 6, 7], [8, 9], [10]]
        out = generate(model, prompts, defense=kgw, max_new_tokens=60, stop_at_eos=False, seed=3)
        again = generate(model, prompts, defense=kgw, max_new_tokens=60, stop_at_eos=False, seed=3)
        plain = generate(model, prompts, max_new_tokens=60, stop_at_eos=False, seed=3)
    assert out == again and [len(s) for s in out] == [60, 60, 60]
    report = kgw.detector().detect_many(out)
    assert report.combined.detected and not kgw.detector().detect_many(plain).combined.detected


def test_scores_generate_returns_are_the_processed_ones(model, kgw):
    """What generate() reports as scores (what logprobs are built from) is the watermarked distribution."""
    ids = torch.tensor([[5, 6, 7]])
    with one_thread(), torch.inference_mode():
        raw = model(input_ids=ids).logits[:, -1].float()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.5,
                             top_k=0, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                             logits_processor=[DefenseLogitsProcessor(kgw, ctx(temperature=0.5))], pad_token_id=1)
    expected = kgw.process_logits(raw, ids, [ctx(temperature=0.5)]) / 0.5
    assert torch.allclose(out.scores[0].float(), expected, atol=1e-4)


def test_generate_through_a_chain_and_greedy_gumbel(model, tmp_path):
    ring = fixed_ring(tmp_path, tag="hf-chain")
    gumbel = GumbelWatermark(GumbelParams(), deps=Deps(keys=ring))
    chain = DefenseChain([ChainEntry("watermark_gumbel", gumbel)])
    with one_thread():
        greedy = generate(model, [[5, 6]], defense=chain, temperature=0.0, max_new_tokens=10)
        plain = generate(model, [[5, 6]], temperature=0.0, max_new_tokens=10)
        sampled = generate(model, [[5, 6]] * 4, defense=chain, max_new_tokens=80, stop_at_eos=False, seed=1)
    assert greedy == plain  # the Gumbel scheme leaves greedy decoding alone
    assert gumbel.detector().detect_many(sampled).combined.detected


@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(prompts=[[]]), "at least one token"), (dict(ctxs=[ctx()] * 2), "2 request contexts for 1 prompts"),
])
def test_generate_rejects_bad_arguments(model, kw, words):
    args = dict(prompts=[[5]]) | kw
    with pytest.raises(ValueError, match=words):
        generate(model, **args)
