"""What travels to the engine in a request's extra args (vLLM ``vllm_xargs`` / ``SamplingParams.extra_args``).

A front (Envoy ext_proc, the ASGI middleware) strips every client-supplied ``dg_*`` key and adds the
profile Admit signed, plus the request id it is bound to (``engine_args``). The plugin verifies it with
the key file (``read_profile``); anything short of a valid, unexpired signature by a known key gives the
default profile, so a forged or stale profile can never lower a request's defenses below the default.

Import-light on purpose: fronts import it without torch or vLLM.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from enum import StrEnum

from defense.keys import KeyRing
from defense.profile import (
    DEFAULT_PROFILE,
    Profile,
    SignedProfile,
    decode_from_engine,
    encode_for_engine,
    verify_profile,
)

log = logging.getLogger("vllm.distillguard")  # a child of vLLM's logger: shows up in vLLM's own log

PREFIX = "dg_"  # every key we read starts with it; fronts drop client-supplied keys with this prefix
REQUEST_ID = "dg_rid"  # the request id the profile's signature is bound to


class ProfileSource(StrEnum):
    SIGNED = "signed"  # a valid signature: the profile as Admit chose it
    ABSENT = "absent"  # no profile in the request (no front, or a front without a sidecar): default
    INVALID = "invalid"  # forged, expired, malformed, bound to another request, or an unknown key: default


def engine_args(signed: SignedProfile, request_id: str) -> dict[str, str]:
    """The ``vllm_xargs`` entries a front adds for one request (all strings, as vLLM accepts)."""
    return {**encode_for_engine(signed), REQUEST_ID: request_id}


def strip_client_args(args: Mapping[str, object] | None) -> dict[str, object]:
    """A client's ``vllm_xargs`` without our keys, so only the front can set them."""
    return {k: v for k, v in (args or {}).items() if not str(k).startswith(PREFIX)}


class ProfileReader:
    """Verifies the profile in a request's extra args, remembering what it verified.

    A request keeps the profile it was admitted with for its whole life: vLLM re-adds a preempted request
    to the batch, possibly after its signature expired, and it must not fall back to the default halfway
    through. Verified profiles are remembered in a bounded LRU keyed by everything the signature covers
    (payload, request id, expiry, key id), so only the exact args that once verified are taken again.
    """

    def __init__(self, keys: KeyRing, *, max_remembered: int = 8192) -> None:
        if max_remembered < 1:
            raise ValueError(f"max_remembered must be >= 1, got {max_remembered}")
        self.keys = keys
        self.max_remembered = max_remembered
        self._verified: OrderedDict[tuple[SignedProfile, str], Profile] = OrderedDict()

    def read(self, args: Mapping[str, object] | None, *, now: float) -> tuple[Profile, str, ProfileSource]:
        """(profile, request id or "", source) for one request's extra args."""
        if not args or not any(str(k).startswith(PREFIX) for k in args):
            return DEFAULT_PROFILE, "", ProfileSource.ABSENT
        rid = args.get(REQUEST_ID)
        rid = rid if isinstance(rid, str) and 0 < len(rid) <= 256 else ""
        signed = decode_from_engine(dict(args))
        if signed is None or not rid:
            return self._invalid(rid, "incomplete or malformed")
        seen = (signed, rid)
        known = self._verified.get(seen)
        if known is not None:
            self._verified.move_to_end(seen)
            return known, rid, ProfileSource.SIGNED
        profile = verify_profile(signed, rid, keys=self.keys, now=now)
        if profile is None:
            return self._invalid(rid, "no valid signature (forged, expired, or by an unknown key)")
        self._verified[seen] = profile
        if len(self._verified) > self.max_remembered:
            self._verified.popitem(last=False)
        return profile, rid, ProfileSource.SIGNED

    @staticmethod
    def _invalid(rid: str, why: str) -> tuple[Profile, str, ProfileSource]:
        # the request id only: the args could hold anything a client managed to smuggle in
        log.warning("distillguard: request %s carries a defense profile with %s; applying the default profile",
                    rid or "-", why)
        return DEFAULT_PROFILE, rid, ProfileSource.INVALID
