"""The engine side of distillguard, shared by both vLLM adapters and free of vLLM itself.

``EngineDefense.from_environment()`` reads the same config and key file as the sidecar
(DISTILLGUARD_CONFIG, DISTILLGUARD_KEYS) and builds only the config's sampling defenses: the engine
process never opens the budget store or any other admission or response state. No config, or a config
without a sampling defense, gives None, and the adapters then pass logits through untouched.

Per request it turns the extra args into a ``RowState`` (verified profile -> RequestContext with the
profile's strength); per step it runs the chain's sampling defenses over the whole batch at once.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from defense.base import Mode, SamplingDefense
from defense.chain import DefenseChain
from defense.clock import SYSTEM_CLOCK, Clock
from defense.config import LoadedConfig, load_config
from defense.runtime import build_runtime
from defense.settings import read_environment
from defense.types import RequestContext

from .batch import RowState, StepView
from .xargs import ProfileReader, ProfileSource, log

if TYPE_CHECKING:
    import torch

    from defense.keys import KeyRing


def sampling_only(loaded: LoadedConfig) -> LoadedConfig:
    """The config with its sampling defenses alone: what the engine process builds (not the ones that are
    off either: antidistillation sampling would load its proxy model for nothing)."""
    kept = tuple(b for b in loaded.defenses if issubclass(b.cls, SamplingDefense) and b.mode is not Mode.OFF)
    return replace(loaded, defenses=kept)


def _is_watermark(defense: object) -> bool:
    # a watermark defense object means its base module was imported; when it was not, nothing is one, and
    # importing it just to check (it pulls in scipy for the detectors) is skipped
    base = sys.modules.get("defense.watermark.base")
    return base is not None and isinstance(defense, base.WatermarkDefense)


class EngineDefense:
    """The config's sampling defenses, the key ring that verifies profiles, and the clock that expires them."""

    def __init__(self, chain: DefenseChain, keys: KeyRing, *, model: str = "", clock: Clock = SYSTEM_CLOCK) -> None:
        if not chain.sampling:
            raise ValueError("EngineDefense needs a chain with at least one sampling defense")
        self.chain = chain
        self.model = model
        self.clock = clock
        self.profiles = ProfileReader(keys)
        self.names = tuple(e.name for _, e in chain.sampling)
        # a profile may turn the watermark off for its request (Profile.watermark): each watermark runs
        # wrapped so it leaves those rows as it found them, and every defense still runs once per step
        entries = [replace(e, defense=_SkipRows(e.defense)) if _is_watermark(e.defense) else e
                   for e in chain.entries]
        self._skippers = tuple(e.defense for e in entries if isinstance(e.defense, _SkipRows))
        self.has_watermark = bool(self._skippers)
        self.step = (DefenseChain(entries, metrics=chain.metrics, clock=clock, identity=chain.identity)
                     if self.has_watermark else chain)
        self._anonymous = itertools.count()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_environment(cls, *, model: str = "", clock: Clock = SYSTEM_CLOCK) -> EngineDefense | None:
        """None (pass-through) when DISTILLGUARD_CONFIG is unset or names no sampling defense.

        A config that is set but broken raises: an engine that silently ran undefended would be worse
        than one that refuses to start.
        """
        path = read_environment().config_path
        if path is None:
            log.info("distillguard: plugin inactive (DISTILLGUARD_CONFIG is not set); logits pass through")
            return None
        return cls.from_config(path, model=model, clock=clock)

    @classmethod
    def from_config(cls, path: str, *, model: str = "", clock: Clock = SYSTEM_CLOCK) -> EngineDefense | None:
        loaded = sampling_only(load_config(path))
        if not loaded.defenses:
            log.info("distillguard: plugin inactive (config %s has no sampling defense); logits pass through", path)
            return None
        rt = build_runtime(loaded=loaded, clock=clock)  # the key file is required: profiles are signed
        assert rt.keys is not None  # noqa: S101 - build_runtime raises KeyFileError when there is none
        engine = cls(rt.chain, rt.keys, model=model, clock=clock)
        log.info("distillguard: plugin active with sampling defenses %s (config %s)", ", ".join(engine.names), path)
        return engine

    # -- per request -----------------------------------------------------------------------------
    def row(self, extra_args: Mapping[str, object] | None, *, temperature: float | None = None,
            seed: int | None = None, prefix: Sequence[int] | None = None) -> RowState:
        """The state of one request entering the batch: its verified profile as a RequestContext."""
        profile, rid, source = self.profiles.read(extra_args, now=self.clock.now())
        if not rid:
            # defenses that keep per-row caches (antidistillation sampling) tell rows apart by request id
            rid = f"vllm-{next(self._anonymous)}"
        ctx = RequestContext(
            request_id=rid,
            client_id="",
            model=self.model,
            temperature=None if temperature is None else float(temperature),
            seed=seed,
            strength=profile.strength,
            labels={"profile": source.value, "tier": profile.tier},
        )
        return RowState(ctx, prefix, plain=self.has_watermark and not profile.watermark)

    # -- per step ---------------------------------------------------------------------------------
    def process(self, logits: torch.Tensor, view: StepView, prefixes: Any = None) -> torch.Tensor:
        """logits [B, V] float32, pre-temperature -> [B, V]; every sampling defense over the whole batch.

        ``prefixes`` overrides the view's (V2 passes a [B, L] device tensor).
        """
        for skipper in self._skippers:
            skipper.plain = view.plain
        return self.step.process_logits(logits, view.prefixes if prefixes is None else prefixes, view.ctxs)

    def close(self) -> None:
        self.chain.close()


