"""A minimal Redis client for the budget store: RESP2 over one socket (TCP or TLS), nothing else.

The store sends one EVALSHA per Admit and per Settle. A general client spends about half of such a call
in Python (command objects, per-argument encoding, response callbacks); here a call is one pre-packed
buffer, one ``sendall`` and a small recursive reader. Supported URIs:
``redis://[[user]:password@]host[:port][/db]`` and ``rediss://...`` with optional query arguments
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_cert_reqs`` (``required`` | ``none``).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

Arg = bytes | str | int | float


class RespError(Exception):
    """An error reply from the server (NOSCRIPT, WRONGPASS, a script error, ...)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    def __repr__(self) -> str:  # the password is a secret
        return f"Endpoint({'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db})"


def parse_uri(uri: str) -> Endpoint:
    u = urlsplit(uri)
    if u.scheme not in ("redis", "rediss"):
        raise ValueError(f"scheme must be redis or rediss, got {u.scheme!r}")
    if not u.hostname:
        raise ValueError("no host in the URI")
    path = u.path.lstrip("/")
    try:
        db = int(path) if path else 0
        port = u.port or 6379
    except ValueError:
        raise ValueError("the port and the database must be numbers") from None
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    unknown = set(q) - {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"}
    if unknown:
        raise ValueError(f"unknown query arguments {sorted(unknown)}; known: ssl_ca_certs, ssl_certfile, "
                         "ssl_keyfile, ssl_cert_reqs")
    reqs = q.get("ssl_cert_reqs", "required")
    if reqs not in ("required", "none"):
        raise ValueError(f"ssl_cert_reqs must be required or none, got {reqs!r}")
    return Endpoint(host=u.hostname, port=port, db=db, username=unquote(u.username) if u.username else None,
                    password=unquote(u.password) if u.password is not None else None, tls=u.scheme == "rediss",
                    ca_certs=q.get("ssl_ca_certs"), certfile=q.get("ssl_certfile"), keyfile=q.get("ssl_keyfile"),
                    verify=reqs == "required")


def _b(x: Arg) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    return repr(x).encode() if isinstance(x, float) else str(x).encode()


def pack(args: Sequence[Arg]) -> bytes:
    """One command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _b(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def pack_args(args: Sequence[Arg]) -> bytes:
    """Bulk strings without the array header: for pre-packing a command's fixed part."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(b), b) for b in map(_b, args))


class RespClient:
    """One connection, not thread-safe (the store calls it under its lock). Any failure closes it."""

    def __init__(self, endpoint: Endpoint, *, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._rfile = None

    def _connect(self) -> None:
        e = self.endpoint
        sock = socket.create_connection((e.host, e.port), timeout=self.timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small write per call: no Nagle wait
            if e.tls:
                ctx = ssl.create_default_context(cafile=e.ca_certs)
                if not e.verify:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                if e.certfile:
                    ctx.load_cert_chain(e.certfile, e.keyfile)
                sock = ctx.wrap_socket(sock, server_hostname=e.host)
            sock.settimeout(self.timeout_s)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._rfile = sock.makefile("rb")
        if e.password is not None:
            self.call(pack(["AUTH", e.username, e.password] if e.username else ["AUTH", e.password]))
        if e.db:
            self.call(pack(["SELECT", e.db]))

    def call(self, packed: bytes) -> object:
        """Send one packed command, return its reply (bytes, int, None or a list); RespError for an error reply."""
        if self._sock is None:
            self._connect()
        try:
            self._sock.sendall(packed)  # type: ignore[union-attr]
            return self._read()
        except RespError:
            raise
        except BaseException:
            self.close()  # a timeout or a broken stream leaves the connection in an unknown state
            raise

    def _read(self) -> object:
        line = self._rfile.readline()  # type: ignore[union-attr]
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by the server")
        kind = line[0]
        if kind == 36:  # $ bulk string
            n = int(line[1:-2])
            if n < 0:
                return None
            data = self._rfile.read(n + 2)  # type: ignore[union-attr]
            if len(data) != n + 2:
                raise ConnectionError("connection closed mid-reply")
            return data[:-2]
        if kind == 42:  # * array
            n = int(line[1:-2])
            return None if n < 0 else [self._read() for _ in range(n)]
        if kind == 58:  # : integer
            return int(line[1:-2])
        if kind == 43:  # + simple string
            return line[1:-2]
        if kind == 45:  # - error
            raise RespError(line[1:-2].decode(errors="replace"))
        raise ConnectionError(f"unexpected reply type {chr(kind)!r}")

    def close(self) -> None:
        sock, self._sock, rfile, self._rfile = self._sock, None, self._rfile, None
        for f in (rfile, sock):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


class Script:
    """EVALSHA with the script loaded on demand (after a server restart or SCRIPT FLUSH)."""

    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()  # noqa: S324 - Redis names scripts by SHA-1
        self._load = pack(["SCRIPT", "LOAD", source])

    def __call__(self, client: RespClient, packed_keys: bytes, n_keys: int, packed_args: bytes, n_args: int) -> object:
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + n_keys + n_args, self.sha)
        count = b"%d" % n_keys
        cmd = b"".join((head, b"$%d\r\n%s\r\n" % (len(count), count), packed_keys, packed_args))
        try:
            return client.call(cmd)
        except RespError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
            client.call(self._load)
            return client.call(cmd)
