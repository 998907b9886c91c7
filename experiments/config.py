"""Study configs: one YAML per study under experiments/configs/, loaded strictly.

Loading reuses ``defense.schema.from_mapping``: an unknown key names itself and lists the valid ones, a
wrong type names the field. ``--set a.b=VALUE`` overrides are applied to the raw YAML before validation,
with VALUE parsed as YAML (so ``--set seeds=[0,1]`` gives a list). Each defense entry is also checked
against the defense registry and its ``Params`` at load, through the same path a sidecar config takes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from defense.errors import ConfigError
from defense.schema import from_mapping, to_mapping

TRACKS = ("classifier", "lm", "reasoning", "budget")
BASELINE = "none"  # the undefended teacher; every track runs it, and a defense may not take the name
# harness-level defenses: knobs of the serving stack, not chain defenses
SAMPLING_TEMPERATURE = "sampling_temperature"
HARNESS_TYPES = (SAMPLING_TEMPERATURE,)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class DefenseEntry:
    """One defense of the study and the values of the parameter it is swept over (its strengths)."""

    name: str
    type: str  # a registry type name, 'package.module:Class', or a harness type (sampling_temperature)
    params: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    param: str | None = None  # the swept parameter; null: one setting, given by params
    values: tuple[Any, ...] = ()
    tracks: tuple[str, ...] = ()  # empty: every track the defense's kind applies to
    mode: Literal["enforce", "shadow"] = "enforce"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name == BASELINE:
            raise ValueError(f"name must be non-empty, without '/', and not {BASELINE!r}, got {self.name!r}")
        if self.param is not None and not self.values:
            raise ValueError(f"param {self.param!r} is swept but values is empty")
        if self.values and self.param is None:
            raise ValueError("values are given but param (the parameter they set) is not")
        if self.param is not None and "." not in self.param and self.param in self.params:
            raise ValueError(f"param {self.param!r} is swept; remove it from params")
        bad = [t for t in self.tracks if t not in TRACKS]
        if bad:
            raise ValueError(f"unknown track(s) {bad}; valid: {', '.join(TRACKS)}")
        if self.type == SAMPLING_TEMPERATURE and self.param not in (None, "t"):
            raise ValueError(f"{SAMPLING_TEMPERATURE} sweeps its temperature 't', got param {self.param!r}")

    @property
    def strengths(self) -> tuple[Any, ...]:
        return self.values if self.param is not None else (None,)

    def label(self, value: Any) -> str:
        return self.name if self.param is None else f"{self.name}({self.param}={value})"


@dataclass(frozen=True)
class ApiConfig:
    """How the teacher is queried: the chain in this process, or a sidecar process over gRPC."""

    path: Literal["in_process", "sidecar"] = "in_process"
    timeout_s: float = 10.0
    model: str = "teacher"  # the model name requests carry (part of the canonical context)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class AttackConfig:
    """How the distiller collects its data. Adaptive parts are off by default."""

    name: str = "base"
    repeats: int = 1  # each query sent this many times (distinct request ids), answers averaged
    near_dups: int = 0  # each query also sent as this many variants, answers averaged
    # canonical: whitespace/case variants (same canonical context); distinct: a variant the canonical form
    # tells apart (a paraphrase, a nudged input) that the model answers the same way
    near_dup_kind: Literal["canonical", "distinct"] = "canonical"
    temperature_pair: tuple[float, float] | None = None  # lm: query at two temperatures and difference them
    accounts: int = 1  # the queries are split round-robin over this many client ids
    filter_correct: bool = False  # reasoning: keep only traces whose final answer is right
    # classifier: train on the argmax of each answer, throwing away soft labels a defense may have bent
    hard_labels: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"attack name must be non-empty and without '/', got {self.name!r}")
        for name in ("repeats", "accounts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.near_dups < 0:
            raise ValueError(f"near_dups must be >= 0, got {self.near_dups}")
        if self.temperature_pair is not None:
            t1, t2 = self.temperature_pair
            if t1 <= 0 or t2 <= 0 or t1 == t2:
                raise ValueError(f"temperature_pair needs two different temperatures > 0, got {self.temperature_pair}")

    @property
    def requests_per_query(self) -> int:
        return self.repeats * (1 + self.near_dups) * (2 if self.temperature_pair else 1)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")


@dataclass(frozen=True)
class ClassifierTrack:
    """scikit-learn digits teacher; Knockoff-style attackers querying in- or out-of-distribution."""

    enabled: bool = True
    attackers: tuple[Literal["ood", "indist"], ...] = ("ood", "indist")
    output: Literal["probabilities", "top1"] = "probabilities"  # what the API returns per query
    queries: int = 2000  # distinct queries per attacker
    teacher_hidden: tuple[int, ...] = (128, 64)
    teacher_epochs: int = 80
    teacher_lr: float = 1e-3
    student_hidden: tuple[int, ...] = (64,)
    student_epochs: int = 60
    student_lr: float = 2e-3
    split_seed: int = 0  # fixes which digits train the teacher, feed the attacker, and test
    benign_loss_max_pts: float = 0.5  # the utility constraint the summary applies
    attacks: tuple[AttackConfig, ...] = (AttackConfig(),)

    def __post_init__(self) -> None:
        _positive(self, "queries", "teacher_epochs", "teacher_lr", "student_epochs", "student_lr")
        if not self.attackers:
            raise ValueError("attackers needs at least one of 'ood', 'indist'")


@dataclass(frozen=True)
class LMSpec:
    """A model shape from the shared factory, or a local model folder (then the shape is ignored)."""

    arch: Literal["llama", "gpt2"] = "llama"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    model_folder: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "hidden", "layers", "heads")


@dataclass(frozen=True)
class RadioactivityConfig:
    """Closed-box radioactivity of SFT students trained on watermarked text.

    Runs in cells whose chain holds a watermark (a sampling defense with a ``detector()``): the SFT
    student is sampled and its deduplicated tokens scored by the watermark's own closed-box test. In
    the first seed's watermark cells, ``clean_students`` students trained on unwatermarked text are
    tested the same way for the false-positive count.
    """

    enabled: bool = False
    student_tokens: int = 5000  # tokens sampled from the suspect (the test scores the distinct ones)
    clean_students: int = 20
    clean_student_steps: int = 100
    clean_queries: int = 200  # unwatermarked teacher continuations each clean student trains on

    def __post_init__(self) -> None:
        _positive(self, "student_tokens", "clean_student_steps", "clean_queries")
        if self.clean_students < 0:
            raise ValueError(f"clean_students must be >= 0, got {self.clean_students}")


@dataclass(frozen=True)
class LMTrack:
    """A tiny causal LM teacher; attackers SFT on sampled text and KD on the returned top-k logprobs."""

    enabled: bool = True
    corpus: Literal["synthetic", "files"] = "synthetic"
    text_files: tuple[str, ...] = ()  # corpus: files (a folder is searched recursively)
    corpus_docs: int = 4000
    vocab_size: int = 2048
    teacher: LMSpec = LMSpec()
    teacher_steps: int = 300
    teacher_batch: int = 16
    teacher_lr: float = 3e-3
    seq_len: int = 128
    student: LMSpec = LMSpec(hidden=64)
    student_steps: int = 200
    student_batch: int = 16
    student_lr: float = 3e-3
    queries: int = 400  # attacker prompts
    prompt_tokens: int = 16
    gen_tokens: int = 48
    top_k: int = 20  # top_logprobs the attacker asks for
    sample_temperature: float = 1.0
    gen_batch: int = 64
    # weight of cross entropy on the sampled text added to the KD loss. 0: the protocol's T2 attacker,
    # forward KL on the top-k plus the rest only. With 1 the text's gradient swamped the top-k term: the
    # clean KD student fell between SFT and KD-only, and defenses moved it less than seed noise
    kd_ce_weight: float = 0.0
    eval_docs: int = 100  # held-out documents for perplexity, KL and fidelity
    benign_queries: int = 100  # legitimate prompts for the utility metrics
    score: Literal["neg_kl", "fidelity", "neg_loss"] = "neg_kl"  # the student score S in the headline metrics
    tv_max: float = 0.10  # utility constraint for the summary (with top-1 agreement 1.0)
    radioactivity: RadioactivityConfig = RadioactivityConfig()
    attacks: tuple[AttackConfig, ...] = (AttackConfig(),)

    def __post_init__(self) -> None:
        _positive(self, "corpus_docs", "teacher_steps", "teacher_batch", "teacher_lr", "student_steps",
                  "student_batch", "student_lr", "queries", "prompt_tokens", "gen_tokens", "top_k",
                  "gen_batch", "eval_docs", "benign_queries")
        if self.sample_temperature < 0:
            raise ValueError(f"sample_temperature must be >= 0, got {self.sample_temperature}")
        if self.corpus == "files" and not self.text_files:
            raise ValueError("corpus 'files' needs text_files")
        if self.prompt_tokens + self.gen_tokens > self.seq_len:
            raise ValueError(f"prompt_tokens + gen_tokens ({self.prompt_tokens + self.gen_tokens}) "
                             f"must fit in seq_len ({self.seq_len})")


@dataclass(frozen=True)
class ProxySpec:
    """The proxy student antidistillation sampling needs, prepared once per study (reasoning track).

    The factory architecture trained for ``steps`` on the teacher's clean (greedy) traces of
    ``problems`` problems; its loss gradient is taken on the traces of ``holdout`` further problems.
    Both sets are disjoint from the evaluation problems and from every seed's distiller queries. At
    most ``max_param_ratio`` of the teacher's parameters (the issue's bound: a quarter).
    """

    arch: Literal["llama", "gpt2"] = "llama"
    hidden: int = 64
    layers: int = 1
    heads: int = 4
    problems: int = 2000  # clean teacher traces the proxy trains on
    steps: int = 150  # short: a partly trained proxy, as a pretrained model not yet distilled
    batch: int = 32
    lr: float = 3e-3
    holdout: int = 500  # clean teacher traces the loss gradient is taken on
    teacher_temperature: float = 0.0  # how the clean traces are generated (0: greedy)
    max_param_ratio: float = 0.25

    def __post_init__(self) -> None:
        _positive(self, "hidden", "layers", "heads", "problems", "batch", "lr", "holdout", "max_param_ratio")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.teacher_temperature < 0:
            raise ValueError(f"teacher_temperature must be >= 0, got {self.teacher_temperature}")


@dataclass(frozen=True)
class ReasoningTrack:
    """Synthetic multi-step arithmetic with written steps; students SFT on the teacher's traces."""

    enabled: bool = True
    min_steps: int = 2
    max_steps: int = 4
    max_value: int = 30
    teacher: LMSpec = LMSpec()
    teacher_problems: int = 30000
    teacher_steps: int = 600
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    student: LMSpec = LMSpec(hidden=96)
    student_steps: int = 300
    student_batch: int = 32
    student_lr: float = 3e-3
    queries: int = 1000  # problems the distiller asks
    eval_problems: int = 200
    base_temperature: float = 0.0  # what users get without a defense (0: greedy)
    gen_tokens: int = 64
    gen_batch: int = 64
    acc_loss_max_pts: float = 2.0  # utility constraint for the summary
    proxy: ProxySpec = ProxySpec()  # for antidistillation sampling; built only when a study uses it
    attacks: tuple[AttackConfig, ...] = (AttackConfig(),)

    def __post_init__(self) -> None:
        _positive(self, "min_steps", "max_value", "teacher_problems", "teacher_steps", "teacher_batch",
                  "teacher_lr", "student_steps", "student_batch", "student_lr", "queries", "eval_problems",
                  "gen_tokens", "gen_batch")
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) must be >= min_steps ({self.min_steps})")
        if self.max_value < 10:
            raise ValueError(f"max_value must be >= 10 (single-digit operands), got {self.max_value}")
        if self.base_temperature < 0:
            raise ValueError(f"base_temperature must be >= 0, got {self.base_temperature}")


