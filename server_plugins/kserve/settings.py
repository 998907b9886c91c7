"""The KServe proxy's own small YAML: where it listens, where Triton is, and what each model's outputs are.

Kept apart from the defense config (whose schema stays as it is): the defense config says how requests
are judged and outputs perturbed; this file says how the Open Inference Protocol maps onto that. Strict
like the main config: an unknown key or a wrong type is refused with the field's path and the valid keys.

    listen: ["0.0.0.0:8101"]
    upstream: 127.0.0.1:8001
    models:
      mlp:
        probabilities: [probs]      # full probability vectors along the last axis: perturbed
        logprobs: [logprobs]        # full log-probability vectors: perturbed
        strip: [logits]             # never returned (raw scores leak the most per query)
        passthrough: [label]        # returned unchanged
        # any other output of the model is stripped as well: only declared outputs leave the proxy
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from defense.config import check_listen_address
from defense.errors import ConfigError
from defense.schema import from_mapping

MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelSpec:
    probabilities: tuple[str, ...] = ()
    logprobs: tuple[str, ...] = ()
    strip: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    # the first dimension of every input and output is the batch: each row is keyed by its own input
    # bytes, so the same input gets the same noise whatever else shares its batch (no averaging over
    # batch companions). false: the whole request is one context.
    batched: bool = True

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for kind in ("probabilities", "logprobs", "strip", "passthrough"):
            for name in getattr(self, kind):
                if not name:
                    raise ValueError(f"{kind} has an empty output name")
                if name in seen:
                    raise ValueError(f"output {name!r} is listed under both {seen[name]} and {kind}")
                seen[name] = kind

    @property
    def protected(self) -> frozenset[str]:
        return frozenset(self.probabilities) | frozenset(self.logprobs)

    @property
    def returned(self) -> frozenset[str]:
        return self.protected | frozenset(self.passthrough)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: tuple[str, ...] = ("127.0.0.1:8101",)
    upstream: str = "127.0.0.1:8001"  # Triton's gRPC endpoint: host:port or unix:/path
    upstream_timeout_s: float = 30.0  # per call, shortened to the client's own deadline when that is sooner
    # summed input tensor data per request; larger requests are refused (INVALID_ARGUMENT) before
    # admission, so an oversized tensor never costs a budget or reaches Triton
    max_input_bytes: int = 16 * 1024 * 1024
    # gRPC message limit, both directions; a little above max_input_bytes so the clear error above is
    # what a client sees, not gRPC's own RESOURCE_EXHAUSTED (which a client could mistake for a throttle)
    max_message_bytes: int = 32 * 1024 * 1024
    # forward a request to Triton while it is still being admitted (what Triton gets never depends on the
    # admission), so the two overlap; the answer is held until the request is admitted, and a refused or
    # invalid request's upstream call is cancelled (its answer is never returned, though Triton may have
    # computed it). Only for a client whose last request was admitted, at most early_forward_max_in_flight
    # of its calls at a time, and never for a request that names shared memory, classification or sequence
    # parameters (a stateful model's state must not advance for a refused request). So a client that is
    # throttled costs Triton at most that many computations before its requests wait for admission again.
    # false: every request is admitted before Triton sees it.
    early_forward: bool = True
    early_forward_max_in_flight: int = 2
    metadata_ttl_s: float = 60.0  # how long a model's upstream metadata (input and output specs) is cached
    forward_metadata: tuple[str, ...] = ()  # client metadata keys passed to Triton (authorization never is)
    metrics_port: int | None = None  # Prometheus /metrics (the defense chain's families); null: none
    metrics_host: str = "127.0.0.1"
    grace_s: float = 5.0  # in-flight calls get this long after SIGTERM
    models: Mapping[str, ModelSpec] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen needs at least one address ('host:port' or 'unix:/path.sock')")
        for addr in self.listen:
            check_listen_address(addr)
        if not self.upstream:
            raise ValueError("upstream must name Triton's gRPC endpoint ('host:port' or 'unix:/path')")
        if not 0 < self.upstream_timeout_s <= 3600:
            raise ValueError(f"upstream_timeout_s must be in (0, 3600], got {self.upstream_timeout_s}")
        if not 1 <= self.max_input_bytes <= 1 << 30:
            raise ValueError(f"max_input_bytes must be in 1..{1 << 30}, got {self.max_input_bytes}")
        if not 1024 <= self.max_message_bytes <= 2 << 30:
            raise ValueError(f"max_message_bytes must be in 1024..{2 << 30}, got {self.max_message_bytes}")
        if self.max_message_bytes <= self.max_input_bytes:
            raise ValueError(f"max_message_bytes ({self.max_message_bytes}) must be larger than max_input_bytes "
                             f"({self.max_input_bytes}): a request carries its tensors plus their descriptions")
        if not 1 <= self.early_forward_max_in_flight <= 1024:
            raise ValueError(f"early_forward_max_in_flight must be in 1..1024, got {self.early_forward_max_in_flight}")
        if self.metadata_ttl_s < 0:
            raise ValueError(f"metadata_ttl_s must be >= 0, got {self.metadata_ttl_s}")
        if any(k.lower() == "authorization" for k in self.forward_metadata):
            raise ValueError("forward_metadata must not include authorization: the bearer token identifies the "
                             "client to distillguard and is never passed on")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not self.models:
            raise ValueError("models must declare at least one model and its outputs; "
                             "requests for other models are refused")
        for name in self.models:
            if not name:
                raise ValueError("a model name must not be empty")


def parse_settings(data: Any) -> ProxySettings:
    return from_mapping(ProxySettings, data)


def load_settings(path: str | os.PathLike[str]) -> ProxySettings:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read KServe proxy config: {e.strerror}", path=str(p)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"KServe proxy config is {len(raw)} bytes, more than {MAX_FILE_BYTES}", path=str(p))
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", path=str(p)) from None
    try:
        return parse_settings(data)
    except ConfigError as e:
        raise ConfigError(e.detail, path=f"{p}: {e.path}" if e.path else str(p)) from None
