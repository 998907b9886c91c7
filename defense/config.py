"""YAML -> validated, frozen configuration.

Strict: an unknown key or a wrong type fails with the field's path and the valid choices; each
defense's ``params`` block is validated against that defense's ``Params`` dataclass at load, so
``distillguard config check`` catches everything a start would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from .base import Defense, Mode, OnError
from .errors import ConfigError
from .registry import Registry, default_registry
from .schema import from_mapping, join
from .settings import read_environment
from .types import LogprobsMode

DEFAULT_STATE_URI = "sqlite:////var/lib/distillguard/state.db"
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config is text a person wrote; anything larger is a mistake


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: mutual TLS, clients must present a certificate it signed


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: tuple[str, ...] = ("unix:.distillguard/sidecar.sock",)
    metrics_port: int | None = 9464  # null: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    grace_s: float = 5.0  # in-flight RPCs get this long after SIGTERM
    # after SIGTERM, health answers NOT_SERVING for this long while RPCs are still served, so load
    # balancers and fronts move away before the socket closes
    drain_s: float = 1.0
    max_message_bytes: int = 4 * 1024 * 1024  # 256 positions x 20 alternatives is about 60 KB packed
    admin_token_file: str | None = None  # or DISTILLGUARD_ADMIN_TOKEN
    tls: TlsSettings | None = None
    reload_poll_s: float = 2.0  # config file change check; SIGHUP reloads at once; 0 disables polling

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen needs at least one address ('unix:/path.sock' or 'host:port')")
        for addr in self.listen:
            check_listen_address(addr)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be >= 0, got {self.drain_s}")
        if not 1024 <= self.max_message_bytes <= 1 << 30:
            raise ValueError(f"max_message_bytes must be in 1024..{1 << 30}, got {self.max_message_bytes}")
        if self.reload_poll_s < 0:
            raise ValueError(f"reload_poll_s must be >= 0, got {self.reload_poll_s}")


def check_listen_address(addr: str) -> str:
    if addr.startswith("unix:"):
        if not addr[5:]:
            raise ValueError(f"listen address {addr!r} has no socket path")
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {addr!r} must be 'unix:/path.sock' or 'host:port'")
    return addr


@dataclass(frozen=True, slots=True)
class StateSettings:
    # SQLAlchemy-style: sqlite:///relative/to/cwd.db, sqlite:////absolute.db, redis://host:port/db, memory://
    uri: str = DEFAULT_STATE_URI

    def __post_init__(self) -> None:
        scheme = self.uri.partition("://")[0]
        if scheme not in ("sqlite", "redis", "rediss", "memory") or "://" not in self.uri:
            raise ValueError(f"state.uri {self.uri!r} must start with sqlite://, redis://, rediss:// or memory://")


@dataclass(frozen=True, slots=True)
class KeySettings:
    file: str | None = None  # DISTILLGUARD_KEYS overrides; `distillguard keys new FILE` makes one


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    tenant_header: str = "x-distillguard-tenant"
    default_tenant: str = "default"
    # HTTP fronts: the client id is the keyed hash of this header's value ("authorization": of the Bearer token)
    client_header: str = "authorization"
    chars_per_token: float = 4.0  # a front without a tokenizer reserves ceil(chars / 4) prompt tokens
    default_max_tokens: int = 256  # reserved when a request does not say

    def __post_init__(self) -> None:
        if self.chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be > 0, got {self.chars_per_token}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not self.client_header or not self.tenant_header:
            raise ValueError("client_header and tenant_header must not be empty")


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    ttl_s: float = 600.0  # a signed profile older than this is treated as unsigned (default profile)

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")


@dataclass(frozen=True, slots=True)
class FrontSettings:
    """The OpenAI-compatible HTTP fronts: Envoy's ext_proc (served by the sidecar) and the ASGI middleware."""

    envoy_ext_proc: bool = False  # serve envoy.service.ext_proc.v3.ExternalProcessor on server.listen
    # what the engine returns: raw (before temperature and logits processors; vLLM's default) | processed
    engine_logprobs_mode: LogprobsMode = LogprobsMode.RAW
    # a path that is neither guarded (/v1/completions, /v1/chat/completions) nor in pass_paths: refuse (404)
    # closes side doors such as /v1/responses or /invocations; pass forwards it untouched
    unknown_paths: Literal["refuse", "pass"] = "refuse"
    pass_paths: tuple[str, ...] = ("/v1/models", "/health", "/version", "/ping")
    max_body_bytes: int = 1 << 20  # a request body above this is refused (413) before it is parsed
    client_xargs: tuple[str, ...] = ()  # vllm_xargs keys a client may set; every other one is stripped

    def __post_init__(self) -> None:
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ValueError(f"max_body_bytes must be in 1024..{1 << 30}, got {self.max_body_bytes}")
        for p in self.pass_paths:
            if not p.startswith("/"):
                raise ValueError(f"pass_paths entries are absolute paths starting with '/', got {p!r}")
        for k in self.client_xargs:
            if k.startswith("dg_"):
                raise ValueError(f"client_xargs cannot include {k!r}: dg_* keys carry the signed profile")


