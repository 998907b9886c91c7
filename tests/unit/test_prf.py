import numpy as np
import pytest
import torch

from defense import prf


def test_mix64_matches_unsigned_reference():
    # splitmix64's finalizer computed with Python's unbounded ints, masked to 64 bits
    def ref(x):
        m = (1 << 64) - 1
        x &= m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    xs = [0, 1, 2, -1, 2**63 - 1, -(2**63), 123456789]
    got = prf.mix64(np.array(xs, dtype=np.int64)).view(np.uint64)
    assert [int(g) for g in got] == [ref(x) for x in xs]


def test_numpy_and_torch_agree_bit_for_bit():
    rng = np.random.default_rng(0)
    a = rng.integers(-(2**62), 2**62, size=(64, 33))
    b = np.arange(33)
    seed = prf.key_seed(b"k" * 32, b"model", b"ctx")
    hn = prf.hash_combine(seed, a, b)
    ht = prf.hash_combine(seed, torch.from_numpy(a), torch.from_numpy(b))
    assert np.array_equal(hn, ht.numpy())
    assert np.array_equal(prf.uniform(hn, dtype=np.float32), prf.uniform(ht).numpy())
    assert np.allclose(prf.normal(hn), prf.normal(ht, dtype=torch.float64).numpy(), atol=1e-12)


def test_order_key_and_inputs_matter():
    t = np.arange(1000)
    s1, s2 = prf.key_seed(b"a" * 32), prf.key_seed(b"b" * 32)
    assert not np.array_equal(prf.hash_combine(s1, t), prf.hash_combine(s2, t))
    assert not np.array_equal(prf.hash_combine(s1, t, 5), prf.hash_combine(s1, 5, t))


def test_distributions():
    h = prf.hash_combine(prf.key_seed(b"x" * 32), np.arange(200_000))
    u = prf.uniform(h)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    z = prf.normal(h)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and np.isfinite(z).all()
    # adjacent inputs are uncorrelated
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01


def test_short_seed_bytes_rejected():
    with pytest.raises(ValueError, match="8 bytes"):
        prf.seed_from_bytes(b"abc")


def test_key_seed_is_sha256_over_the_key_then_length_framed_parts():
    import hashlib

    key, parts = b"k" * 32, (b"model", b"", b"\x00" * 40)
    h = hashlib.sha256(key)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    assert prf.key_seed(key, *parts) == int.from_bytes(h.digest()[:8], "little", signed=True)
    # the framing keeps parts from running together
    assert prf.key_seed(key, b"ab", b"c") != prf.key_seed(key, b"a", b"bc")