class _SkipRows(SamplingDefense):
    """A watermark that leaves untouched the rows whose profile turned the watermark off.

    ``plain`` ([B, 1] bool on the logits' device, or None) is set by ``EngineDefense.process`` before each
    step; the engine runs one step at a time.
    """

    def __init__(self, inner: SamplingDefense) -> None:
        super().__init__(deps=inner.deps)
        self.inner = inner
        self.plain: torch.Tensor | None = None

    def process_logits(self, logits: torch.Tensor, prefixes: Sequence[Sequence[int]],
                       ctxs: Sequence[RequestContext]) -> torch.Tensor:
        out = self.inner.process_logits(logits, prefixes, ctxs)
        if self.plain is None:
            return out
        import torch

        return torch.where(self.plain, logits, out)

    def is_argmax_invariant(self) -> bool:
        return self.inner.is_argmax_invariant()

    def close(self) -> None:
        self.inner.close()


class EngineShare:
    """What every adapter vLLM builds for one engine shares: the defenses (loaded once) and the logits
    tensor the last of them returned.

    vLLM builds one processor per entry point and one per class named in ``--logits-processors``; named
    both ways (which the V1 runner under async scheduling needs, see v1.py) the plugin sits twice in the
    same pipeline. The second instance recognizes the tensor the first just returned and passes it on,
    so no defense runs twice in a step; an instance whose sibling is not in its pipeline (a runner that
    rebuilt its processors) sees fresh logits and applies the defenses itself.
    """

    def __init__(self, engine: EngineDefense | None) -> None:
        self.engine = engine
        self._last: weakref.ref[Any] | None = None

    def already_applied(self, logits: Any) -> bool:
        return self._last is not None and self._last() is logits

    def applied(self, logits: Any, out: Any) -> Any:
        if out is not logits:  # an unchanged tensor is no mark: rerunning a no-op step is harmless
            self._last = weakref.ref(out)
        return out


_SHARES: weakref.WeakValueDictionary[int, EngineShare] = weakref.WeakValueDictionary()


def engine_share(vllm_config: Any) -> EngineShare:
    """The engine's share, loading the defenses on the first call for this ``vllm_config``.

    Adapters hold ``vllm_config`` and the share while they live, so the config's id cannot be reused by
    another engine meanwhile.
    """
    share = _SHARES.get(id(vllm_config))
    if share is None:
        share = _SHARES[id(vllm_config)] = EngineShare(
            EngineDefense.from_environment(model=served_model_name(vllm_config)))
    elif share.engine is not None:
        log.info("distillguard: plugin built twice for one engine (entry point and --logits-processors); "
                 "its defenses still run once per step")
    return share


def served_model_name(vllm_config: Any) -> str:
    """The model name requests use, for the RequestContext (defenses keyed on the model read it)."""
    mc = getattr(vllm_config, "model_config", None)
    name = getattr(mc, "served_model_name", None) or getattr(mc, "model", None) or ""
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name)


__all__ = ["EngineDefense", "EngineShare", "ProfileSource", "RowState", "StepView", "engine_share",
           "sampling_only", "served_model_name"]
