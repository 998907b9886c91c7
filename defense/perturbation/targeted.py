"""Targeted perturbation: move returned probability mass against a proxy student's learning direction.

Random noise barely hurts a student; MAD and GRAD2 show that moving mass in the direction that most
misleads the student's gradient does. This defense redirects (see ``redirect.py``) within an L1 (or TV)
budget per row, keeping the argmax and the row's mass, for full probability vectors and for the top-k
slice of LLM logprobs. The proxy student gives the prediction ``s`` the redirection works against:

- ``uniform``: no model; s is flat, so mass moves from the likeliest alternatives to the least likely
  (what a randomly initialized student would learn from, at no cost);
- ``classifier``: a model-factory MLP folder; the query's input comes from the request's tensor bytes
  (the KServe v2 front and in-process callers put the input tensor there);
- ``lm``: a local causal LM folder sharing the teacher's tokenizer, or a random one of a given shape;
  it reads the prompt plus the sampled completion (bounded by ``max_proxy_tokens``) in one forward pass,
  and its prediction is taken over the returned alternatives only (what a top-k distiller fits).

A gate in the spirit of Adaptive Misinformation scales the budget by how out-of-distribution the query
looks: the teacher's own top-1 probability (high for familiar inputs) through a sigmoid, so benign
in-distribution queries pay little and synthetic or off-task ones get the full budget. The profile's
strength multiplies it. The result is deterministic in the request (no randomness at all).

The gate can instead read an input-density detector (``gate.detector``, ``ood.py``: Mahalanobis distance
to the training inputs, a far better OOD signal for images than the teacher's confidence), and with
``gate.misinform`` answer what it flags with misinformation, as Adaptive Misinformation does: the clean
ranking reversed, so flagged queries lose their argmax while in-distribution ones keep it. The detector and
the classifier proxy read the query's values from ``ctx.input_values`` (the KServe front fills it for a
model with one floating-point input) or, for in-process callers such as the experiments, from float32
``prompt.tensor_bytes``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..base import Deps
from ..errors import ConfigError, InvalidInput
from ..types import LogprobBatch, RequestContext
from .base import Reshape, column_ids
from .redirect import redirect

log = logging.getLogger("distillguard.perturbation.targeted")


@dataclass(frozen=True, slots=True)
class GateParams:
    enabled: bool = True
    tau: float = 0.7  # teacher top-1 probability below this reads as out of distribution
    nu: float = 25.0  # slope of the switch (Adaptive Misinformation uses a near-hard 1000)
    floor: float = 0.25  # share of the budget in-distribution queries still get
    # an input-density OOD detector (defense.perturbation.ood, fitted on the training inputs) in place of
    # the top-1 probability: the query's distance over the detector's threshold, through the same switch
    detector: str | None = None
    # Adaptive Misinformation: queries the gate reads as out of distribution get a wrong answer (the
    # returned ranking reversed: the least likely class on top, the confidence profile unchanged), mixed
    # in by the gate's value. In-distribution queries keep their argmax; these lose it by design.
    misinform: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.tau <= 1:
            raise ValueError(f"gate.tau must be in [0, 1], got {self.tau}")
        if not (math.isfinite(self.nu) and self.nu > 0):
            raise ValueError(f"gate.nu must be > 0, got {self.nu}")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"gate.floor must be in [0, 1], got {self.floor}")


@dataclass(frozen=True, slots=True)
class LMShape:
    """A random proxy LM of this shape when no folder is given (MAD: even a random surrogate helps)."""

    vocab_size: int = 0  # 0: required when proxy is lm without a folder
    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 2


@dataclass(frozen=True, slots=True)
class TargetedParams:
    epsilon: float = 0.3  # distortion budget per row at strength 1, in ``distance`` units
    distance: Literal["l1", "tv"] = "l1"  # TV is half the L1
    keep_argmax: bool = True
    floor: float = 0.05  # no alternative drops below 5% of its clean value: it stays visible to users
    proxy: Literal["uniform", "classifier", "lm"] = "uniform"
    proxy_path: str | None = None
    proxy_shape: LMShape = field(default_factory=LMShape)
    gate: GateParams = field(default_factory=GateParams)
    max_strength: float = 4.0
    max_proxy_tokens: int = 512  # per query: bounds the proxy's work
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.distance not in ("l1", "tv"):
            raise ValueError(f"distance must be 'l1' or 'tv', got {self.distance!r}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")
        if self.proxy not in ("uniform", "classifier", "lm"):
            raise ValueError(f"proxy must be uniform, classifier or lm, got {self.proxy!r}")
        if self.proxy == "classifier" and not self.proxy_path:
            raise ValueError("proxy: classifier needs proxy_path (a model-factory classifier folder)")
        if self.proxy == "lm" and not self.proxy_path and self.proxy_shape.vocab_size < 2:
            raise ValueError("proxy: lm needs proxy_path, or proxy_shape.vocab_size for a random proxy")
        if self.max_strength < 1:
            raise ValueError(f"max_strength must be >= 1, got {self.max_strength}")
        if self.max_proxy_tokens < 1:
            raise ValueError(f"max_proxy_tokens must be >= 1, got {self.max_proxy_tokens}")


class Targeted(Reshape):
    Params = TargetedParams

    def __init__(self, params: TargetedParams | None = None, *, deps: Deps | None = None) -> None:
        super().__init__(params, deps=deps)
        p: TargetedParams = self.params
        self._model: Any = None
        self._tokenizer: Any = None
        if p.proxy == "classifier":
            from ..models import load_classifier

            self._model, self._cfg = load_classifier(p.proxy_path)  # type: ignore[arg-type]
            self._model.to(p.device).eval()
        elif p.proxy == "lm":
            self._load_lm(p)
        self._detector = None
        if p.gate.detector == "auto":
            raise ConfigError("targeted: gate.detector 'auto' is filled in by the experiments harness; give the "
                              "path of a detector fitted with defense.perturbation.ood.InputDensity.fit(...).save(path)")
        if p.gate.detector:
            from .ood import InputDensity

            self._detector = InputDensity.load(p.gate.detector)
        # tensor fronts fill ctx.input_values only for defenses that read the input
        self.reads_input_values = self._detector is not None or p.proxy == "classifier"

    def _load_lm(self, p: TargetedParams) -> None:
        if p.proxy_path:
            from ..models import load_model

            self._model, self._tokenizer = load_model(p.proxy_path, device=p.device)
            return
        from ..models import TinyLMConfig, build_lm

        shape = p.proxy_shape
        cfg = TinyLMConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                           num_heads=shape.num_heads, max_positions=max(256, p.max_proxy_tokens))
        self._model = build_lm(cfg, seed=0).to(p.device)  # token ids only: no tokenizer, prompts as ids

    # -- the gate and the budget ------------------------------------------------------------------------
    def ood(self, y: np.ndarray, present: np.ndarray, ctx: RequestContext) -> np.ndarray:
        """[P] in [0, 1]: how out of distribution each row's query reads (the gate's switch)."""
        g: GateParams = self.params.gate
        if self._detector is not None:
            score = self._detector.score(input_rows(ctx, y.shape[0], self._detector.dim, "OOD detector"))
            return 1.0 / (1.0 + np.exp(np.clip(-g.nu * (score - 1.0), -700, 700)))
        msp = np.where(present, y, 0.0).max(axis=1)
        return 1.0 / (1.0 + np.exp(np.clip(-g.nu * (g.tau - msp), -700, 700)))

    def budget(self, y: np.ndarray, present: np.ndarray, ctx: RequestContext,
               ood: np.ndarray | None = None) -> np.ndarray:
        """[P] L1 budget per row: epsilon x strength x the out-of-distribution gate."""
        p: TargetedParams = self.params
        eps = p.epsilon * (2.0 if p.distance == "tv" else 1.0) * min(max(ctx.strength, 0.0), p.max_strength)
        if not p.gate.enabled:
            return np.full(y.shape[0], eps)
        g = p.gate
        ood = self.ood(y, present, ctx) if ood is None else ood
        return eps * (g.floor + (1.0 - g.floor) * ood)

    # -- the proxy's prediction on the returned slots ----------------------------------------------------
    def proxy_probs(self, batch: LogprobBatch, ctx: RequestContext) -> np.ndarray:
        """[P, K] the proxy student's probability of each returned alternative (flat for ``uniform``)."""
        shape = batch.values.shape
        if self._model is None:
            return np.full(shape, 1.0 / shape[1])
        if self.params.proxy == "classifier":
            return self._classifier_probs(batch, ctx)
        probs = self._lm_probs(batch, ctx)
        return probs if probs is not None else np.full(shape, 1.0 / shape[1])

    def _classifier_probs(self, batch: LogprobBatch, ctx: RequestContext) -> np.ndarray:
        import torch

        x = torch.from_numpy(input_rows(ctx, batch.values.shape[0], self._cfg.in_dim, "classifier proxy").copy())
        x = x.to(self.params.device)
        with torch.no_grad():
            probs = torch.softmax(self._model(x).double(), dim=-1).cpu().numpy()
        ids = np.clip(column_ids(batch), 0, probs.shape[1] - 1)
        return np.take_along_axis(probs, ids, axis=1)

    def _lm_probs(self, batch: LogprobBatch, ctx: RequestContext) -> np.ndarray | None:
        import torch

        from ..models.fastpath import last_hidden_states

        if batch.sampled_token_ids is None:
            return None  # without the completion the proxy cannot know what each position saw
        prompt_ids: list[int] = []
        if ctx.prompt.token_ids is not None:
            prompt_ids = list(ctx.prompt.token_ids)
        elif ctx.prompt.text is not None and self._tokenizer is not None:
            prompt_ids = self._tokenizer(ctx.prompt.text, add_special_tokens=False).input_ids
        if not prompt_ids:
            return None
        completion = batch.sampled_token_ids.tolist()
        seq = prompt_ids + completion
        first = len(prompt_ids) - 1  # logits at this index predict completion position 0
        cut = max(0, len(seq) - self.params.max_proxy_tokens)
        seq, first = seq[cut:], first - cut
        if first < 0:
            return None
        vocab = self._model.config.vocab_size
        ids_t = torch.from_numpy(np.clip(np.asarray(seq, dtype=np.int64), 0, vocab - 1)[None]).to(self.params.device)
        cols = torch.from_numpy(np.clip(column_ids(batch), 0, vocab - 1)).to(self.params.device)
        with torch.inference_mode():
            hidden = last_hidden_states(self._model, ids_t)[0, first:first + len(completion)]
            # only the returned slots' rows of the output layer: [P, K, D] x [P, D] -> [P, K] logits. The
            # proxy's prediction is taken conditional on the returned alternatives (a softmax over them), as
            # a top-k distiller sees it; this skips the [P, V] head and its normalizer (most of the cost).
            w = self._model.get_output_embeddings().weight[cols]
            logits = (w * hidden[:, None, :]).sum(-1)  # a broadcast product: einsum's planning costs more here
            return torch.softmax(logits.double(), dim=-1).cpu().numpy()

    # -- the defense ------------------------------------------------------------------------------------
    def reshape(self, lp: np.ndarray, present: np.ndarray, batch: LogprobBatch,
                ctx: RequestContext) -> tuple[np.ndarray, np.ndarray]:
        y = np.where(present, np.exp(lp), 0.0)
        s = self.proxy_probs(batch, ctx)
        g: GateParams = self.params.gate
        ood = self.ood(y, present, ctx) if g.enabled else None
        out = redirect(y, s, present, self.budget(y, present, ctx, ood), keep_argmax=self.params.keep_argmax,
                       floor=self.params.floor)
        if g.enabled and g.misinform:
            out = misinform(out, present, ood, reverse_of=y)  # type: ignore[arg-type]
        with np.errstate(divide="ignore"):
            return np.where(present, np.log(np.maximum(out, 1e-300)), -np.inf), present


