"""Value types passed between fronts, the chain and the defenses.

All are frozen: a defense returns new values (``dataclasses.replace``) and never mutates its input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import numpy as np

from .errors import InvalidInput

_EMPTY: Mapping[str, str] = MappingProxyType({})


def dict_init(cls: type) -> type:
    """Give a frozen dataclass (with a ``__dict__``) an ``__init__`` that fills the instance dict in one update.

    The generated one calls ``object.__setattr__`` once per field, about 2 us for RequestContext's 25 on
    every request. Same signature, defaults, default factories and ``__post_init__``; the instance stays
    frozen (assignment still raises).
    """
    ns: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    params, body = [], []
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        if f.default is not dataclasses.MISSING:
            ns[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"_f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            body.append(f"    if {f.name} is _MISSING:\n        {f.name} = _f_{f.name}()")
        else:
            params.append(f.name)
    fill = ", ".join(f"{f.name!r}: {f.name}" for f in fields)
    src = "\n".join([f"def __init__(self, {', '.join(params)}):", *body, f"    self.__dict__.update({{{fill}}})"])
    if hasattr(cls, "__post_init__"):
        src += "\n    self.__post_init__()"
    exec(src, ns)  # noqa: S102 - source built from the class's own field names, as dataclasses does
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]
    return cls


_new, _set = object.__new__, object.__setattr__


def evolve(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` without re-running ``__post_init__``, for the admission hot path.

    Only for values already validated where they were made (a Rewrites validates its own fields);
    dataclasses.replace costs about 15 us per call on this machine, most of it revalidation. Classes
    with a ``__dict__`` (RequestContext, the widest) copy in one dict update, about 0.5 us.
    """
    new = object.__new__(type(obj))
    state = getattr(obj, "__dict__", None)
    if state is not None:
        d = new.__dict__
        d.update(state)
        d.update(changes)
        return new
    for name in type(obj).__slots__:
        object.__setattr__(new, name, changes[name] if name in changes else getattr(obj, name))
    return new


class Decision(StrEnum):
    ALLOW = "allow"
    ALLOW_MODIFIED = "allow_modified"
    THROTTLE = "throttle"
    DENY = "deny"

    @property
    def refuses(self) -> bool:
        return self in (Decision.THROTTLE, Decision.DENY)


class Api(StrEnum):
    IN_PROCESS = "in_process"
    OPENAI_COMPLETIONS = "openai_completions"
    OPENAI_CHAT = "openai_chat"
    KSERVE_V2 = "kserve_v2"


class OutputKind(StrEnum):
    TOP_LOGPROBS = "top_logprobs"  # values are log-probabilities of the returned alternatives
    PROBABILITIES = "probabilities"  # values are full probability vectors (classifier outputs)


class LogprobsMode(StrEnum):
    RAW = "raw"  # before temperature (vLLM's default)
    PROCESSED = "processed"  # after temperature and other logits processors


class SettleStatus(StrEnum):
    OK = "ok"
    CLIENT_ABORT = "client_abort"
    UPSTREAM_ERROR = "upstream_error"
    REFUSED = "refused"  # released by the chain because a later defense refused the request


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """Exactly one of the forms is set (or none, for a request whose prompt the front did not parse)."""

    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    tensor_bytes: bytes | None = None

    def __post_init__(self) -> None:
        if (self.text is not None) + (self.chat is not None) + (self.token_ids is not None) + (self.tensor_bytes is not None) > 1:
            given = [f for f in ("text", "chat", "token_ids", "tensor_bytes") if getattr(self, f) is not None]
            raise InvalidInput(f"a prompt has one form, got {', '.join(given)}")

    @property
    def n_chars(self) -> int:
        if self.text is not None:
            return len(self.text)
        if self.chat is not None:
            return sum(len(m.content) + len(m.role) for m in self.chat)
        if self.tensor_bytes is not None:
            return len(self.tensor_bytes)
        return 0


