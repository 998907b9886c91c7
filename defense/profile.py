"""The per-request defense profile handed to an engine plugin, signed by the sidecar.

An engine plugin receives the profile through the engine's request (vLLM's ``vllm_xargs``), which a
client could try to forge. The payload is HMAC-SHA256 signed over (payload, request_id, expiry) with a
key derived from the key file; a plugin that gets no valid signature applies the default profile, never
the undefended path.
"""

from __future__ import annotations

import functools
import hmac
import json
import math
import struct
from dataclasses import asdict, dataclass

from .keys import KeyRing

_PURPOSE = "profile-signing"


@dataclass(frozen=True, slots=True)
class Profile:
    tier: str = "default"
    strength: float = 1.0  # multiplies the strength of perturbation and watermark defenses
    watermark: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.strength) or not 0 <= self.strength <= 100:
            raise ValueError(f"strength must be in [0, 100], got {self.strength}")

    def payload(self) -> bytes:
        return _payload(self)


@functools.lru_cache(maxsize=1024)  # profiles repeat (a few tiers x strengths); JSON per request is waste
def _payload(profile: Profile) -> bytes:
    return json.dumps(asdict(profile), sort_keys=True, separators=(",", ":")).encode()


DEFAULT_PROFILE = Profile()


@dataclass(frozen=True, slots=True)
class SignedProfile:
    payload: bytes
    signature: bytes
    key_id: str
    expires_at_ms: int


def _message(payload: bytes, request_id: str, expires_at_ms: int) -> bytes:
    rid = request_id.encode()
    return b"".join((struct.pack("<Q", len(payload)), payload, struct.pack("<Q", len(rid)), rid,
                     struct.pack("<q", expires_at_ms)))


def sign_profile(profile: Profile, request_id: str, *, keys: KeyRing, now: float, ttl_s: float) -> SignedProfile:
    payload = profile.payload()
    expires = int((now + ttl_s) * 1000)
    sig = keys.mac(_PURPOSE, _message(payload, request_id, expires))
    return SignedProfile(payload, sig, keys.primary_id, expires)


def verify_profile(signed: SignedProfile | None, request_id: str, *, keys: KeyRing, now: float) -> Profile | None:
    """The profile if the signature is valid, unexpired, and by a known key; else None (caller uses default)."""
    if signed is None or not signed.signature:
        return None
    if signed.key_id not in keys.key_ids or signed.expires_at_ms < now * 1000:
        return None
    want = keys.mac(_PURPOSE, _message(signed.payload, request_id, signed.expires_at_ms), key_id=signed.key_id)
    if not hmac.compare_digest(want, signed.signature):
        return None
    try:
        data = json.loads(signed.payload)
        return Profile(**data)
    except (ValueError, TypeError):
        return None


def encode_for_engine(signed: SignedProfile) -> dict[str, str]:
    """Flat string fields for an engine's extra-args channel (vLLM ``vllm_xargs`` takes str/int/float)."""
    return {
        "dg_profile": signed.payload.hex(),
        "dg_sig": signed.signature.hex(),
        "dg_kid": signed.key_id,
        "dg_exp": str(signed.expires_at_ms),
    }


def decode_from_engine(args: dict[str, object] | None) -> SignedProfile | None:
    if not args:
        return None
    try:
        return SignedProfile(bytes.fromhex(str(args["dg_profile"])), bytes.fromhex(str(args["dg_sig"])),
                             str(args["dg_kid"]), int(str(args["dg_exp"])))
    except (KeyError, ValueError):
        return None