def misinform(y: np.ndarray, present: np.ndarray, alpha: np.ndarray, *, reverse_of: np.ndarray | None = None) -> np.ndarray:
    """Adaptive Misinformation's answer: (1 - alpha) y + alpha y_mis per row, y_mis the values of
    ``reverse_of`` (default ``y``; the clean answer, when ``y`` is already perturbed) with their ranking
    reversed over the present slots (the k-th largest value goes to the k-th smallest slot): the least
    likely class comes out on top with the confidence the top class had."""
    src = y if reverse_of is None else reverse_of
    vals = np.where(present, src, -np.inf)
    order = np.argsort(-vals, axis=1, kind="stable")  # slots by value, largest first
    n = present.sum(axis=1)
    rows = np.arange(y.shape[0])[:, None]
    k = np.arange(y.shape[1])[None, :]
    # the j-th largest value moves to the slot ranked (n - 1 - j); missing slots stay where they are
    target = np.where(k < n[:, None], np.take_along_axis(order, np.clip(n[:, None] - 1 - k, 0, None), axis=1), order)
    sorted_vals = np.take_along_axis(np.where(present, src, 0.0), order, axis=1)
    mis = np.zeros_like(y)
    mis[rows, target] = sorted_vals
    a = alpha[:, None]
    return np.where(present, (1.0 - a) * y + a * mis, y)


def input_rows(ctx: RequestContext, rows: int, dim: int, what: str) -> np.ndarray:
    """[rows, dim] float32: the request's input values (a tensor front's ``input_values``, else an in-process
    caller's float32 ``prompt.tensor_bytes``)."""
    raw = ctx.input_values if ctx.input_values is not None else ctx.prompt.tensor_bytes
    if raw is None or len(raw) != rows * dim * 4:
        raise InvalidInput(f"targeted ({what}) needs the input tensor: {rows} x {dim} float32 values, got "
                           f"{0 if raw is None else len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.float32).reshape(rows, dim)
