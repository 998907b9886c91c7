"""LM track: a tiny causal LM teacher behind the defended API; text SFT and top-k logprob KD attackers.

Per query the distiller sends its probes (repeats, near-duplicates, two temperatures: see attacks/),
all with one fixed ``seed``, so the engine samples one continuation per query and the probes differ only
in what the defenses do to the returned top-k logprobs (idealized for near-duplicates and temperature
pairs: the worst case for the defense). Sampling defenses act on every decode step through the chain.

Students: SFT on the sampled text, and KD (forward KL on the returned top-k plus the rest) on the same
sequences. Scores on held-out text: perplexity, KL(teacher || student), top-1 fidelity.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from defense.errors import ConfigError
from defense.models import pack_tokens, read_text_files, synthetic_corpus, train_tokenizer
from defense.types import Api, LogprobBatch, LogprobsMode, OutputKind, Prompt, RequestContext, Usage

from ..aggregate import Delta, Gain, Spec, build_rows, subtrack
from ..api import Granted, TeacherAPI
from ..attacks import Probe, account_id, average_topk, probes, temperature_difference, text_variant
from ..config import AttackConfig, LMTrack
from ..generate import Generation, forward_logprobs, generate
from ..metrics import spearman_topk, top1_agreement, topk_total_variation
from ..runner import Cell
from ..train import build_seq_data, train_lm_student
from . import TrackRunner
from .lmcommon import build_student, evaluate_lm_student, train_or_load_teacher

PLAIN = AttackConfig(name="plain")
MODEL = "tiny-lm"

LOGPROB_SPEC = Spec(
    x="mean_tv",
    y="logprob_extra_gain_erased",
    columns=("kd_kl", "kd_fidelity", "kd_perplexity", "logprob_extra_gain_erased", "kd_gain_erased",
             "top1_agreement", "mean_tv", "spearman", "kd_positions"),
    gains=(Gain("logprob_extra_gain_erased", "kd_score", "kd_score", "sft_score", floor_from="baseline"),
           Gain("kd_gain_erased", "kd_score", "kd_score", "s0_score", floor_from="baseline")),
)
SFT_SPEC = Spec(
    x="gen_ppl_increase",
    y="gain_erased",
    columns=("sft_kl", "sft_fidelity", "sft_perplexity", "gain_erased", "gen_ppl", "gen_ppl_increase"),
    gains=(Gain("gain_erased", "sft_score", "sft_score", "s0_score", floor_from="baseline"),),
    deltas=(Delta("gen_ppl_increase", "gen_ppl", -1.0),),
)


def stable_seed(*parts: object) -> int:
    """A seed from strings and ints that is the same in every process (hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def make_prompts(tokenizer, docs: list[str], n: int, prompt_tokens: int, chunk: int) -> list[list[int]]:
    """Up to ``n`` prompts: the first ``prompt_tokens`` tokens of each ``chunk``-token window of the docs."""
    out: list[list[int]] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        for s in range(0, max(0, len(ids) - prompt_tokens), chunk):
            if len(ids) - s > prompt_tokens:
                out.append(ids[s : s + prompt_tokens])
                if len(out) == n:
                    return out
    return out


class Collected:
    """What one party got from the API for its queries."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.texts: list[list[int]] = []  # the continuation each query came back with
        self.kd: list[tuple[np.ndarray, np.ndarray] | None] = []  # the combined top-k target
        self.raw: list[tuple[np.ndarray, np.ndarray] | None] = []  # the engine's clean top-k (for utility)
        self.first: list[tuple[np.ndarray, np.ndarray] | None] = []  # the first answer as returned
        self.asked = 0

    @property
    def kept(self) -> int:
        return len(self.texts)


class LMRunner(TrackRunner):
    cfg: LMTrack
    plain = PLAIN

    # -- teacher and data ------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, ts = self.cfg, self.env.study.teacher_seed
        if cfg.corpus == "synthetic":
            train = synthetic_corpus(cfg.corpus_docs, seed=ts)
            self.eval_texts = synthetic_corpus(cfg.eval_docs, seed=ts + 10_000)
            self._benign_docs = synthetic_corpus(cfg.benign_queries, seed=ts + 20_000)
            self._pool: Callable[[int], list[str]] = lambda s: synthetic_corpus(cfg.queries, seed=ts + 30_000 + s)
        else:
            docs = read_text_files(list(cfg.text_files))
            if len(docs) < 10:
                raise ConfigError(f"text_files hold {len(docs)} documents; at least 10 are needed to split",
                                  path="tracks.lm.text_files")
            docs = [docs[i] for i in np.random.default_rng(ts).permutation(len(docs))]
            n = len(docs)
            train, self.eval_texts = docs[: int(0.8 * n)], docs[int(0.8 * n) : int(0.9 * n)]
            pool = docs[int(0.9 * n) :]
            self._benign_docs = pool[: max(1, len(pool) // 4)]
            rest = pool[max(1, len(pool) // 4) :]
            # each seed's distiller draws its prompts in its own order from the same held-out pool
            self._pool = lambda s: [rest[i] for i in np.random.default_rng([ts, s]).permutation(len(rest))]
        folder = self.env.teacher_dir("lm")
        tok = train_tokenizer(train, cfg.vocab_size, model_max_length=cfg.seq_len)
        self.teacher, self.tok, self.teacher_stats = train_or_load_teacher(
            folder, cfg.teacher, tok, train, steps=cfg.teacher_steps, batch_size=cfg.teacher_batch,
            seq_len=cfg.seq_len, lr=cfg.teacher_lr, seed=ts, device=self.env.device)
        (self.eval_blocks,) = pack_tokens(self.tok, self.eval_texts, cfg.seq_len)
        if self.eval_blocks.shape[0] == 0:
            raise ConfigError("eval_docs hold less than one seq_len block of text", path="tracks.lm.eval_docs")
        chunk = cfg.prompt_tokens + cfg.gen_tokens
        self.benign_prompts = make_prompts(self.tok, self._benign_docs, cfg.benign_queries, cfg.prompt_tokens, chunk)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self._s0: dict[int, dict[str, float]] = {}

    def attacker_prompts(self, seed: int) -> list[list[int]]:
        chunk = self.cfg.prompt_tokens + self.cfg.gen_tokens
        return make_prompts(self.tok, self._pool(seed), self.cfg.queries, self.cfg.prompt_tokens, chunk)

    # -- the API ---------------------------------------------------------------------------------
    def _ctx(self, who: str, q: int, p: Probe, prompt_text: str, attack: AttackConfig, seed: int, n_prompt: int) -> RequestContext:
        text = text_variant(prompt_text, p.variant, attack.near_dup_kind)
        return RequestContext(
            request_id=f"{who}-{seed}-{q}-{p.tag}", client_id=account_id(who, q, attack), model=MODEL,
            api=Api.OPENAI_COMPLETIONS, prompt=Prompt(text=text), prompt_tokens=n_prompt,
            max_tokens=self.cfg.gen_tokens, logprobs=True, top_logprobs=self.cfg.top_k,
            temperature=p.temperature if p.temperature is not None else self.cfg.sample_temperature,
            seed=seed)

    def collect(self, api: TeacherAPI, prompts: list[list[int]], *, who: str, attack: AttackConfig,
                seed: int) -> Collected:
        cfg = self.cfg
        plist = probes(attack)
        texts = self.tok.batch_decode(prompts)
        granted: list[list[tuple[Probe, Granted]]] = []
        for q, prompt in enumerate(prompts):  # admission first, as in serving: the engine only runs admitted requests
            got = []
            for p in plist:
                g = api.admit(self._ctx(who, q, p, texts[q], attack, seed, len(prompt)))
                if g is not None:
                    got.append((p, g))
            granted.append(got)
        live = [q for q in range(len(prompts)) if granted[q]]
        temps = sorted({1.0, *(attack.temperature_pair or ())})
        hook = None
        if api.has_sampling:
            first_ctx = [granted[q][0][1].ctx for q in live]

            def hook(logits: torch.Tensor, seqs: list[list[int]], idx: list[int]) -> torch.Tensor:
                return api.process_logits(logits, seqs, [first_ctx[i] for i in idx])

        gens = generate(self.teacher, [prompts[q] for q in live], max_new_tokens=cfg.gen_tokens,
                        temperature=cfg.sample_temperature, eos_id=self.eos, seed=stable_seed(who, seed),
                        batch_size=cfg.gen_batch, top_k=cfg.top_k, logprob_temperatures=temps, logits_hook=hook,
                        desc=f"{who} queries")
        out = Collected()
        out.asked = len(prompts)
        for q, gen in zip(live, gens, strict=True):
            self._answer(api, q, prompts[q], gen, granted[q], attack, out)
        return out

    def _answer(self, api: TeacherAPI, q: int, prompt: list[int], gen: Generation,
                granted: list[tuple[Probe, Granted]], attack: AttackConfig, out: Collected) -> None:
        cfg = self.cfg
        answers: list[tuple[Probe, tuple[np.ndarray, np.ndarray]]] = []
        n_text = len(gen.tokens)
        for p, g in granted:
            n = min(len(gen.tokens), g.max_tokens if g.max_tokens is not None else len(gen.tokens))
            n_text = min(n_text, n)
            k = min(cfg.top_k, g.top_logprobs) if g.ctx.wants_logprobs else 0
            if n == 0 or k <= 0:  # nothing to protect: the response is text only
                api.settle(g, Usage(prompt_tokens=len(prompt), completion_tokens=n))
                continue
            t = p.temperature
            batch = LogprobBatch(
                values=gen.top_logprobs[t if t is not None else 1.0][:n, :k], token_ids=gen.top_ids[:n, :k],
                kind=OutputKind.TOP_LOGPROBS, sampled_token_ids=np.asarray(gen.tokens[:n], dtype=np.int64),
                temperature=t if t is not None else cfg.sample_temperature,
                logprobs_mode=LogprobsMode.PROCESSED if t is not None else LogprobsMode.RAW)
            res = api.answer(g, batch, Usage(prompt_tokens=len(prompt), completion_tokens=n, logprob_values=n * k))
            answers.append((p, (res.token_ids, res.values)))
        out.prompts.append(prompt)
        out.texts.append(gen.tokens[:n_text])
        out.raw.append((gen.top_ids[:n_text], gen.top_logprobs[1.0][:n_text]))
        if not answers:
            out.kd.append(None)
            out.first.append(None)
            return
        m = min(a[1][0].shape[0] for a in answers)
        answers = [(p, (ids[:m], lp[:m])) for p, (ids, lp) in answers]
        out.first.append(answers[0][1])
        if attack.temperature_pair is not None:
            t1, t2 = attack.temperature_pair
            at = {t: average_topk([a for p, a in answers if p.temperature == t], cfg.top_k)
                  for t in (t1, t2) if any(p.temperature == t for p, _ in answers)}
            out.kd.append(temperature_difference(at[t1], t1, at[t2], t2) if len(at) == 2 else None)
        else:
            out.kd.append(average_topk([a for _, a in answers], cfg.top_k))

    # -- cells -----------------------------------------------------------------------------------
    def benign(self, api: TeacherAPI, seed: int) -> dict[str, float]:
        got = self.collect(api, self.benign_prompts, who="user", attack=PLAIN, seed=seed)
        pairs = [(r, f) for r, f in zip(got.raw, got.first, strict=True) if f is not None and r[0].shape[0]]
        out: dict[str, float] = {"benign_served": got.kept / max(1, got.asked),
                                 "benign_with_logprobs": len(pairs) / max(1, got.asked)}
        if pairs:
            n = [min(r[0].shape[0], f[0].shape[0]) for r, f in pairs]
            k = self.cfg.top_k
            cv = np.concatenate([r[1][:m] for (r, _), m in zip(pairs, n, strict=True)])
            ci = np.concatenate([r[0][:m] for (r, _), m in zip(pairs, n, strict=True)])
            dv = np.concatenate([_pad(f[1][:m], k, -1e4) for (_, f), m in zip(pairs, n, strict=True)])
            di = np.concatenate([_pad(f[0][:m], k, -1) for (_, f), m in zip(pairs, n, strict=True)])
            out.update(top1_agreement=top1_agreement(cv, ci, dv, di),
                       mean_tv=float(np.mean(topk_total_variation(cv, ci, dv, di))),
                       spearman=spearman_topk(cv, ci, dv, di))
        out["gen_ppl"] = self.generation_perplexity(got)
        return out

    @torch.inference_mode()
    def generation_perplexity(self, got: Collected) -> float:
        """Perplexity of the served continuations under the clean teacher (what sampling defenses cost)."""
        nll, count = 0.0, 0
        for prompt, text in zip(got.prompts, got.texts, strict=True):
            if not text:
                continue
            x = torch.tensor([prompt + text], dtype=torch.int64)
            (_, lp), = list(forward_logprobs(self.teacher, x))
            tgt = x[0, 1:].to(lp.device)
            token_lp = lp[0].gather(1, tgt[:, None])[:, 0][len(prompt) - 1 :]
            nll -= float(token_lp.sum())
            count += len(text)
        return math.exp(nll / count) if count else math.nan

    def student(self, seed: int) -> torch.nn.Module:
        return build_student(self.cfg.student, self.tok, max_positions=self.cfg.seq_len, seed=seed,
                             device=self.env.device)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm_student(model, self.teacher, self.tok, self.eval_texts, self.eval_blocks,
                                   seq_len=self.cfg.seq_len)

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"teacher_stats": {k: v for k, v in self.teacher_stats.items() if not isinstance(v, dict)}}
        with self.env.api(cell.entry, cell.value) as api:
            out["benign"] = self.benign(api, cell.seed)
            got = self.collect(api, self.attacker_prompts(cell.seed), who="distiller", attack=cell.attack,
                               seed=cell.seed)
            sampling = api.has_sampling
            out["refusals"] = dict(api.refusals)
        kd_rows = [i for i, t in enumerate(got.kd) if t is not None]
        out["collected"] = {"queries": got.asked, "answered": got.kept, "with_logprobs": len(kd_rows),
                            "kd_positions": int(sum(got.kd[i][0].shape[0] for i in kd_rows))}
        if cell.is_baseline:
            out["s0"] = self.evaluate(self.student(cell.seed))
        if kd_rows:
            data = build_seq_data([got.prompts[i] for i in kd_rows], [got.texts[i] for i in kd_rows], pad_id=self.pad,
                                  kd=[got.kd[i] for i in kd_rows], k=cfg.top_k)  # type: ignore[misc]
            model = self.student(cell.seed)
            stats = train_lm_student(model, data, loss="kd", steps=cfg.student_steps, batch_size=cfg.student_batch,
                                     lr=cfg.student_lr, seed=cell.seed, kd_ce_weight=cfg.kd_ce_weight, desc="kd student")
            out["kd"] = {**self.evaluate(model), "train_loss": stats["loss"]}
        # response defenses leave the text as it was: their SFT student is the baseline's
        if cell.is_baseline or sampling:
            texts = [i for i, t in enumerate(got.texts) if t]
            data = build_seq_data([got.prompts[i] for i in texts], [got.texts[i] for i in texts], pad_id=self.pad)
            model = self.student(cell.seed)
            stats = train_lm_student(model, data, loss="sft", steps=cfg.student_steps, batch_size=cfg.student_batch,
                                     lr=cfg.student_lr, seed=cell.seed, desc="sft student")
            out["sft"] = {**self.evaluate(model), "train_loss": stats["loss"]}
            if cfg.radioactivity.enabled and sampling:
                from .radioactivity import radioactivity

                with self.env.api(cell.entry, cell.value) as api:
                    out["radioactivity"] = radioactivity(self, api, model, cell)
        return out

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        score = self.cfg.score
        base_s0 = {r["seed"]: r["result"]["s0"][score] for r in records if "s0" in r["result"]}
        base_sft = {(r["attack"], r["seed"]): r["result"]["sft"] for r in records
                    if r["label"] == "none" and "sft" in r["result"]}

        def flat(prefix: str, d: dict[str, float] | None) -> dict[str, float]:
            return {f"{prefix}_{k}": v for k, v in (d or {}).items()}

        def pick_logprob(result: dict[str, Any]) -> dict[str, float] | None:
            if "kd" not in result:
                return None
            m = {**result["benign"], **flat("kd", result["kd"]), "kd_score": result["kd"][score],
                 "kd_positions": result["collected"]["kd_positions"]}
            if "sft" in result:
                m["sft_score"] = result["sft"][score]
            if "s0" in result:
                m["s0_score"] = result["s0"][score]
            return m

        def pick_sft(result: dict[str, Any]) -> dict[str, float] | None:
            if "sft" not in result:
                return None
            m = {**result["benign"], **flat("sft", result["sft"]), "sft_score": result["sft"][score]}
            if "s0" in result:
                m["s0_score"] = result["s0"][score]
            return m

        bs = self.env.study.bootstrap
        out = {
            "lm_logprob": subtrack(build_rows(records, pick_logprob, LOGPROB_SPEC, bootstrap=bs), LOGPROB_SPEC,
                                   score=score, constraint={"top1_agreement_min": 1.0, "mean_tv_max": self.cfg.tv_max},
                                   s0_by_seed=base_s0, top_k=self.cfg.top_k),
            "lm_sft": subtrack(build_rows(records, pick_sft, SFT_SPEC, bootstrap=bs), SFT_SPEC, score=score,
                               sft_baseline={f"{a}/seed{s}": v for (a, s), v in base_sft.items()}),
        }
        radio = [r for r in records if "radioactivity" in r["result"]]
        if radio:
            from .radioactivity import aggregate_radioactivity

            out["lm_radioactivity"] = aggregate_radioactivity(radio)
        return out


def _pad(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    if a.shape[1] >= k:
        return a[:, :k]
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), fill, dtype=a.dtype)], axis=1)
