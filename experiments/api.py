"""The defended teacher's API: every query goes through the real defense path.

``InProcessAPI`` calls a ``DefenseChain`` built from the cell's config; ``SidecarAPI`` starts
``distillguard serve`` with the same config and calls Admit, Protect and Settle over gRPC through
``server_plugins.client.SidecarClient``. Sampling defenses (watermark, antidistillation sampling) act per
token inside the engine and never cross an RPC, so both paths run them in this process from a chain
built from the same config and key file, as an engine plugin would.

The order per request is the serving order: admit (rewrites, strength) -> the engine computes ->
protect what it returns -> settle the actual usage.
"""

from __future__ import annotations

import abc
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from defense.chain import DefenseChain
from defense.clock import SYSTEM_CLOCK, Clock
from defense.config import parse_config
from defense.keys import KeyRing
from defense.metrics import Metrics
from defense.profile import SignedProfile
from defense.runtime import build_runtime
from defense.types import LogprobBatch, RequestContext, Usage

log = logging.getLogger("distillguard.experiments")


@dataclass(frozen=True, slots=True)
class Granted:
    """An admitted request: the context after rewrites (with digest and strength) and what settles it."""

    ctx: RequestContext
    reservation_id: str = ""
    profile: SignedProfile | None = None

    @property
    def top_logprobs(self) -> int:
        return self.ctx.top_logprobs

    @property
    def max_tokens(self) -> int | None:
        return self.ctx.max_tokens


class TeacherAPI(abc.ABC):
    """admit / protect / settle for one cell's defense config; counts refusals by reason code."""

    def __init__(self, chain: DefenseChain) -> None:
        self.chain = chain  # in-process chain: sampling defenses, and the whole path for InProcessAPI
        self.refusals: Counter[str] = Counter()
        self.requests = 0

    @property
    def has_sampling(self) -> bool:
        return bool(self.chain.sampling)

    @abc.abstractmethod
    def _admit(self, ctx: RequestContext) -> Granted | None: ...

    @abc.abstractmethod
    def protect(self, batch: LogprobBatch, granted: Granted) -> LogprobBatch: ...

    @abc.abstractmethod
    def settle(self, granted: Granted, usage: Usage) -> None: ...

    def admit(self, ctx: RequestContext) -> Granted | None:
        """None when the chain refused (throttle or deny); the refusal is counted by reason code."""
        self.requests += 1
        return self._admit(ctx)

    def process_logits(self, logits, prefixes: Sequence[Sequence[int]], ctxs: Sequence[RequestContext]):
        """logits: [B, V] float32 -> [B, V]: the chain's sampling defenses, in this process."""
        return self.chain.process_logits(logits, prefixes, ctxs) if self.chain.sampling else logits

    def answer(self, granted: Granted, batch: LogprobBatch, usage: Usage) -> LogprobBatch:
        """Protect what the engine returned, then settle: one request's response path."""
        out = self.protect(batch, granted)
        self.settle(granted, usage)
        return out

    def close(self) -> None:
        self.chain.close()

    def __enter__(self) -> TeacherAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessAPI(TeacherAPI):
    def _admit(self, ctx: RequestContext) -> Granted | None:
        adm = self.chain.admit(ctx)
        if not adm.allowed:
            self.refusals[adm.reason_code or adm.decision.value] += 1
            return None
        return Granted(adm.ctx, adm.reservation_id)

    def protect(self, batch: LogprobBatch, granted: Granted) -> LogprobBatch:
        return self.chain.protect(batch, granted.ctx).batch

    def settle(self, granted: Granted, usage: Usage) -> None:
        self.chain.settle(granted.ctx, usage)


class SidecarAPI(TeacherAPI):
    """A real ``distillguard serve`` child process on a Unix socket, queried through SidecarClient."""

    def __init__(self, chain: DefenseChain, doc: dict, *, key_file: Path, timeout_s: float, log_dir: Path) -> None:
        super().__init__(chain)
        from defense.sidecar.process import SidecarProcess
        from server_plugins.client import SidecarClient

        # a short directory: a Unix socket path must fit in 108 bytes, and run dirs can be deep
        self._tmp = tempfile.TemporaryDirectory(prefix="dg-exp-")
        sock = f"unix:{self._tmp.name}/s.sock"
        served = {**doc, "keys": {"file": str(Path(key_file).resolve())},
                  "server": {"listen": [sock], "metrics_port": None, "reload_poll_s": 0, "drain_s": 0, "grace_s": 1}}
        cfg = Path(self._tmp.name) / "sidecar.yaml"
        cfg.write_text(yaml.safe_dump(served, sort_keys=False))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = SidecarProcess(cfg, cwd=self._tmp.name, log_path=log_dir / "sidecar.log")
        self.client = SidecarClient(self.proc.target, timeout_s=timeout_s)

    def _admit(self, ctx: RequestContext) -> Granted | None:
        from defense.types import evolve

        res = self.client.admit(ctx)
        if not res.allowed:
            self.refusals[res.reason_code or res.decision.value] += 1
            return None
        # the engine sees the request as rewritten, with the digest and strength the sidecar computed
        granted_ctx = evolve(res.rewrites.apply(ctx), context_digest=res.context_digest, strength=res.strength)
        return Granted(granted_ctx, res.reservation_id, res.profile)

    def protect(self, batch: LogprobBatch, granted: Granted) -> LogprobBatch:
        c = granted.ctx
        return self.client.protect(batch, request_id=c.request_id, model=c.model, context_digest=c.context_digest,
                                   client_id=c.client_id, tenant=c.tenant, profile=granted.profile).batch

    def settle(self, granted: Granted, usage: Usage) -> None:
        self.client.settle(granted.ctx, usage, reservation_id=granted.reservation_id)

    def close(self) -> None:
        try:
            self.client.close()
            self.proc.stop()
        finally:
            self._tmp.cleanup()
            super().close()


def open_api(doc: dict, *, keys: KeyRing, key_file: Path, path: str = "in_process", timeout_s: float = 10.0,
             clock: Clock = SYSTEM_CLOCK, log_dir: Path | None = None) -> TeacherAPI:
    """The teacher API for one cell's config document (a distillguard config)."""
    loaded = parse_config(doc)
    rt = build_runtime(loaded=loaded, keys=keys, metrics=Metrics(), clock=clock)
    if path == "in_process":
        return InProcessAPI(rt.chain)
    if path == "sidecar":
        try:
            return SidecarAPI(rt.chain, doc, key_file=key_file, timeout_s=timeout_s,
                              log_dir=log_dir or Path(tempfile.gettempdir()))
        except BaseException:
            rt.chain.close()
            raise
    raise ValueError(f"unknown api path {path!r}; valid: in_process, sidecar")


def usage_for(batch: LogprobBatch, *, prompt_tokens: int) -> Usage:
    p, k = batch.values.shape
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=p, logprob_values=int(p * k))


def dense_ids(n_rows: int, n_classes: int) -> np.ndarray:
    """Column j is class j: the implicit ids of a dense probability vector, for the metric functions."""
    return np.broadcast_to(np.arange(n_classes, dtype=np.int64), (n_rows, n_classes))
