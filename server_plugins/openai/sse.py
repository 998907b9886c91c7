"""Server-sent events split across chunks, and gzip/deflate bodies, decoded and re-encoded incrementally."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\r|\n")
DONE = b"[DONE]"


class SSERewriter:
    """Feed chunks as they arrive; get back whole events, each data payload passed through ``rewrite``.

    An event split across chunks is held until its blank line arrives, so ``rewrite`` always sees a whole
    JSON document. ``rewrite(data) -> bytes | None`` returns the new data payload, or None to drop the event.
    ``data: [DONE]``, comments and other fields pass unchanged.
    """

    def __init__(self, rewrite: Callable[[bytes], bytes | None]) -> None:
        self._rewrite = rewrite
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf + chunk if self._buf else chunk
        out = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            # "\r\n\r\n" can also arrive as "\r\n" then "\r\n" in the next chunk; a lone "\r" at the end of a
            # chunk may be half of "\r\n": the regex sees only complete separators in the joined buffer
            out.append(self._event(buf[start:m.start()]))
            start = m.end()
        self._buf = buf[start:]
        return b"".join(out)

    def close(self) -> bytes:
        """The last event, if the stream ended without its blank line."""
        rest, self._buf = self._buf, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, raw: bytes) -> bytes:
        lines = _LINE.split(raw)
        data: list[bytes] = []
        other: list[bytes] = []
        for line in lines:
            if line.startswith(b"data:"):
                v = line[5:]
                data.append(v[1:] if v.startswith(b" ") else v)
            elif line:
                other.append(line)
        if not data:
            return raw + b"\n\n" if raw else b""
        payload = b"\n".join(data)
        if payload.strip() != DONE:
            new = self._rewrite(payload)
            if new is None:
                return b""
            payload = new
        return b"".join(line + b"\n" for line in other) + b"data: " + payload + b"\n\n"


class UnsupportedEncoding(ValueError):
    pass


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def supported_encoding(name: str) -> bool:
    return name in ("", "identity") or name in _WBITS


class BodyCodec:
    """Decode a response body's content-encoding as it streams in, and encode the rewritten body the same way.

    ``max_decoded`` bounds what a compressed body may expand to (a gzip bomb is refused, not buffered).
    """

    def __init__(self, encoding: str, *, max_decoded: int) -> None:
        enc = encoding.strip().lower()
        if not supported_encoding(enc):
            raise UnsupportedEncoding(f"content-encoding {encoding!r} is not supported (gzip, deflate, identity)")
        self.identity = enc in ("", "identity")
        self.max_decoded = max_decoded
        self._decoded = 0
        if not self.identity:
            self._d = zlib.decompressobj(_WBITS[enc])
            self._e = zlib.compressobj(6, zlib.DEFLATED, _WBITS[enc])

    def decode(self, data: bytes) -> bytes:
        if self.identity:
            return data
        try:
            out = self._d.decompress(data, self.max_decoded - self._decoded + 1)
        except zlib.error as e:  # labelled compressed, but not: refused like any body the front cannot read
            raise UnsupportedEncoding(f"the body is not valid for its content-encoding: {e}") from None
        self._decoded += len(out)
        if self._decoded > self.max_decoded or self._d.unconsumed_tail:
            raise UnsupportedEncoding(f"the decoded body is larger than {self.max_decoded} bytes")
        return out

    def encode(self, data: bytes, *, final: bool) -> bytes:
        """Compress a piece; each piece is flushed so a streamed event reaches the client at once."""
        if self.identity:
            return data
        out = self._e.compress(data)
        return out + self._e.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
