"""The keyed function: one definition for numpy and torch, sampler and detector; masks equal on CPU and CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defense import prf
from defense.watermark import keyed
from defense.watermark.context import RepeatedContexts, last_windows, padded, repeated_context
from defense.watermark.kernels import _mix_, vocab_hashes

SEED = prf.key_seed(b"k" * 32)


@pytest.mark.parametrize("hashing", keyed.HASHINGS)
@pytest.mark.parametrize("h", [1, 2, 4])
def test_sampler_kernel_equals_detector_function(hashing, h):
    rng = np.random.default_rng(h)
    windows = rng.integers(-1, 5000, size=(6, h))
    vocab = np.arange(777)
    ref = keyed.token_hashes(SEED, windows[:, None, :], vocab[None, :], hashing)  # numpy, [6, 777]
    got = vocab_hashes(torch.tensor(SEED), torch.from_numpy(windows), torch.from_numpy(vocab), hashing)
    assert np.array_equal(ref, got.numpy())
    # per-row seeds (per-tenant keys) broadcast the same way
    seeds = prf.hash_combine(SEED, np.arange(6))
    ref_rows = keyed.token_hashes(seeds[:, None], windows[:, None, :], vocab[None, :], hashing)
    got_rows = vocab_hashes(torch.from_numpy(seeds).reshape(-1, 1), torch.from_numpy(windows), torch.from_numpy(vocab), hashing)
    assert np.array_equal(ref_rows, got_rows.numpy())
    # and the detector's per-token form agrees with the [B, V] form
    tokens = rng.integers(0, 777, size=6)
    flat = keyed.token_hashes(SEED, windows, tokens, hashing)
    assert np.array_equal(flat, ref[np.arange(6), tokens])


def test_inplace_mix_is_prf_mix64():
    x = torch.from_numpy(np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=1000, dtype=np.int64))
    assert torch.equal(_mix_(x.clone(), torch.empty_like(x)), prf.mix64(x))


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_green_fraction_and_uniforms(gamma):
    h = keyed.token_hashes(SEED, np.arange(200_000)[:, None] % 977, np.arange(200_000), "lefthash")
    thr = keyed.green_threshold(gamma)
    assert thr == gamma * 2**24
    assert abs(keyed.green(h, thr).mean() - gamma) < 0.005
    u = keyed.uniform(h)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    ut = keyed.uniform(torch.from_numpy(h))
    assert ut.dtype == torch.float32 and np.array_equal(ut.numpy().astype(np.float64), u)  # exact in float32


def test_seed_is_bound_to_scheme_and_seeding():
    key = b"s" * 32
    seeds = {keyed.scheme_seed(key, s, h, m) for s in keyed.SCHEMES for h in (1, 2) for m in keyed.HASHINGS}
    assert len(seeds) == 8
    assert keyed.scheme_seed(key, "kgw", 1, "lefthash") == keyed.scheme_seed(key, "kgw", 1, "lefthash")


@pytest.mark.parametrize("bad, words", [
    (dict(context=0), "context"), (dict(context=5), "1..4"), (dict(context=True), "context"),
    (dict(hashing="minhash"), "lefthash, selfhash"), (dict(scheme="synthid"), "kgw, gumbel"),
])
def test_bad_seeding_rejected(bad, words):
    args = dict(key=b"s" * 32, scheme="kgw", context=1, hashing="lefthash") | bad
    with pytest.raises(ValueError, match=words):
        keyed.scheme_seed(**args)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1, 1.5])
def test_bad_gamma_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        keyed.green_threshold(gamma)


def test_windows_from_lists_and_tensors_agree():
    prefixes = [[5, 6, 7, 8], [9], []]
    w = last_windows(prefixes, 3, batch=3, device=torch.device("cpu"))
    assert w.tolist() == [[6, 7, 8], [-1, -1, 9], [-1, -1, -1]]
    t = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 9]])
    assert last_windows(t, 2, batch=2, device=torch.device("cpu")).tolist() == [[3, 4], [0, 9]]
    assert last_windows(t[:, :1], 3, batch=2, device=torch.device("cpu")).tolist() == [[-1, -1, 1], [-1, -1, 0]]
    with pytest.raises(ValueError, match="2 prefixes for 3 rows"):
        last_windows(prefixes[:2], 1, batch=3, device=torch.device("cpu"))


def test_repeated_context():
    full = padded([[1, 2, 3, 1, 2], [1, 2, 3, 4, 5], [7]], batch=3, device=torch.device("cpu"))
    assert repeated_context(full, 2).tolist() == [True, False, False]
    assert repeated_context(full, 1).tolist() == [True, False, False]


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(1, 3))
def test_repeated_contexts_read_incrementally_agree_with_the_full_check(data, h):
    """Rows that grow (as vLLM's live lists do), get replaced, or are cut back and regrown: the incremental
    tracker answers what repeated_context over the whole padded prefixes answers, at every step."""
    tracker = RepeatedContexts(h)
    rows = [data.draw(st.lists(st.integers(0, 3), max_size=6)) for _ in range(data.draw(st.integers(1, 4)))]
    for _ in range(data.draw(st.integers(1, 8))):
        for i, row in enumerate(rows):
            action = data.draw(st.sampled_from(["grow", "grow", "grow", "new", "cut"]))
            if action == "grow":
                row.extend(data.draw(st.lists(st.integers(0, 3), max_size=3)))
            elif action == "new":  # another request takes the slot
                rows[i] = data.draw(st.lists(st.integers(0, 3), max_size=8))
            else:  # the last tokens taken back (rejected draft tokens), then as many or more others appended
                k = data.draw(st.integers(0, min(2, len(row))))
                del row[len(row) - k:]
                row.extend(data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=3)))
        full = padded(rows, batch=len(rows), device=torch.device("cpu"))
        seen, current = tracker(rows)
        assert seen == repeated_context(full, h).tolist()
        assert current == last_windows(full, h, batch=len(rows), device=torch.device("cpu")).tolist()


def test_repeated_contexts_read_rows_of_any_integer_type():
    rows = [[1, 2, 1], np.array([1, 2, 1]), torch.tensor([5, 6, 5]), (3, 4)]
    seen, current = RepeatedContexts(1)(rows)
    assert seen == [True, True, True, False]
    assert current == [[1], [1], [5], [4]] and all(type(t) is int for w in current for t in w)


def test_repeated_contexts_forget_rows_that_left():
    tracker = RepeatedContexts(1)
    for _ in range(100):
        tracker([[1, 2, 1]])  # a fresh list each step: read in full each time, and let go later
    assert len(tracker._rows) <= 2 + 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hashing", keyed.HASHINGS)
def test_cpu_and_cuda_masks_are_equal(hashing):
    windows = torch.randint(0, 128256, (8, 4))
    vocab = torch.arange(128256)
    cpu = vocab_hashes(torch.tensor(SEED), windows, vocab, hashing)
    gpu = vocab_hashes(torch.tensor(SEED, device="cuda"), windows.cuda(), vocab.cuda(), hashing)
    assert torch.equal(cpu, gpu.cpu())
    thr = keyed.green_threshold(0.25)
    assert torch.equal(keyed.green(cpu, thr), keyed.green(gpu, thr).cpu())
    assert torch.equal(keyed.uniform(cpu), keyed.uniform(gpu).cpu())