@dict_init
@dataclass(frozen=True)  # no slots: evolve() copies its 25 fields in one dict update on the hot path
class RequestContext:
    """One request as the chain sees it, built once at the edge by a front."""

    request_id: str
    client_id: str
    tenant: str = "default"
    model: str = ""
    api: Api = Api.IN_PROCESS
    prompt: Prompt = Prompt()
    prompt_tokens: int | None = None  # when the front has a tokenizer
    max_tokens: int | None = None  # None: the engine's default
    n: int = 1
    temperature: float | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # -1: "all alternatives", which request rules refuse by default
    logit_bias_entries: int = 0
    prompt_logprobs: bool = False
    echo: bool = False
    raw_logits_outputs: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    received_at: float = 0.0
    context_digest: bytes = b""
    strength: float = 1.0  # the profile's strength multiplier, raised by admission defenses
    # tensor APIs: the model's input as little-endian float32 bytes, row-major [rows, features], for what
    # reads the input itself (an OOD detector, a classifier proxy); the digest keys on the prompt instead
    input_values: bytes | None = None
    # tensor APIs: how many probability / logprob values the answer will return, when the front knows it
    # from the model's metadata (the budget reserves them at admission like max_tokens x top_logprobs)
    output_values: int | None = None
    # the front minted request_id in this process and settles it here, at most once (an in-process front:
    # the Envoy ext_proc, the ASGI middleware, the KServe proxy): no other process can ever settle it, so a
    # shared store needs no cross-process settled marker for it (the chain's ledger still catches a retry)
    private_id: bool = False

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidInput("request_id is required")
        if len(self.request_id) > 256:
            raise InvalidInput(f"request_id is at most 256 characters, got {len(self.request_id)}")
        if self.prompt_tokens is not None and self.prompt_tokens < 0:
            raise InvalidInput(f"prompt_tokens must be >= 0, got {self.prompt_tokens}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise InvalidInput(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.n < 1:
            raise InvalidInput(f"n must be >= 1, got {self.n}")
        if self.top_logprobs < -1:
            raise InvalidInput(f"top_logprobs must be >= -1 (-1 means all), got {self.top_logprobs}")
        if self.top_logprobs > 0 and not self.logprobs:
            # OpenAI requires logprobs=true with top_logprobs; we accept it and treat it as a logprobs request
            object.__setattr__(self, "logprobs", True)
        if self.output_values is not None and self.output_values < 0:
            raise InvalidInput(f"output_values must be >= 0, got {self.output_values}")
        if self.logit_bias_entries < 0:
            raise InvalidInput(f"logit_bias_entries must be >= 0, got {self.logit_bias_entries}")
        if self.temperature is not None and (not math.isfinite(self.temperature) or self.temperature < 0):
            raise InvalidInput(f"temperature must be finite and >= 0, got {self.temperature}")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise InvalidInput(f"strength must be finite and >= 0, got {self.strength}")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs != 0


@dataclass(frozen=True, slots=True)
class Cost:
    """What admission reserves before generation: the worst case the request may use."""

    requests: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob_values: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_tokens", "completion_tokens", "logprob_values"):
            v = getattr(self, name)
            if v < 0:
                raise InvalidInput(f"{name} must be >= 0, got {v}")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def estimate(cls, ctx: RequestContext, *, chars_per_token: float = 4.0, default_max_tokens: int = 256) -> Cost:
        """Reserve prompt tokens (counted, or ceil(chars / chars_per_token)) plus the clamped max_tokens."""
        if ctx.prompt_tokens is not None:
            prompt = ctx.prompt_tokens
        elif ctx.prompt.token_ids is not None:
            prompt = len(ctx.prompt.token_ids)
        else:
            prompt = math.ceil(ctx.prompt.n_chars / chars_per_token)
        completion = (ctx.max_tokens if ctx.max_tokens is not None else default_max_tokens) * ctx.n
        k = max(ctx.top_logprobs, 1) if ctx.wants_logprobs else 0
        values = completion * k + (prompt * k if ctx.prompt_logprobs or ctx.echo else 0)
        if ctx.output_values is not None:  # a tensor API that knows its output shapes
            values = ctx.output_values
        if prompt < 0 or completion < 0 or values < 0:
            return cls(requests=1, prompt_tokens=prompt, completion_tokens=completion, logprob_values=values)  # raises
        # checked just above: built without __post_init__'s field-by-field pass (once per Admit)
        cost = _new(cls)
        _set(cost, "requests", 1)
        _set(cost, "prompt_tokens", prompt)
        _set(cost, "completion_tokens", completion)
        _set(cost, "logprob_values", values)
        return cost


@dataclass(frozen=True, slots=True)
class Usage:
    """What a request actually used, reported at settle time."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob_values: int = 0
    status: SettleStatus = SettleStatus.OK

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "logprob_values"):
            v = getattr(self, name)
            if v < 0:
                raise InvalidInput(f"usage.{name} must be >= 0, got {v}")

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Rewrites:
    """Changes an admission defense makes to a request; merged conservatively across defenses."""

    top_logprobs: int | None = None
    max_tokens: int | None = None
    n: int | None = None
    drop_logit_bias: bool = False
    drop_prompt_logprobs: bool = False
    drop_echo: bool = False
    strip_outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("top_logprobs", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"rewrite {name} must be >= 0, got {v}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"rewrite n must be >= 1, got {self.n}")

    @property
    def empty(self) -> bool:
        # field by field: dataclass __eq__ builds two 7-tuples, and this runs several times per Admit
        return (self.top_logprobs is None and self.max_tokens is None and self.n is None and not self.drop_logit_bias
                and not self.drop_prompt_logprobs and not self.drop_echo and not self.strip_outputs)

    def merge(self, other: Rewrites) -> Rewrites:
        if self.empty:
            return other
        if other.empty:
            return self

        def low(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Rewrites(
            top_logprobs=low(self.top_logprobs, other.top_logprobs),
            max_tokens=low(self.max_tokens, other.max_tokens),
            n=low(self.n, other.n),
            drop_logit_bias=self.drop_logit_bias or other.drop_logit_bias,
            drop_prompt_logprobs=self.drop_prompt_logprobs or other.drop_prompt_logprobs,
            drop_echo=self.drop_echo or other.drop_echo,
            strip_outputs=tuple(dict.fromkeys(self.strip_outputs + other.strip_outputs)),
        )

    def apply(self, ctx: RequestContext) -> RequestContext:
        changes: dict[str, Any] = {}
        if self.top_logprobs is not None:
            changes["top_logprobs"] = self.top_logprobs
        if self.max_tokens is not None:
            changes["max_tokens"] = self.max_tokens
        if self.n is not None:
            changes["n"] = self.n
        if self.drop_logit_bias:
            changes["logit_bias_entries"] = 0
        if self.drop_prompt_logprobs:
            changes["prompt_logprobs"] = False
        if self.drop_echo:
            changes["echo"] = False
        if self.strip_outputs:
            changes["raw_logits_outputs"] = tuple(o for o in ctx.raw_logits_outputs if o not in self.strip_outputs)
        return evolve(ctx, **changes) if changes else ctx


NO_REWRITES = Rewrites()


@dataclass(frozen=True, slots=True)
class Verdict:
    """One admission defense's answer. Refusals are decisions, not errors."""

    decision: Decision = Decision.ALLOW
    reason: str = ""
    reason_code: str = ""
    retry_after_s: float = 0.0
    rewrites: Rewrites = NO_REWRITES
    strength: float = 1.0  # the profile strength multiplier this defense asks for
    reservation_id: str = ""

    def __post_init__(self) -> None:
        if self.retry_after_s < 0 or not math.isfinite(self.retry_after_s):
            raise ValueError(f"retry_after_s must be finite and >= 0, got {self.retry_after_s}")
        if self.decision is Decision.ALLOW and not self.rewrites.empty:
            object.__setattr__(self, "decision", Decision.ALLOW_MODIFIED)


ALLOW = Verdict()


@dataclass(frozen=True, slots=True)
class LogprobBatch:
    """What the engine returns for one request, packed: [P positions x K alternatives].

    ``token_ids`` uses -1 for a missing alternative (a position with fewer than K); its value is ignored.
    For ``PROBABILITIES`` each row is a full probability vector and ``token_ids`` may be empty (shape [P, 0]),
    meaning column j is class j.
    """

    values: np.ndarray  # [P, K] float32: logprobs (TOP_LOGPROBS) or probabilities (PROBABILITIES)
    token_ids: np.ndarray  # [P, K] int64, or [P, 0] for dense probability vectors
    kind: OutputKind = OutputKind.TOP_LOGPROBS
    sampled_token_ids: np.ndarray | None = None  # [P] int64
    sampled_values: np.ndarray | None = None  # [P] float32
    temperature: float = 1.0
    logprobs_mode: LogprobsMode = LogprobsMode.RAW
    position_offset: int = 0  # row 0 is this generated position (streamed chunks); keys the noise

    def __post_init__(self) -> None:
        v, t = self.values, self.token_ids
        if not isinstance(v, np.ndarray) or v.ndim != 2:
            raise InvalidInput(f"values must be a 2-D array [positions, k], got {getattr(v, 'shape', type(v))}")
        if not isinstance(t, np.ndarray) or t.ndim != 2:
            raise InvalidInput(f"token_ids must be a 2-D array [positions, k], got {getattr(t, 'shape', type(t))}")
        if t.shape != v.shape and not (self.kind is OutputKind.PROBABILITIES and t.shape == (v.shape[0], 0)):
            raise InvalidInput(f"token_ids shape {t.shape} does not match values shape {v.shape}")
        if v.shape[0] > 0 and v.shape[1] == 0:
            raise InvalidInput("each position needs at least one value (k >= 1)")
        for name, arr in (("sampled_token_ids", self.sampled_token_ids), ("sampled_values", self.sampled_values)):
            if arr is not None and arr.shape != (v.shape[0],):
                raise InvalidInput(f"{name} must have shape ({v.shape[0]},), got {arr.shape}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInput(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.position_offset < 0:
            raise InvalidInput(f"position_offset must be >= 0, got {self.position_offset}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    @classmethod
    def shaped(cls, values: np.ndarray, token_ids: np.ndarray, kind: OutputKind) -> LogprobBatch:
        """A batch from arrays its caller shaped itself, so no re-validation: ``values`` [P, K] with K >= 1,
        ``token_ids`` [P, K] (or [P, 0] for dense probability vectors); the other fields at their defaults."""
        out = _new(cls)
        _set(out, "values", values)
        _set(out, "token_ids", token_ids)
        _set(out, "kind", kind)
        _set(out, "sampled_token_ids", None)
        _set(out, "sampled_values", None)
        _set(out, "temperature", 1.0)
        _set(out, "logprobs_mode", LogprobsMode.RAW)
        _set(out, "position_offset", 0)
        return out

    def with_values(self, values: np.ndarray, sampled_values: np.ndarray | None) -> LogprobBatch:
        """This batch with new values of the same shape (a defense's output): no re-validation."""
        if values.shape != self.values.shape:
            raise ValueError(f"with_values: shape {values.shape} != {self.values.shape}")
        out = _new(LogprobBatch)
        _set(out, "values", values)
        _set(out, "token_ids", self.token_ids)
        _set(out, "kind", self.kind)
        _set(out, "sampled_token_ids", self.sampled_token_ids)
        _set(out, "sampled_values", sampled_values)
        _set(out, "temperature", self.temperature)
        _set(out, "logprobs_mode", self.logprobs_mode)
        _set(out, "position_offset", self.position_offset)
        return out

    @property
    def present(self) -> np.ndarray:
        """[P, K] bool: which slots hold a real alternative."""
        if self.token_ids.shape == self.values.shape:
            return self.token_ids >= 0
        return np.ones(self.values.shape, dtype=bool)


def dense_ids(rows: int) -> np.ndarray:
    """The [rows, 0] token ids of dense probability vectors (column j is class j): one shared array per row
    count (it holds no element, so nothing can write to it)."""
    ids = _DENSE_IDS.get(rows)
    if ids is None:
        if len(_DENSE_IDS) >= 1024:
            _DENSE_IDS.clear()
        ids = _DENSE_IDS[rows] = np.empty((rows, 0), dtype=np.int64)  # writeable: numba types read-only apart
    return ids


_DENSE_IDS: dict[int, np.ndarray] = {}


@dataclass(frozen=True, slots=True)
class Detection:
    """A watermark or radioactivity test result; log10_p stays finite far into the tail."""

    key_id: str
    tokens_scored: int
    z: float
    log10_p: float
    detected: bool
    scheme: str = ""
