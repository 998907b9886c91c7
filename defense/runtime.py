"""Assemble a chain from a config file: the one path the CLI, the sidecar and notebooks share."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .base import Deps
from .chain import AdmissionLedger, DefenseChain
from .clock import SYSTEM_CLOCK, Clock
from .config import LoadedConfig, load_config
from .errors import KeyFileError
from .keys import KeyRing
from .metrics import Metrics
from .perturbation import kernels
from .settings import read_environment


def keys_path(loaded: LoadedConfig) -> str | None:
    """DISTILLGUARD_KEYS wins over the config's keys.file."""
    return read_environment().keys_path or loaded.config.keys.file


def load_keys(loaded: LoadedConfig, *, required: bool = True) -> KeyRing | None:
    path = keys_path(loaded)
    if path is None:
        if required:
            raise KeyFileError(
                "no key file: set keys.file in the config or DISTILLGUARD_KEYS; "
                "make one with: distillguard keys new .distillguard/keys.yaml"
            )
        return None
    return KeyRing.load(path)


@dataclass
class Runtime:
    loaded: LoadedConfig
    keys: KeyRing | None
    deps: Deps
    chain: DefenseChain


def build_runtime(
    path: str | os.PathLike[str] | None = None,
    *,
    loaded: LoadedConfig | None = None,
    keys: KeyRing | None = None,
    metrics: Metrics | None = None,
    clock: Clock = SYSTEM_CLOCK,
    require_keys: bool = True,
    ledger: AdmissionLedger | None = None,
    bookkeeping: Callable[[Callable[[], object]], object] | None = None,
) -> Runtime:
    """The live objects a config describes. ``bookkeeping``: see DefenseChain (servers on an event loop
    pass defense.deferred.soon)."""
    loaded = loaded or load_config(path)
    if keys is None:
        keys = load_keys(loaded, required=require_keys)
    deps = Deps(keys=keys, clock=clock, metrics=metrics or Metrics(), state_uri=loaded.config.state.uri)
    chain = DefenseChain.from_config(loaded, deps=deps, ledger=ledger, bookkeeping=bookkeeping)
    if chain.response:
        kernels.warm()  # compile (or load) the response path's kernels now, not in the first request
    if deps.metrics is not None:
        deps.metrics.set_config(loaded.sha256)
    return Runtime(loaded, keys, deps, chain)
