"""Client identity from what a front sees: a keyed hash of the bearer token, never the raw token."""

from __future__ import annotations

from collections.abc import Mapping

from .keys import KeyRing

_PURPOSE = "client-id"


def client_id_from_token(token: str, keys: KeyRing) -> str:
    """``c_`` + 24 hex chars of HMAC-SHA256(client-id key, token). Stable across restarts and replicas
    sharing a key file; the token itself is never stored or logged."""
    return "c_" + keys.mac(_PURPOSE, token.encode()).hex()[:24]


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
