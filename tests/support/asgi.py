"""A minimal in-process ASGI client for tests: one request, the whole answer (or a client that leaves early)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)


class Gone(OSError):
    """What a server's send raises once the client disconnected (uvicorn's ClientDisconnected is an OSError)."""


async def call(app: Any, method: str, path: str, body: bytes | dict | None = None, *,
               headers: dict[str, str] | None = None, leave_after_chunks: int | None = None) -> Answer:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    body = body or b""
    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    hdrs.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": hdrs, "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000)}
    answer = Answer()
    sent_body = False
    gone = asyncio.Event()

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        if gone.is_set():
            raise Gone("client disconnected")
        if msg["type"] == "http.response.start":
            answer.status = msg["status"]
            answer.headers = {k.decode().lower(): v.decode() for k, v in msg.get("headers", [])}
        elif msg["type"] == "http.response.body":
            if msg.get("body"):
                answer.chunks.append(msg["body"])
            if leave_after_chunks is not None and len(answer.chunks) >= leave_after_chunks:
                gone.set()

    await app(scope, receive, send)
    return answer


def sse_events(body: bytes) -> list[Any]:
    """The JSON payloads of an SSE body ([DONE] as the string)."""
    out = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out
