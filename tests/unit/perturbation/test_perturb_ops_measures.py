"""Array math on numpy and torch alike, and the utility measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.perturb import prob_batch, topk_batch

from defense import prf
from defense.perturbation import measures as M
from defense.perturbation.ops import shift_logprobs
from defense.types import LogprobBatch, OutputKind

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_shift_matches_numpy_batched_over_requests(device):
    # an engine batch: [B, P, K] with a different seed per request, in one call
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 7, 12)) * 2
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    present = rng.random(lp.shape) > 0.1
    seeds = np.array([prf.key_seed(b"k" * 32, b"m", bytes([i]) * 32) for i in range(3)])[:, None, None]
    ids = np.broadcast_to(np.arange(12), lp.shape)
    pos = np.arange(7)[None, :, None]
    noise_np = prf.normal(prf.hash_combine(seeds, pos, ids)) * 0.7
    out_np, _ = shift_logprobs(lp, present, noise_np)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    noise_t = prf.normal(prf.hash_combine(t(seeds), t(pos), t(ids)), dtype=torch.float64) * 0.7
    out_t, _ = shift_logprobs(t(lp), t(present), noise_t)
    np.testing.assert_allclose(out_t.cpu().numpy(), out_np, atol=1e-9)
    # per request, the same as one request at a time
    for b in range(3):
        single, _ = shift_logprobs(lp[b], present[b], noise_np[b])
        np.testing.assert_allclose(single, out_np[b], atol=1e-12)


def test_measures_on_known_cases():
    z = np.random.default_rng(1).normal(size=(10, 30)) * 2
    b = topk_batch(z, 5)
    assert M.top1_agreement(b, b) == 1.0
    np.testing.assert_allclose(M.total_variation(b, b), 0.0, atol=1e-7)
    np.testing.assert_allclose(M.kl_divergence(b, b), 0.0, atol=1e-6)
    np.testing.assert_allclose(M.rank_correlation(b, b), 1.0)
    # reversing the order of the top-5 among themselves: rank correlation -1
    rev = LogprobBatch(values=b.values, token_ids=b.token_ids[:, ::-1].copy())
    np.testing.assert_allclose(M.rank_correlation(b, rev), -1.0)
    # dropping every alternative but the top: TV is the dropped mass
    top1 = LogprobBatch(values=b.values[:, :1], token_ids=b.token_ids[:, :1])
    dropped = np.exp(b.values[:, 1:].astype(np.float64)).sum(1)
    np.testing.assert_allclose(M.total_variation(b, top1), dropped, rtol=1e-5)
    # one-hot vs uniform over 4 classes: TV 0.75
    u = LogprobBatch(values=np.full((1, 4), 0.25, np.float32), token_ids=np.empty((1, 0), np.int64), kind=OutputKind.PROBABILITIES)
    oh = LogprobBatch(values=np.array([[1, 0, 0, 0]], np.float32), token_ids=np.empty((1, 0), np.int64),
                      kind=OutputKind.PROBABILITIES)
    np.testing.assert_allclose(M.total_variation(u, oh), 0.75)


def test_calibration_error():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    # confident and always right at 0.9 (gap 0.1); 0.6 and right half the time (gap 0.1)
    assert M.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.1)
    assert M.expected_calibration_error(prob_batch(np.zeros((3, 3))), np.zeros(3, int)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="need probs"):
        M.expected_calibration_error(probs, np.zeros(3))


@pytest.mark.parametrize("device", DEVICES)
def test_keyed_tensor_path_matches_the_batch_path(device):
    from defense.base import Deps
    from defense.keys import KeyRing
    from defense.perturbation.keyed import KeyedNoise
    from defense.types import RequestContext

    d = KeyedNoise(deps=Deps(keys=KeyRing.generate()))
    z = np.random.default_rng(3).normal(size=(2, 9, 40)) * 2
    digests = [bytes([1]) * 32, bytes([2]) * 32]
    want = np.stack([d.apply(topk_batch(z[i], 6), RequestContext(request_id="r", client_id="c", model="m",
                                                                  context_digest=digests[i])).values
                     for i in range(2)])
    batches = [topk_batch(z[i], 6) for i in range(2)]
    vals = torch.tensor(np.stack([b.values for b in batches]), dtype=torch.float64, device=device)
    ids = torch.tensor(np.stack([b.token_ids for b in batches]), device=device)
    seeds = torch.tensor([d.seed("m", g) for g in digests], device=device)[:, None, None]
    got = d.perturb(vals, ids, seeds=seeds, positions=torch.arange(9, device=device)[None, :, None])
    np.testing.assert_allclose(got.cpu().numpy().astype(np.float32), want, atol=1e-6)
