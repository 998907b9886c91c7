"""Adaptive attacks against the perturbations, through the in-process chain built from a config.

Averaging exact repeats defeats i.i.d. noise (sigma / sqrt(n)) and does not move the keyed noise;
whitespace/case variants share the keyed noise; differencing two temperatures recovers the clean logits
from noise added after temperature, and only logits + noise from ours.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.perturb import VARIANTS, averaged, error, full_vocab_logprobs, temperature_difference, topk_batch

from defense.base import Deps
from defense.chain import DefenseChain
from defense.config import parse_config
from defense.keys import KeyRing
from defense.types import LogprobBatch, LogprobsMode, Prompt, RequestContext

Z = np.random.default_rng(7).normal(size=(64, 200)) * 2.5


def chain(defense_type: str, **params) -> DefenseChain:
    loaded = parse_config({"version": 1, "defenses": [{"type": defense_type, "params": params}]})
    return DefenseChain.from_config(loaded, deps=Deps(keys=KeyRing.generate()))


def ctx(prompt: str = VARIANTS[0]) -> RequestContext:
    return RequestContext(request_id="r", client_id="c", model="tiny", prompt=Prompt(text=prompt))


@pytest.fixture(scope="module")
def clean() -> LogprobBatch:
    return topk_batch(Z, 20)


def test_averaging_exact_repeats(clean):
    # the i.i.d. baseline without argmax clipping: clipping biases it, and the bias would not average out
    iid, keyed = chain("random_noise", sigma=0.5, seed=1, keep_argmax=False), chain("keyed_noise", sigma=0.5)
    for_iid = lambda b: iid.protect(b, ctx()).batch  # noqa: E731
    for_keyed = lambda b: keyed.protect(b, ctx()).batch  # noqa: E731
    iid_gain = error(averaged(for_iid, clean, 1), clean) / error(averaged(for_iid, clean, 64), clean)
    assert 6.0 <= iid_gain <= 10.0  # about sqrt(64) = 8: averaging defeats i.i.d. noise
    e1, e64 = error(averaged(for_keyed, clean, 1), clean), error(averaged(for_keyed, clean, 64), clean)
    assert e1 > 0.1 and e64 == e1  # the keyed answer does not move


def test_averaging_whitespace_and_case_variants(clean):
    iid, keyed = chain("random_noise", sigma=0.5, seed=2, keep_argmax=False), chain("keyed_noise", sigma=0.5)

    def recovered(c: DefenseChain) -> float:
        one = error(c.protect(clean, ctx(VARIANTS[0])).batch.values.astype(np.float64), clean)
        avg = np.mean([c.protect(clean, ctx(v)).batch.values.astype(np.float64) for v in VARIANTS], axis=0)
        return one - error(avg, clean)

    assert len(VARIANTS) == 16
    assert recovered(keyed) <= 0.25 * recovered(iid)
    assert recovered(keyed) == 0.0  # the canonical context gives every variant the same noise


def differencing_error(c: DefenseChain, mode_for_engine: LogprobsMode) -> float:
    """Logits recovered by differencing T=1 and T=2, against the clean logits (per-row centered)."""
    z = Z[:16, :60]
    answers = []
    for t in (1.0, 2.0):
        lp = full_vocab_logprobs(z, t)
        ids = np.argsort(-lp, 1)
        b = LogprobBatch(values=np.take_along_axis(lp, ids, 1).astype(np.float32), token_ids=ids, temperature=t,
                         logprobs_mode=mode_for_engine)
        answers.append(c.protect(b, ctx()).batch)
    est = temperature_difference(answers[0], answers[1], 1.0, 2.0)
    return float(np.abs(est - (z - z.mean(1, keepdims=True))).mean())


def test_temperature_differencing():
    ours = chain("keyed_noise", sigma=0.5, keep_argmax=False)
    # noise added after temperature: the same keyed noise, applied to processed logprobs as if they were raw
    post_temperature = differencing_error(ours, LogprobsMode.RAW)
    before_temperature = differencing_error(ours, LogprobsMode.PROCESSED)
    assert post_temperature < 1e-3  # differencing strips it and recovers the clean logits
    assert before_temperature > 0.3  # about E|n| = 0.4 for sigma 0.5: what it recovers is logits + noise


def test_shadow_mode_counts_and_changes_nothing(clean):
    from defense.metrics import Metrics

    metrics = Metrics()
    loaded = parse_config({"version": 1, "defenses": [{"type": "keyed_noise", "mode": "shadow"}]})
    c = DefenseChain.from_config(loaded, deps=Deps(keys=KeyRing.generate(), metrics=metrics))
    out = c.protect(clean, ctx())
    assert out.batch is clean and out.applied == ()
    assert metrics.registry.get_sample_value("distillguard_shadow_effects_total",
                                             {"defense": "keyed_noise", "stage": "protect"}) == 1.0