@dataclass(frozen=True)
class BudgetTrack:
    """Simulated legitimate users and distillers through the admission path, on the classifier teacher."""

    enabled: bool = False
    legit_users: int = 20
    legit_requests: int = 40  # per user, spread over the horizon
    distillers: int = 1
    distiller_queries: int = 2000  # per distiller, spread over the horizon
    accounts: int = 1  # each distiller splits its queries over this many client ids
    horizon_s: float = 3600.0  # simulated time (an injected clock; nothing sleeps)
    checkpoints: tuple[int, ...] = (250, 500, 1000, 2000)  # admitted queries at which a student is trained
    attacker: Literal["ood", "indist"] = "indist"

    def __post_init__(self) -> None:
        _positive(self, "legit_users", "legit_requests", "distillers", "distiller_queries", "accounts", "horizon_s")
        if not self.checkpoints or any(c < 1 for c in self.checkpoints):
            raise ValueError(f"checkpoints must be positive query counts, got {self.checkpoints}")


@dataclass(frozen=True)
class TracksConfig:
    classifier: ClassifierTrack = ClassifierTrack()
    lm: LMTrack = LMTrack()
    reasoning: ReasoningTrack = ReasoningTrack()
    budget: BudgetTrack = BudgetTrack()


@dataclass(frozen=True)
class Study:
    name: str
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    # torch CPU threads; 0 keeps torch's default. One, because these models are tiny: on the 2-core
    # machine a second thread cost more in synchronization than it saved (a 64-wide LM step: 0.02 s on
    # one thread, 0.06 s on two), and far more when other processes share the cores
    threads: int = 1
    api: ApiConfig = ApiConfig()
    # defense specs (as in a distillguard config's ``defenses``) present in every cell, the baseline too
    chain: tuple[Mapping[str, Any], ...] = ()
    defenses: tuple[DefenseEntry, ...] = ()
    bootstrap: int = 1000  # resamples for the intervals
    tracks: TracksConfig = TracksConfig()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be non-empty and without '/', got {self.name!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        names = [d.name for d in self.defenses]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"defense names must be unique, repeated: {dup}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    def enabled_tracks(self) -> list[str]:
        return [t for t in TRACKS if getattr(self.tracks, t).enabled]


# -- overrides ---------------------------------------------------------------------------------------
def apply_overrides(doc: Any, overrides: Sequence[str]) -> Any:
    """Apply ``a.b.c=VALUE`` overrides (VALUE parsed as YAML) to a copy of the raw config mapping.

    A numeric path part indexes a list (``defenses.0.values=[1,2]``); missing mappings are created.
    """
    doc = copy.deepcopy(doc) if doc is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value is not valid YAML ({e})") from None
        parts = key.split(".")
        node = doc
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[: i + 1], create=True)
        _assign(node, parts[-1], value, parts)
    return doc


