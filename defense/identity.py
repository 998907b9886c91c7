"""Client identity from what a front sees: a keyed hash of the bearer token, never the raw token."""

from __future__ import annotations

from collections.abc import Mapping

from .keys import KeyRing

_PURPOSE = "client-id"
_MEMO_MAX = 8192  # tokens whose ids a key ring remembers; the memo starts over when full


def client_id_from_token(token: str, keys: KeyRing) -> str:
    """``c_`` + 24 hex chars of HMAC-SHA256(client-id key, token). Stable across restarts and replicas
    sharing a key file; the token itself is never stored (beyond this process's memory) or logged.

    Each key ring remembers the ids of recent tokens (a front sees the same API keys over and over), so a
    repeat costs a dict lookup instead of an HMAC; a reloaded key file is a new ring with an empty memo."""
    memo = keys.memo(_PURPOSE)
    cid = memo.get(token)
    if cid is None:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        cid = memo[token] = "c_" + keys.mac(_PURPOSE, token.encode()).hex()[:24]
    return cid


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def identify(headers: Mapping[str, str], keys: KeyRing, *, tenant_header: str, default_tenant: str) -> tuple[str, str]:
    """(client_id, tenant) from request headers (lower-case names). No bearer token: client 'anonymous'."""
    token = bearer_token(headers.get("authorization"))
    client = client_id_from_token(token, keys) if token else "anonymous"
    tenant = (headers.get(tenant_header.lower()) or default_tenant).strip()[:64] or default_tenant
    return client, tenant
