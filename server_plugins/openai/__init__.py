"""The OpenAI-compatible HTTP front logic that Envoy's ext_proc server and the ASGI middleware share.

``Guard.start(method, path, headers)`` opens an ``Exchange`` for one HTTP request; the exchange takes the
request body (Admit: identify, refuse or rewrite), the response head and body (Protect the returned
logprobs, buffered JSON or streamed SSE, gzip or not) and settles exactly once, also on an abort or an
upstream error. It does no I/O itself: each front moves the bytes.
"""

from .exchange import Exchange, Forward, Guard, ResponsePlan
from .replies import Reply, error_reply

__all__ = ["Exchange", "Forward", "Guard", "Reply", "ResponsePlan", "error_reply"]