def _child(node: Any, part: str, path: list[str], *, create: bool) -> Any:
    where = ".".join(path)
    if isinstance(node, list):
        idx = _index(part, node, where)
        return node[idx]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {where}: {'.'.join(path[:-1]) or 'the config'} is not a mapping")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"--set {where}: no such key")
        node[part] = {}
    return node[part]


def _index(part: str, node: list, where: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"--set {where}: {part!r} indexes a list and must be an integer")
    idx = int(part)
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"--set {where}: index {idx} is out of range for a list of {len(node)}")
    return idx


def _assign(node: Any, part: str, value: Any, path: list[str]) -> None:
    where = ".".join(path)
    if isinstance(node, list):
        node[_index(part, node, where)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"--set {where}: the parent is not a mapping or list")


# -- loading -----------------------------------------------------------------------------------------
def parse_study(doc: Any, *, check_defenses: bool = True) -> Study:
    study = from_mapping(Study, doc)
    if check_defenses:
        for i, entry in enumerate(study.defenses):
            check_defense(study, entry, path=f"defenses[{i}]")
            check_prepared(entry, path=f"defenses[{i}]")
        if study.chain:
            from defense.config import parse_config

            try:
                parse_config({"version": 1, "defenses": list(study.chain)})
            except ConfigError as e:
                raise ConfigError(f"chain: {e}") from None
    return study


