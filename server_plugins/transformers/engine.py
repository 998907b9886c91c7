"""A step-by-step decoder for the OpenAI-compatible server: KV cache, sampling defenses, logprobs per step.

Each step computes the next-token logits for all ``n`` choices of one request ([n, V]), runs the chain's
sampling defenses through the transformers adapter (``DefenseLogitsProcessor``; the watermark, when the
config has one), applies temperature and samples. The logprobs it reports are the engine's, like vLLM's
``--logprobs-mode``: ``raw`` (default, vLLM's too) before any processor and temperature, or ``processed``
after them. The front's Protect is told which (``front.engine_logprobs_mode``).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from defense.types import LogprobsMode, RequestContext

from .processor import DefenseLogitsProcessor


@dataclass(frozen=True, slots=True)
class Step:
    token_ids: list[int]  # [n] the sampled token per choice
    logprobs: list[float]  # [n] its logprob (reported mode)
    top_ids: list[list[int]]  # [n][k] the k most likely tokens, best first
    top_logprobs: list[list[float]]  # [n][k]
    finished: list[bool]  # [n] this choice ended at this step (eos) or earlier


class Engine:
    """One model; ``steps()`` is a generator, and one request decodes at a time (a lock), which is what a
    2-core CPU can do anyway."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, *, chain: object | None = None,
                 logprobs_mode: LogprobsMode = LogprobsMode.RAW) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chain = chain if chain is not None and getattr(chain, "sampling", ()) else None
        self.logprobs_mode = logprobs_mode
        self.lock = threading.Lock()
        cfg = model.config  # type: ignore[attr-defined]
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
        eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
        self.eos = {int(eos)} if eos is not None else set()
        self.bos = int(eos) if eos is not None else 0
        self._text: dict[int, str] = {}
        # transformers 5.2x renamed past_key_values to cache (the old name warns); take whichever forward has
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def token_text(self, tid: int) -> str:
        t = self._text.get(tid)
        if t is None:
            t = self._text[tid] = self.tokenizer.decode([tid])  # type: ignore[attr-defined]
        return t

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
        return list(ids) or [self.bos]  # an empty prompt starts from the document separator

    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],  # type: ignore[attr-defined]
                                          add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        # the factory's tiny tokenizers have no template: a plain "role: content" transcript
        text = "".join(f"{r}: {c}\n" for r, c in messages) + "assistant:"
        return self.encode(text)

    @torch.inference_mode()
    def steps(self, prompt: list[int], *, n: int, max_tokens: int, temperature: float, top_k: int,
              seed: int | None, ctxs: Sequence[RequestContext], cancel: threading.Event | None = None) -> Iterator[Step]:
        """Decode up to ``max_tokens`` steps for ``n`` copies of ``prompt``; stops early when all finished."""
        if len(prompt) + max_tokens > self.max_positions:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                             f"{self.max_positions} positions")
        device = next(self.model.parameters()).device  # type: ignore[attr-defined]
        seqs = torch.tensor([prompt] * n, dtype=torch.int64, device=device)  # [n, L]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        processor = DefenseLogitsProcessor(self.chain, list(ctxs)) if self.chain is not None else None
        done = [False] * n
        past = None
        step_input = seqs
        for _ in range(max_tokens):
            if cancel is not None and cancel.is_set():
                return
            cache = {self._cache_kw: past} if past is not None else {}
            out = self.model(input_ids=step_input, use_cache=True, **cache)  # type: ignore[operator]
            past = getattr(out, self._cache_kw)
            logits = out.logits[:, -1, :].float()  # [n, V]
            raw = torch.log_softmax(logits, dim=-1)
            proc = processor(seqs, logits) if processor is not None else logits
            if temperature > 0:
                proc = proc / temperature
            proc_lp = torch.log_softmax(proc, dim=-1)
            if temperature > 0:
                nxt = torch.multinomial(proc_lp.exp().cpu(), 1, generator=gen)[:, 0].to(device)
            else:
                nxt = proc.argmax(dim=-1)
            report = raw if self.logprobs_mode is LogprobsMode.RAW else proc_lp
            k = max(1, top_k)
            top_v, top_i = torch.topk(report, k, dim=-1)  # [n, k]
            chosen = report.gather(1, nxt[:, None])[:, 0]
            ids = nxt.tolist()
            finished = [d or t in self.eos for d, t in zip(done, ids, strict=True)]
            yield Step(ids, chosen.tolist(), top_i.tolist(), top_v.tolist(), finished)
            done = finished
            if all(done):
                return
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
