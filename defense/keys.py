"""Key file loading and derivation: the only place secrets are read.

A key file (YAML, mode 0600) maps key ids to base64 secrets with a status::

    version: 1
    keys:
      - id: k-20261125-3f9a
        status: active        # active: used to embed and sign; retired: still tried by detection
        secret: <base64, 32 bytes>
        created: "2026-11-25T11:30:00Z"

Defenses never see a master secret: they ask for a purpose-bound key derived with HKDF-SHA256
(RFC 5869), optionally per tenant. Secrets live in ``_Secret`` objects whose repr and str hide them, and
no error message built here includes key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from .errors import KeyFileError

MIN_SECRET_BYTES = 16
NEW_SECRET_BYTES = 32
STATUSES = ("active", "retired")
_HASH_LEN = 32


class _Secret:
    """Holds key bytes; prints as a placeholder so it cannot leak through logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<secret redacted>"

    __str__ = __repr__

    def __reduce__(self) -> tuple:  # never pickled into a worker or a checkpoint by accident
        raise TypeError("key material cannot be pickled")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    status: str
    secret: _Secret
    created: str = ""


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 extract-then-expand."""
    if not 1 <= length <= 255 * _HASH_LEN:
        raise ValueError(f"length must be in 1..{255 * _HASH_LEN}, got {length}")
    prk = hmac.new(salt or b"\0" * _HASH_LEN, ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range((length + _HASH_LEN - 1) // _HASH_LEN):
        block = hmac.new(prk, block + info + bytes([i + 1]), hashlib.sha256).digest()
        out += block
    return out[:length]


_SALT = b"distillguard/v1/hkdf"


class KeyRing:
    """The loaded key file. Embedding and signing use the primary key; detection tries them all."""

    def __init__(self, entries: list[KeyEntry], *, source: str = "<memory>") -> None:
        if not entries:
            raise KeyFileError(f"key file {source} has no keys; make one with: distillguard keys new FILE")
        ids = [e.key_id for e in entries]
        if len(set(ids)) != len(ids):
            raise KeyFileError(f"key file {source} repeats a key id")
        if not any(e.status == "active" for e in entries):
            raise KeyFileError(f"key file {source} has no active key (statuses: {', '.join(e.status for e in entries)})")
        self._entries = {e.key_id: e for e in entries}
        self.source = source
        # the newest active key (last in file order) embeds and signs; older active keys still verify
        self.primary_id = [e.key_id for e in entries if e.status == "active"][-1]
        self._cache: dict[tuple[str, str, str, int], bytes] = {}
        self._macs: dict[tuple[str, str, str], hmac.HMAC] = {}  # keyed HMAC states; never repr'd or pickled
        self._memos: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"KeyRing(source={self.source!r}, key_ids={list(self._entries)}, primary={self.primary_id!r})"

    @property
    def key_ids(self) -> list[str]:
        return list(self._entries)

    @property
    def active_ids(self) -> list[str]:
        return [k for k, e in self._entries.items() if e.status == "active"]

    def status(self, key_id: str) -> str:
        return self._entry(key_id).status

    def _entry(self, key_id: str) -> KeyEntry:
        try:
            return self._entries[key_id]
        except KeyError:
            raise KeyError(f"unknown key id {key_id!r}; known: {', '.join(self._entries)}") from None

    def derive(self, purpose: str, *, tenant: str = "", key_id: str | None = None, length: int = 32) -> bytes:
        """A key bound to ``purpose`` (and ``tenant``), derived from a master key with HKDF."""
        kid = key_id or self.primary_id
        ck = (kid, purpose, tenant, length)
        key = self._cache.get(ck)
        if key is None:
            info = b"\0".join((b"distillguard", purpose.encode(), tenant.encode()))
            key = hkdf_sha256(self._entry(kid).secret.reveal(), salt=_SALT, info=info, length=length)
            self._cache[ck] = key
        return key

    def candidates(self, purpose: str, *, tenant: str = "", include_retired: bool = True) -> Iterator[tuple[str, bytes]]:
        """(key_id, derived key) for every key detection should try, primary first."""
        order = [self.primary_id] + [k for k in self._entries if k != self.primary_id]
        for kid in order:
            if include_retired or self._entries[kid].status == "active":
                yield kid, self.derive(purpose, tenant=tenant, key_id=kid)

    def memo(self, purpose: str) -> dict:
        """A dict for results computed with this ring's keys (callers bound its size); it lives and goes
        with the ring, so a reloaded or rotated key file never serves a result of the old keys."""
        m = self._memos.get(purpose)
        if m is None:
            m = self._memos[purpose] = {}
        return m

    def mac(self, purpose: str, data: bytes, *, tenant: str = "", key_id: str | None = None) -> bytes:
        ck = (purpose, tenant, key_id or self.primary_id)
        keyed = self._macs.get(ck)
        if keyed is None:  # the keyed inner/outer states, made once: a copy is half the cost of hmac.new
            keyed = self._macs[ck] = hmac.new(self.derive(purpose, tenant=tenant, key_id=key_id), None, hashlib.sha256)
        h = keyed.copy()
        h.update(data)
        return h.digest()

    @classmethod
    def generate(cls, n_keys: int = 1) -> KeyRing:
        """A key ring held in memory only (tests, experiments)."""
        return cls([_new_entry() for _ in range(n_keys)])

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, check_permissions: bool = True) -> KeyRing:
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise KeyFileError(f"key file {p} does not exist; make one with: distillguard keys new {p}") from None
        except OSError as e:
            raise KeyFileError(f"cannot read key file {p}: {e.strerror}") from None
        if check_permissions and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {p} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"fix it with: chmod 600 {p}"
            )
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            # the parser's message could quote a line of the file: report only where it failed
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise KeyFileError(f"key file {p} is not valid YAML{at} ({type(e).__name__})") from None
        return cls(_parse_entries(data, str(p)), source=str(p))


def _parse_entries(data: object, source: str) -> list[KeyEntry]:
    if not isinstance(data, dict) or set(data) - {"version", "keys"} or not isinstance(data.get("keys"), list):
        raise KeyFileError(f"key file {source} must be a mapping with 'version: 1' and a 'keys' list")
    if data.get("version", 1) != 1:
        raise KeyFileError(f"key file {source}: version must be 1")
    entries = []
    for i, item in enumerate(data["keys"]):
        where = f"key file {source}, keys[{i}]"
        if not isinstance(item, dict):
            raise KeyFileError(f"{where} must be a mapping with id, status, secret")
        unknown = set(item) - {"id", "status", "secret", "created"}
        if unknown:
            raise KeyFileError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; valid: id, status, secret, created")
        kid, status_, secret = item.get("id"), item.get("status", "active"), item.get("secret")
        if not isinstance(kid, str) or not kid or len(kid) > 64:
            raise KeyFileError(f"{where}: id must be a non-empty string of at most 64 characters")
        if status_ not in STATUSES:
            raise KeyFileError(f"{where} ({kid}): status must be one of {', '.join(STATUSES)}, got {status_!r}")
        if not isinstance(secret, str):
            raise KeyFileError(f"{where} ({kid}): secret must be a base64 string")
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{where} ({kid}): secret is not valid base64") from None
        if len(raw) < MIN_SECRET_BYTES:
            raise KeyFileError(f"{where} ({kid}): secret must be at least {MIN_SECRET_BYTES} bytes, got {len(raw)}")
        entries.append(KeyEntry(kid, status_, _Secret(raw), str(item.get("created", ""))))
    return entries


def _new_entry() -> KeyEntry:
    now = datetime.now(UTC)
    kid = f"k-{now:%Y%m%d}-{secrets.token_hex(3)}"
    return KeyEntry(kid, "active", _Secret(secrets.token_bytes(NEW_SECRET_BYTES)), now.strftime("%Y-%m-%dT%H:%M:%SZ"))


def write_new_key_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Create a key file with one fresh active key, mode 0600 from the first byte. Returns the key id."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise KeyFileError(f"{p} already exists; add a key with `distillguard keys rotate {p}` or pass --force")
    p.parent.mkdir(parents=True, exist_ok=True)
    entry = _new_entry()
    doc = {
        "version": 1,
        "keys": [{"id": entry.key_id, "status": "active", "created": entry.created,
                  "secret": base64.b64encode(entry.secret.reveal()).decode()}],
    }
    _write_private(p, doc)
    return entry.key_id


def rotate_key_file(path: str | os.PathLike[str], *, retire_old: bool = False) -> str:
    """Append a fresh active key (the new primary); optionally retire the others. Returns the new key id."""
    p = Path(path)
    ring = KeyRing.load(p)
    entry = _new_entry()
    keys = [{"id": e.key_id, "status": "retired" if retire_old else e.status, "created": e.created,
             "secret": base64.b64encode(e.secret.reveal()).decode()} for e in ring._entries.values()]
    keys.append({"id": entry.key_id, "status": "active", "created": entry.created,
                 "secret": base64.b64encode(entry.secret.reveal()).decode()})
    _write_private(p, {"version": 1, "keys": keys})
    return entry.key_id


def _write_private(p: Path, doc: dict) -> None:
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("# distillguard key file: secret. Keep it mode 0600 and out of version control.\n")
            yaml.safe_dump(doc, f, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
