"""Adaptive attacks: what averaging, near-duplicates and temperature differencing recover."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defense.canonical import context_digest
from defense.types import Prompt
from experiments.attacks import (
    account_id,
    average_probabilities,
    average_topk,
    probes,
    temperature_difference,
    text_variant,
)
from experiments.config import AttackConfig
from experiments.metrics import topk_total_variation


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _topk(logits, k, t=1.0):
    lp = _log_softmax(logits / t)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(lp, ids, axis=1)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(st.integers(1, 4), st.integers(0, 3), st.booleans(), st.integers(1, 5))
def test_probes_cover_every_request_the_attack_sends(repeats, near_dups, pair, accounts):
    a = AttackConfig(repeats=repeats, near_dups=near_dups, temperature_pair=(0.5, 2.0) if pair else None,
                     accounts=accounts)
    ps = probes(a)
    assert len(ps) == a.requests_per_query == len({p.tag for p in ps})
    assert {account_id("d", i, a) for i in range(20)} == {f"d-{j}" for j in range(min(accounts, 20))}


def test_canonical_variants_share_the_context_digest_and_distinct_ones_do_not():
    text = "Where does Bravik live? Bravik lives in"
    base = context_digest("m", Prompt(text=text))
    for v in range(1, 12):
        assert context_digest("m", Prompt(text=text_variant(text, v, "canonical"))) == base
        assert context_digest("m", Prompt(text=text_variant(text, v, "distinct"))) != base
    assert len({text_variant(text, v, "canonical") for v in range(12)}) == 12


def test_average_of_identical_answers_is_the_answer():
    rng = np.random.default_rng(0)
    ids, lp = _topk(rng.normal(size=(6, 40)) * 2, 5)
    a_ids, a_lp = average_topk([(ids, lp)] * 4, 5)
    assert np.array_equal(a_ids, ids)
    assert np.allclose(a_lp, lp, atol=1e-6)


def test_averaging_iid_noise_moves_toward_the_clean_answer_and_keyed_noise_does_not():
    """Why keyed noise exists: 64 repeats of i.i.d. noise average out; 64 copies of one noise do not."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 60)) * 2
    clean_ids, clean_lp = _topk(logits, 5)

    def noisy(noise):
        lp = _log_softmax(logits + noise)
        return clean_ids, np.take_along_axis(lp, clean_ids, axis=1)

    def err(ans):
        return topk_total_variation(clean_lp, clean_ids, ans[1], ans[0]).mean()

    keyed = rng.normal(size=logits.shape)
    iid = [noisy(rng.normal(size=logits.shape)) for _ in range(64)]
    assert err(average_topk(iid, 5)) < err(iid[0]) / 4
    assert err(average_topk([noisy(keyed)] * 64, 5)) == pytest.approx(err(noisy(keyed)), rel=1e-6)


def test_average_topk_keeps_the_union_of_tokens_and_marks_missing_ones():
    a = (np.array([[1, 2]]), np.log(np.array([[0.6, 0.2]])))
    b = (np.array([[1, 3]]), np.log(np.array([[0.5, 0.3]])))
    ids, lp = average_topk([a, b], 3)
    # geometric means 0.6^.5 0.5^.5 (token 1), 0.3 (3), 0.2 (2), rescaled to the mean mass 0.8
    g = np.array([np.sqrt(0.6 * 0.5), 0.3, 0.2])
    assert ids.tolist() == [[1, 3, 2]]
    assert np.allclose(np.exp(lp), [g * 0.8 / g.sum()])
    ids, _ = average_topk([a, (np.array([[1, -1]]), np.array([[np.log(0.6), -1e4]]))], 4)
    assert ids.tolist() == [[1, 2, -1, -1]]


def test_average_probabilities_of_one_hot_answers_is_a_vote():
    votes = [np.eye(3)[[0]], np.eye(3)[[0]], np.eye(3)[[2]]]
    assert np.allclose(average_probabilities(votes), [[2 / 3, 0, 1 / 3]])


@settings(max_examples=50, deadline=None)
@given(st.floats(0.3, 0.9), st.floats(1.2, 3.0), st.integers(0, 10_000))
def test_temperature_differencing_cancels_noise_added_after_temperature(t1, t2, seed):
    """Noise n added to processed logprobs with the same value at every temperature (what the Contracts
    forbid) is removed by differencing: the recovered top-k has the clean relative logits."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, 30)) * 2
    ids = np.argsort(-logits, axis=1)[:, :5]
    n = rng.normal(size=ids.shape)
    a = (ids, np.take_along_axis(_log_softmax(logits / t1), ids, axis=1) + n)
    b = (ids, np.take_along_axis(_log_softmax(logits / t2), ids, axis=1) + n)
    rec_ids, rec_lp = temperature_difference(a, t1, b, t2)
    assert np.array_equal(rec_ids, ids)
    z = np.take_along_axis(logits, ids, axis=1)
    rel_clean = _log_softmax(z)
    rel = rec_lp - np.log(np.exp(rec_lp).sum(axis=1, keepdims=True))
    assert np.allclose(rel, rel_clean, atol=1e-6)


def test_temperature_differencing_does_not_cancel_noise_added_before_temperature():
    """Noise on the logits (n / T on processed logprobs, per the Contracts) survives differencing."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 30)) * 2
    ids = np.argsort(-logits, axis=1)[:, :5]
    n = np.zeros_like(logits)
    np.put_along_axis(n, ids, rng.normal(size=ids.shape), axis=1)
    a = (ids, np.take_along_axis(_log_softmax((logits + n) / 0.5), ids, axis=1))
    b = (ids, np.take_along_axis(_log_softmax((logits + n) / 2.0), ids, axis=1))
    _, rec = temperature_difference(a, 0.5, b, 2.0)
    z = np.take_along_axis(logits, ids, axis=1)
    rel = rec - np.log(np.exp(rec).sum(axis=1, keepdims=True))
    assert np.abs(rel - _log_softmax(z)).mean() > 0.3


def test_temperature_differencing_drops_tokens_returned_at_one_temperature_only():
    a = (np.array([[1, 2, 3]]), np.log(np.array([[0.5, 0.3, 0.1]])))
    b = (np.array([[1, 3, -1]]), np.log(np.array([[0.4, 0.2, 1.0]])))
    ids, lp = temperature_difference(a, 0.5, b, 2.0)
    assert ids.tolist() == [[1, -1, 3]]
    assert np.isfinite(lp).all()
