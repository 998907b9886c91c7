"""Antidistillation sampling: exact no-op at lambda 0, the finite difference against autograd, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jvp

from defense.antidistill.gradient import load_gradient, proxy_gradient, save_gradient
from defense.antidistill.proxy import PerturbedPair
from defense.antidistill.sampler import AntidistillParams, AntidistillSampling
from defense.config import parse_config
from defense.errors import ConfigError
from defense.models import TinyLMConfig, build_lm
from defense.types import RequestContext

V = 50


@pytest.fixture(scope="module")
def proxy():
    return build_lm(TinyLMConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, max_positions=64), seed=1)


@pytest.fixture(scope="module")
def traces():
    rng = np.random.default_rng(0)
    return [rng.integers(0, V, size=n).tolist() for n in (12, 9, 15, 7)]


@pytest.fixture(scope="module")
def grad(proxy, traces):
    g, stats = proxy_gradient(proxy, traces, prompt_lengths=[3, 2, 4, 1])
    assert stats["tokens"] == (12 - 3) + (9 - 2) + (15 - 4) + (7 - 1) and stats["loss"] > 0
    return g


def ctxs(n, **kw):
    return [RequestContext(request_id=f"r{i}", client_id="c", **kw) for i in range(n)]


def test_lambda_zero_is_exactly_plain_sampling(proxy, grad):
    d = AntidistillSampling(AntidistillParams(lam=0.0), proxy=proxy, gradient=grad)
    logits = torch.randn(3, V)
    assert d.process_logits(logits, [[1, 2], [3], [4, 5, 6]], ctxs(3)) is logits
    # and sampling from it draws exactly what plain sampling draws with the same generator
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = d.process_logits(logits, [[1, 2], [3], [4, 5, 6]], ctxs(3))
    assert torch.equal(torch.multinomial(torch.softmax(out, -1), 1, generator=gen_a),
                       torch.multinomial(torch.softmax(logits, -1), 1, generator=gen_b))


def test_finite_difference_matches_autograd(proxy, grad):
    prefix = [3, 14, 15, 9, 2, 6]
    pair = PerturbedPair(proxy, grad, epsilon=1e-2)
    fd = pair.difference([prefix], ["a"])[0].double()
    import copy

    eager = copy.deepcopy(proxy)
    eager.set_attn_implementation("eager")  # forward-mode AD does not go through sdpa
    params = {n: p.detach() for n, p in eager.named_parameters()}
    tangents = {n: grad[n].to(p.dtype) for n, p in params.items()}

    def last_logits(ps):
        return functional_call(eager, ps, args=(torch.tensor([prefix]),), kwargs={"use_cache": False}).logits[0, -1]

    _, exact = jvp(last_logits, (params,), (tangents,))
    exact = exact.double()
    # compare as log-probabilities too: the log-partition difference is a per-row constant
    np.testing.assert_allclose(fd.numpy(), exact.numpy(), rtol=2e-2, atol=2e-3 * exact.abs().max().item())
    assert torch.corrcoef(torch.stack([fd, exact]))[0, 1] > 0.999


def test_cached_steps_equal_full_prefill_with_ragged_rows(proxy, grad):
    rows = [[1, 2, 3], [7], [9, 8, 7, 6, 5]]
    cached = PerturbedPair(proxy, grad, epsilon=1e-2)
    cached.difference(rows, ["a", "b", "c"])
    grown = [r + [11] for r in rows]
    step = cached.difference(grown, ["a", "b", "c"])  # one new token per row: fed from the caches
    fresh = PerturbedPair(proxy, grad, epsilon=1e-2).difference(grown, ["a", "b", "c"])
    torch.testing.assert_close(step, fresh, rtol=1e-4, atol=1e-4)
    alone = PerturbedPair(proxy, grad, epsilon=1e-2).difference([grown[1]], ["b"])
    torch.testing.assert_close(step[1:2], alone, rtol=1e-4, atol=1e-4)  # left padding changes nothing
    # a changed batch (row removed) rebuilds rather than reuse stale caches
    again = cached.difference([grown[0] + [4], grown[2] + [4]], ["a", "c"])
    want = PerturbedPair(proxy, grad, epsilon=1e-2).difference([grown[0] + [4], grown[2] + [4]], ["a", "c"])
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)


def test_defense_adds_scaled_delta(proxy, grad):
    d = AntidistillSampling(AntidistillParams(lam=0.1, temperature=0.5), proxy=proxy, gradient=grad)
    logits = torch.zeros(2, V)
    out = d.process_logits(logits, [[1, 2], [3, 4]], ctxs(2))
    delta = PerturbedPair(proxy, grad, epsilon=1e-2).difference([[1, 2], [3, 4]], ["x", "y"])
    torch.testing.assert_close(out, 0.1 * 0.5 * delta, rtol=1e-4, atol=1e-6)
    strong = d.process_logits(logits, [[1, 2], [3, 4]], ctxs(2, strength=2.0, temperature=1.0))
    torch.testing.assert_close(strong, 0.2 * delta, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="share the teacher's tokenizer"):
        d.process_logits(torch.zeros(1, V + 1), [[1]], ctxs(1))


def test_gradient_round_trip_and_provenance(tmp_path, proxy, grad):
    folder = save_gradient(tmp_path / "g", grad, model=proxy, stats={"tokens": 33, "loss": 3.9}, source="unit")
    loaded, record = load_gradient(folder, model=proxy)
    assert record["tokens"] == 33 and record["source"] == "unit"
    for n, g in grad.items():
        torch.testing.assert_close(loaded[n], g)
    other = build_lm(TinyLMConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, max_positions=64), seed=2)
    with pytest.raises(ValueError, match="computed for proxy"):
        load_gradient(folder, model=other)
    with pytest.raises(FileNotFoundError, match="save_gradient"):
        load_gradient(tmp_path / "missing", model=proxy)


def test_params_validated():
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        AntidistillParams(epsilon=0)
    with pytest.raises(ValueError, match="needs proxy_path and gradient_path"):
        AntidistillSampling(AntidistillParams(lam=0.1))
    with pytest.raises(ConfigError, match="lam must be >= 0"):
        parse_config({"version": 1, "defenses": [{"type": "antidistill", "params": {"lam": -1}}]})
    assert parse_config({"version": 1, "defenses": [{"type": "antidistill", "params": {"lam": 0}}]})
