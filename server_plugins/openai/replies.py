"""Local replies in OpenAI's error shape: what a front sends instead of forwarding a request."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# refusals the Contracts map to HTTP statuses; the error "type" is what OpenAI SDKs switch on
INVALID_REQUEST = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def error_reply(status: int, message: str, *, type: str = INVALID_REQUEST, code: str | None = None,  # noqa: A002
                param: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    body = json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()
    return Reply(status, (("content-type", "application/json"), *headers), body)


def throttle_reply(message: str, *, code: str, retry_after_s: float) -> Reply:
    """429 with Retry-After and RateLimit headers (whole seconds, rounded up: retrying then fits)."""
    secs = str(max(1, math.ceil(retry_after_s)))
    headers = (("retry-after", secs), ("ratelimit-remaining", "0"), ("ratelimit-reset", secs))
    return error_reply(429, message or "rate limited", type="rate_limit_error", code=code or "rate_limited",
                       headers=headers)
