from __future__ import annotations

import base64
import logging
import os
import stat
import traceback

import pytest
import yaml

from defense.errors import KeyFileError
from defense.identity import client_id_from_token, identify
from defense.keys import KeyRing, hkdf_sha256, rotate_key_file, write_new_key_file
from defense.profile import Profile, decode_from_engine, encode_for_engine, sign_profile, verify_profile


def _secrets(path) -> list[str]:
    return [k["secret"] for k in yaml.safe_load(open(path))["keys"]]


def test_new_key_file_is_private_and_loads(tmp_path):
    p = tmp_path / "k" / "keys.yaml"
    kid = write_new_key_file(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    ring = KeyRing.load(p)
    assert ring.primary_id == kid and ring.active_ids == [kid]
    assert len(base64.b64decode(_secrets(p)[0])) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        write_new_key_file(p)


def test_group_readable_key_file_is_refused_with_the_fix(key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyFileError, match=r"mode 0644.*chmod 600"):
        KeyRing.load(key_file)


def test_missing_key_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyFileError, match="distillguard keys new"):
        KeyRing.load(tmp_path / "absent.yaml")


def test_rotation_keeps_old_keys_for_detection(key_file):
    old = KeyRing.load(key_file).primary_id
    new = rotate_key_file(key_file, retire_old=True)
    ring = KeyRing.load(key_file)
    assert ring.primary_id == new and ring.status(old) == "retired"
    assert [k for k, _ in ring.candidates("watermark")] == [new, old]
    assert [k for k, _ in ring.candidates("watermark", include_retired=False)] == [new]


def test_derivation_is_purpose_and_tenant_bound(keys):
    a = keys.derive("perturbation")
    assert a == keys.derive("perturbation") and len(a) == 32
    assert a != keys.derive("watermark")
    assert keys.derive("perturbation", tenant="t1") != keys.derive("perturbation", tenant="t2")


def test_hkdf_matches_rfc5869_test_case_1():
    ikm = bytes.fromhex("0b" * 22)
    okm = hkdf_sha256(ikm, salt=bytes.fromhex("000102030405060708090a0b0c"),
                      info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


@pytest.mark.parametrize("body, words", [
    ("keys: []\n", "has no keys"),
    ("keys:\n  - {id: a, status: retired, secret: " + base64.b64encode(b"x" * 32).decode() + "}\n", "no active key"),
    ("keys:\n  - {id: a, secret: 'not base64!!'}\n", "not valid base64"),
    ("keys:\n  - {id: a, secret: " + base64.b64encode(b"short").decode() + "}\n", "at least 16 bytes"),
    ("keys:\n  - {id: a, status: live, secret: " + base64.b64encode(b"x" * 32).decode() + "}\n", "active, retired"),
    ("keys: {a: b}\n", "'keys' list"),
    ("keys: [\n", "not valid YAML"),
])
def test_malformed_key_files(tmp_path, body, words):
    p = tmp_path / "keys.yaml"
    p.write_text(body)
    p.chmod(0o600)
    with pytest.raises(KeyFileError, match=words):
        KeyRing.load(p)


def test_key_material_never_reaches_logs_reprs_or_errors(key_file, caplog, capsys):
    secret_b64 = _secrets(key_file)[0]
    raw = base64.b64decode(secret_b64)
    ring = KeyRing.load(key_file)
    derived = ring.derive("perturbation")
    texts = [repr(ring), str(ring), repr(ring._entries[ring.primary_id]), repr(ring._entries[ring.primary_id].secret)]
    # an error raised while a secret is in scope
    bad = key_file.parent / "bad.yaml"
    bad.write_text(f"keys:\n  - {{id: a, status: live, secret: {secret_b64}}}\n")
    bad.chmod(0o600)
    with caplog.at_level(logging.DEBUG):
        try:
            KeyRing.load(bad)
        except KeyFileError:
            texts.append(traceback.format_exc())
        logging.getLogger("t").warning("ring %s entry %r", ring, ring._entries[ring.primary_id])
        try:
            ring.derive("x", key_id="nope")
        except KeyError:
            texts.append(traceback.format_exc())
    texts.append(caplog.text)
    texts += capsys.readouterr()
    blob = "\n".join(texts)
    for needle in (secret_b64, raw.hex(), derived.hex(), base64.b64encode(derived).decode()):
        assert needle not in blob
    assert "redacted" in texts[3]


def test_secrets_cannot_be_pickled(keys):
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(keys._entries[keys.primary_id])


def test_client_id_is_keyed_hash_of_bearer_token(keys):
    other = KeyRing.generate()
    cid = client_id_from_token("sk-abc", keys)
    assert cid.startswith("c_") and "sk-abc" not in cid
    assert cid == client_id_from_token("sk-abc", keys) != client_id_from_token("sk-abc", other)
    assert identify({"authorization": "Bearer sk-abc", "x-distillguard-tenant": "acme"}, keys,
                    tenant_header="x-distillguard-tenant", default_tenant="default") == (cid, "acme")
    assert identify({}, keys, tenant_header="x-distillguard-tenant", default_tenant="default") == ("anonymous", "default")


def test_client_ids_are_remembered_per_key_ring_and_the_memo_is_bounded(keys, monkeypatch):
    import hashlib
    import hmac

    import defense.identity as identity

    macs = []
    real = keys.mac
    monkeypatch.setattr(keys, "mac", lambda purpose, data, **kw: macs.append(data) or real(purpose, data, **kw))
    want = "c_" + hmac.new(keys.derive("client-id"), b"sk-abc", hashlib.sha256).hexdigest()[:24]
    assert client_id_from_token("sk-abc", keys) == client_id_from_token("sk-abc", keys) == want
    assert macs == [b"sk-abc"]  # the repeat was a lookup
    monkeypatch.setattr(identity, "_MEMO_MAX", 3)
    tokens = [f"sk-{i}" for i in range(7)]
    ids = [client_id_from_token(t, keys) for t in tokens]
    assert len(keys.memo("client-id")) <= 3
    assert ids == ["c_" + hmac.new(keys.derive("client-id"), t.encode(), hashlib.sha256).hexdigest()[:24]
                   for t in tokens]


def test_signed_profile_round_trip_and_forgery(keys):
    signed = sign_profile(Profile(tier="gold", strength=2.0), "req-1", keys=keys, now=1000.0, ttl_s=60)
    assert verify_profile(signed, "req-1", keys=keys, now=1010.0) == Profile(tier="gold", strength=2.0)
    assert verify_profile(decode_from_engine(encode_for_engine(signed)), "req-1", keys=keys, now=1010.0) is not None
    assert verify_profile(signed, "req-2", keys=keys, now=1010.0) is None  # bound to the request
    assert verify_profile(signed, "req-1", keys=keys, now=1061.0) is None  # expired
    forged = type(signed)(Profile(strength=0.0).payload(), signed.signature, signed.key_id, signed.expires_at_ms)
    assert verify_profile(forged, "req-1", keys=keys, now=1010.0) is None
    assert verify_profile(signed, "req-1", keys=KeyRing.generate(), now=1010.0) is None
    assert decode_from_engine({"dg_profile": "zz"}) is None