def load_study(path: str | Path, overrides: Sequence[str] = (), *, check_defenses: bool = True) -> tuple[Study, dict]:
    """Read, override and validate a study; returns it with the raw document it was built from."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read study config: {e.strerror}", path=str(p)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", path=str(p)) from None
    doc = apply_overrides(raw, overrides)
    return parse_study(doc, check_defenses=check_defenses), doc


def resolved(study: Study) -> dict:
    """The study with every default filled in: what a run saves beside its results."""
    return to_mapping(study)


def config_digest(study: Study) -> str:
    return hashlib.sha256(json.dumps(resolved(study), sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- defenses ----------------------------------------------------------------------------------------
def chain_doc(study: Study, entry: DefenseEntry | None, value: Any) -> dict:
    """The distillguard config (``defenses`` list) of one cell: the study's chain plus the cell's defense."""
    defenses = [_plain(d) for d in study.chain]
    if entry is not None and entry.type not in HARNESS_TYPES:
        params = _plain(entry.params)
        if entry.param is not None:
            # a dotted param reaches into nested params: limits.req.amount sweeps one budget limit
            *parents, leaf = entry.param.split(".")
            node = params
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"param {entry.param!r}: {part!r} is not a mapping in params")
            node[leaf] = value
        defenses.append({"type": entry.type, "name": entry.name, "mode": entry.mode, "params": params})
    return {"version": 1, "state": {"uri": "memory://"}, "defenses": defenses}


def _plain(obj: Any) -> Any:
    """Mappings (frozen MappingProxyType from the loader) as plain dicts, recursively."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def check_defense(study: Study, entry: DefenseEntry, *, path: str) -> None:
    """Resolve the type and validate its params at every strength, naming the study field on failure."""
    if entry.type in HARNESS_TYPES:
        for v in entry.strengths:
            t = entry.params.get("t", v)
            if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0:
                raise ConfigError(f"temperature must be a number >= 0, got {t!r}", path=f"{path}.values")
        return
    from defense.config import parse_config

    for v in entry.strengths:
        try:
            parse_config(chain_doc(Study(name="check"), entry, v))
        except ConfigError as e:
            detail = e.detail
            where = e.path.replace("defenses[0]", path)
            if entry.param is not None and (where.endswith(f"params.{entry.param}")
                                            or (where == f"{path}.params" and entry.param in detail)):
                where = f"{path}.values"
            raise ConfigError(f"{detail}" + (f" (at {entry.param}={v!r})" if entry.param else ""),
                              path=where) from None


