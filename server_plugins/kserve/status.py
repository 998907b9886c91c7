"""How the proxy answers what it refuses: gRPC status codes, messages and trailers.

Refusals are decisions of the chain, mapped the way Triton clients read them:
- throttle -> RESOURCE_EXHAUSTED, with ``google.rpc.RetryInfo`` in ``grpc-status-details-bin`` (what gRPC
  retry-aware clients read) and ``retry-after`` in seconds (what people and simple clients read);
- a request-rules refusal (the request asked for something the policy does not serve) -> FAILED_PRECONDITION,
  the gRPC sibling of HTTP 400; any other deny (a blocked client) -> PERMISSION_DENIED (HTTP 403);
Faults: malformed input -> INVALID_ARGUMENT, an upstream that cannot be reached -> UNAVAILABLE, a
fail-closed defense that failed -> INTERNAL.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from defense.chain import Admission, DefenseChain
from defense.rules import RequestRules
from defense.types import Decision

Trailers = tuple[tuple[str, str | bytes], ...]


class Refusal(Exception):  # noqa: N818 - an answer, not a failure
    """An error status the proxy answers with."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: Trailers = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


def retry_trailers(code: grpc.StatusCode, message: str, retry_after_s: float) -> Trailers:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),
            ("retry-after", str(max(1, math.ceil(retry_after_s)))))


def refusal(adm: Admission, chain: DefenseChain) -> Refusal:
    """The status for a refused admission; the reason text is the defense's, written for the client."""
    reason = adm.reason or "refused"
    code_tag = f" ({adm.reason_code})" if adm.reason_code else ""
    if adm.decision is Decision.THROTTLE:
        wait = f"; retry after {adm.retry_after_s:.3g} s" if adm.retry_after_s > 0 else ""
        message = f"rate limited by distillguard{code_tag}: {reason}{wait}"
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = retry_trailers(code, message, adm.retry_after_s) if adm.retry_after_s > 0 else ()
        return Refusal(code, message, trailers)
    by_rules = any(e.name == adm.decided_by and isinstance(e.defense, RequestRules) for e in chain.entries)
    code = grpc.StatusCode.FAILED_PRECONDITION if by_rules else grpc.StatusCode.PERMISSION_DENIED
    return Refusal(code, f"refused by distillguard{code_tag}: {reason}")


def upstream_refusal(err: grpc.aio.AioRpcError, upstream: str) -> Refusal:
    """Triton's own error, passed on with its code; an unreachable Triton says where it was looked for."""
    code = err.code()
    details = err.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        return Refusal(code, f"upstream Triton at {upstream} is unavailable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Refusal(code, f"upstream Triton at {upstream} did not answer in time")
    return Refusal(code, details)