@dataclass(frozen=True, slots=True)
class DefenseSpec:
    type: str
    name: str | None = None  # defaults to the type name; must be unique in the chain
    mode: Mode = Mode.ENFORCE
    on_error: OnError | None = None  # null: the defense's own default
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Config:
    version: int = 1
    server: ServerSettings = ServerSettings()
    state: StateSettings = StateSettings()
    keys: KeySettings = KeySettings()
    identity: IdentitySettings = IdentitySettings()
    profile: ProfileSettings = ProfileSettings()
    front: FrontSettings = FrontSettings()
    defenses: tuple[DefenseSpec, ...] = ()

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"version must be 1, got {self.version}")


@dataclass(frozen=True, slots=True)
class BoundDefense:
    """A defense spec resolved against the registry, with its params validated."""

    name: str
    type: str
    cls: type[Defense]
    mode: Mode
    on_error: OnError
    params: Any


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: Config
    defenses: tuple[BoundDefense, ...]
    source: str = "<memory>"
    sha256: str = ""


def bind_defenses(cfg: Config, registry: Registry) -> tuple[BoundDefense, ...]:
    bound: list[BoundDefense] = []
    seen: set[str] = set()
    for i, spec in enumerate(cfg.defenses):
        path = join("defenses", i)
        try:
            cls = registry.resolve(spec.type)
        except ConfigError as e:
            raise ConfigError(e.detail, path=join(path, "type")) from None
        name = spec.name or (spec.type if ":" not in spec.type else cls.__name__.lower())
        if name in seen:
            raise ConfigError(f"duplicate defense name {name!r}; give one of them a distinct 'name'", path=path)
        seen.add(name)
        params = from_mapping(cls.Params, spec.params, join(path, "params"))
        on_error = spec.on_error or getattr(cls, "default_on_error", OnError.FAIL_OPEN)
        bound.append(BoundDefense(name=name, type=spec.type, cls=cls, mode=spec.mode, on_error=on_error, params=params))
    return tuple(bound)


def parse_config(data: Any, *, registry: Registry | None = None, source: str = "<memory>", sha256: str = "") -> LoadedConfig:
    cfg = from_mapping(Config, data)
    return LoadedConfig(cfg, bind_defenses(cfg, registry or default_registry()), source=source, sha256=sha256)


def load_config(path: str | os.PathLike[str] | None = None, *, registry: Registry | None = None) -> LoadedConfig:
    """Read and validate a config file; ``path`` None means DISTILLGUARD_CONFIG."""
    if path is None:
        path = read_environment().config_path
        if path is None:
            raise ConfigError("no config file given and DISTILLGUARD_CONFIG is not set")
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", path=str(p)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file is {len(raw)} bytes, more than {MAX_CONFIG_BYTES}", path=str(p))
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", path=str(p)) from None
    return parse_config(data, registry=registry, source=str(p), sha256=hashlib.sha256(raw).hexdigest())