def defense_kind(entry: DefenseEntry) -> str:
    """'response', 'sampling', 'admission' or 'harness' (resolves the type through the registry)."""
    if entry.type in HARNESS_TYPES:
        return "harness"
    from defense.base import AdmissionDefense, SamplingDefense
    from defense.registry import default_registry

    cls = default_registry().resolve(entry.type)
    if issubclass(cls, SamplingDefense):
        return "sampling"
    if issubclass(cls, AdmissionDefense):
        return "admission"
    return "response"


# which tracks a defense of each kind applies to when its entry names none
KIND_TRACKS = {
    "response": ("classifier", "lm"),
    "sampling": ("lm", "reasoning"),
    "admission": ("classifier", "lm", "reasoning", "budget"),
    "harness": ("reasoning",),
}


# defenses whose inputs the harness prepares per study on some tracks: antidistillation sampling needs a
# proxy student and its loss gradient, which the reasoning track builds (a proxy trained on the
# teacher's clean traces). Elsewhere such an entry must give them in its params.
PREPARED_TRACKS = ("reasoning",)
PREPARED_PARAMS = ("proxy_path", "gradient_path")


def harness_prepared(entry: DefenseEntry) -> bool:
    """True for an antidistillation-sampling entry that leaves its proxy and gradient to the harness."""
    if entry.type in HARNESS_TYPES:
        return False
    from defense.antidistill.sampler import AntidistillSampling
    from defense.registry import default_registry

    cls = default_registry().resolve(entry.type)
    if not (isinstance(cls, type) and issubclass(cls, AntidistillSampling)):
        return False
    return not all(entry.params.get(k) for k in PREPARED_PARAMS)


def entry_tracks(entry: DefenseEntry) -> tuple[str, ...]:
    """The tracks a defense entry runs on: its ``tracks``, else those its kind applies to (for a
    harness-prepared antidistillation entry, only the tracks that prepare a proxy)."""
    if entry.tracks:
        return entry.tracks
    tracks = KIND_TRACKS[defense_kind(entry)]
    if harness_prepared(entry):
        tracks = tuple(t for t in tracks if t in PREPARED_TRACKS)
    return tracks


def check_prepared(entry: DefenseEntry, *, path: str) -> None:
    """A clear error for antidistillation sampling named on a track that cannot build its proxy."""
    if not entry.tracks or not harness_prepared(entry):
        return
    bad = [t for t in entry.tracks if t not in PREPARED_TRACKS]
    if bad:
        raise ConfigError(f"{entry.type} needs a proxy student and its loss gradient; the harness prepares "
                          f"them only on the {', '.join(PREPARED_TRACKS)} track, not on {', '.join(bad)}: "
                          f"drop {', '.join(bad)} from tracks, or give params {' and '.join(PREPARED_PARAMS)} "
                          "(a proxy model folder sharing that track's tokenizer and its saved gradient)",
                          path=f"{path}.tracks")


def defenses_for(study: Study, track: str) -> list[DefenseEntry]:
    return [entry for entry in study.defenses if track in entry_tracks(entry)]


def unresolvable_defenses(study_or_doc: Study | Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(name, type, reason) for each defense entry whose type does not resolve in this environment."""
    from defense.registry import default_registry

    entries = study_or_doc.defenses if isinstance(study_or_doc, Study) else study_or_doc.get("defenses") or ()
    out = []
    for e in entries:
        name, type_ = (e.name, e.type) if isinstance(e, DefenseEntry) else (e.get("name", "?"), e.get("type", ""))
        if type_ in HARNESS_TYPES:
            continue
        try:
            default_registry().resolve(type_)
        except ConfigError as err:
            out.append((name, type_, err.detail))
    return out
