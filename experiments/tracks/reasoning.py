"""Reasoning track: a tiny LM teacher trained to solve written-out arithmetic; students SFT on its traces.

Legitimate utility is the teacher's accuracy on held-out problems as users get it (same sampling, same
defenses); the distiller's result is its student's accuracy. Defenses here act on the text: the
``sampling_temperature`` knob (everyone is served at temperature t; the control antidistillation
sampling is compared against at matched teacher accuracy) and chain sampling defenses (watermark,
antidistillation sampling) through the per-step logits hook. Requests ask for no logprobs, so the
response path is admit -> generate -> settle. Antidistillation sampling gets its proxy student and loss
gradient from ``adsproxy.prepare_proxy``, built once per study into the run directory.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import torch

from defense.models import train_tokenizer
from defense.types import Api, Prompt, RequestContext, Usage

from ..aggregate import Delta, Gain, Spec, add_matched_gain, build_rows, subtrack
from ..api import TeacherAPI
from ..attacks import account_id, probes
from ..config import (
    SAMPLING_TEMPERATURE,
    AttackConfig,
    DefenseEntry,
    ReasoningTrack,
    defenses_for,
    harness_prepared,
)
from ..generate import generate
from ..runner import Cell
from ..summarize import MATCHED, MATCHED_REF
from ..train import build_seq_data, train_lm_student
from . import TrackRunner
from .adsproxy import PreparedProxy, prepare_proxy
from .arithmetic import Problem, parse_answer, problems, solve
from .lm import stable_seed
from .lmcommon import build_student, train_or_load_teacher

PLAIN = AttackConfig(name="plain")
MODEL = "tiny-arith"
SEQ_LEN = 128  # a problem and its trace are about 45 tokens: two to three per training block

SPEC = Spec(
    x="teacher_acc_loss_pts",
    y="gain_erased",
    columns=("student_acc", "gain_erased", MATCHED, MATCHED_REF, "teacher_acc", "teacher_acc_loss_pts",
             "traces_kept", "traces_correct", "traces_changed"),
    gains=(Gain("gain_erased", "student_acc", "student_acc", "student_acc0", floor_from="baseline"),),
    deltas=(Delta("teacher_acc_loss_pts", "teacher_acc", 100.0),),
    plots=(("teacher_acc", "student_acc"),),  # the antidistillation paper's plot: one curve per defense
)


class ReasoningRunner(TrackRunner):
    cfg: ReasoningTrack

    def prepare(self) -> None:
        cfg, ts = self.cfg, self.env.study.teacher_seed
        kw = {"min_steps": cfg.min_steps, "max_steps": cfg.max_steps, "max_value": cfg.max_value}
        self._kw = kw
        train = [p.text for p in problems(cfg.teacher_problems, ts, **kw)]
        tok = train_tokenizer(train[:5000], 512, model_max_length=SEQ_LEN)
        self.teacher, self.tok, self.teacher_stats = train_or_load_teacher(
            self.env.teacher_dir("reasoning"), cfg.teacher, tok, train, steps=cfg.teacher_steps,
            batch_size=cfg.teacher_batch, seq_len=SEQ_LEN, lr=cfg.teacher_lr, seed=ts, device=self.env.device)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self.eval_set = problems(cfg.eval_problems, ts + 50_000, **kw)
        # the teacher undefended, greedy: the reference a legitimate user compares against
        self.teacher_acc_greedy = self.accuracy(self.teacher, self.eval_set)
        self.proxy: PreparedProxy | None = None
        self._greedy: dict[int, dict[str, list[int]]] = {}  # one seed's clean greedy traces, by prompt
        if any(harness_prepared(e) for e in defenses_for(self.env.study, "reasoning")):
            # antidistillation sampling: a proxy and its gradient on problems no cell evaluates or queries
            exclude = [p.prompt for p in self.eval_set]
            for s in self.env.study.seeds:
                exclude += [p.prompt for p in self.attack_set(s)]
            self.proxy = prepare_proxy(
                self.env.teacher_dir("reasoning_proxy"), cfg.proxy, teacher=self.teacher, tokenizer=self.tok,
                build=lambda spec, seed: build_student(spec, self.tok, max_positions=SEQ_LEN, seed=seed,
                                                       device=self.env.device),
                seed=ts, problem_kw=kw, exclude=exclude, seq_len=SEQ_LEN, gen_tokens=cfg.gen_tokens,
                gen_batch=cfg.gen_batch, device=self.env.device)

    def changed(self, got: list[tuple[Problem, list[int], list[int]]], seed: int) -> float:
        """Fraction of ``got``'s traces that differ from the bare teacher's greedy trace of the same problem."""
        if seed not in self._greedy:
            items = self.attack_set(seed)
            gens = generate(self.teacher, self.encode([p.prompt for p in items]), max_new_tokens=self.cfg.gen_tokens,
                            temperature=0.0, eos_id=self.eos, seed=0, batch_size=self.cfg.gen_batch,
                            stop_at_eos=True, desc="greedy traces")
            self._greedy = {seed: {p.prompt: g.tokens for p, g in zip(items, gens, strict=True)}}
        clean = self._greedy[seed]
        return sum(t[2] != clean.get(t[0].prompt) for t in got) / max(1, len(got))

    def attack_set(self, seed: int) -> list[Problem]:
        """The distiller's problems in the cells of ``seed``."""
        return problems(self.cfg.queries, self.env.study.teacher_seed + 60_000 + seed, **self._kw)

    def entry_for(self, entry: DefenseEntry | None) -> DefenseEntry | None:
        """The cell's entry with the prepared proxy and gradient filled in where the harness provides them."""
        if entry is None or self.proxy is None or not harness_prepared(entry):
            return entry
        return replace(entry, params=MappingProxyType({**entry.params, **self.proxy.params()}))

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return self.tok(prompts, add_special_tokens=False)["input_ids"]

    def accuracy(self, model: torch.nn.Module, items: list[Problem]) -> float:
        """Greedy accuracy of a model (the student, or the bare teacher) run locally, outside any API."""
        gens = generate(model, self.encode([p.prompt for p in items]), max_new_tokens=self.cfg.gen_tokens,
                        temperature=0.0, eos_id=self.eos, seed=0, batch_size=self.cfg.gen_batch, stop_at_eos=True,
                        desc="accuracy")
        texts = self.tok.batch_decode([g.tokens for g in gens], skip_special_tokens=True)
        return sum(parse_answer(t) == p.answer for t, p in zip(texts, items, strict=True)) / max(1, len(items))

    def serve(self, api: TeacherAPI, items: list[Problem], *, who: str, attack: AttackConfig, temperature: float,
              seed: int) -> list[tuple[Problem, list[int], list[int]] | None]:
        """Every probe of every problem through admit -> generate -> settle; None where refused."""
        plist = probes(attack)
        ids = self.encode([p.prompt for p in items])
        asked: list[tuple[int, RequestContext]] = []
        for q, item in enumerate(items):
            for p in plist:
                ctx = RequestContext(request_id=f"{who}-{seed}-{q}-{p.tag}", client_id=account_id(who, q, attack),
                                     model=MODEL, api=Api.OPENAI_COMPLETIONS, prompt=Prompt(text=item.prompt),
                                     prompt_tokens=len(ids[q]), max_tokens=self.cfg.gen_tokens,
                                     temperature=temperature, seed=seed * 1000 + p.repeat)
                asked.append((q, ctx))
        granted = [(q, api.admit(ctx)) for q, ctx in asked]
        live = [(q, g) for q, g in granted if g is not None]
        hook = None
        if api.has_sampling:
            def hook(logits: torch.Tensor, seqs: list[list[int]], idx: list[int]) -> torch.Tensor:
                return api.process_logits(logits, seqs, [live[i][1].ctx for i in idx])

        gens = generate(self.teacher, [ids[q] for q, _ in live], max_new_tokens=self.cfg.gen_tokens,
                        temperature=temperature, eos_id=self.eos, seed=stable_seed(who, seed),
                        batch_size=self.cfg.gen_batch, stop_at_eos=True, logits_hook=hook, desc=f"{who} queries")
        out: list[tuple[Problem, list[int], list[int]] | None] = [None] * len(granted)
        j = 0
        for i, (q, g) in enumerate(granted):
            if g is None:
                continue
            gen = gens[j]
            j += 1
            n = min(len(gen.tokens), g.max_tokens or len(gen.tokens))
            api.settle(g, Usage(prompt_tokens=len(ids[q]), completion_tokens=n))
            out[i] = (items[q], ids[q], gen.tokens[:n])
        return out

    def temperature_of(self, cell: Cell) -> float:
        if cell.entry is not None and cell.entry.type == SAMPLING_TEMPERATURE:
            return float(cell.value if cell.entry.param is not None else cell.entry.params.get("t", 1.0))
        return self.cfg.base_temperature

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        cfg = self.cfg
        temperature = self.temperature_of(cell)
        attack_set = self.attack_set(cell.seed)
        with self.env.api(self.entry_for(cell.entry), cell.value) as api:
            served = self.serve(api, self.eval_set, who="user", attack=PLAIN, temperature=temperature, seed=cell.seed)
            traces = self.serve(api, attack_set, who="distiller", attack=cell.attack, temperature=temperature,
                                seed=cell.seed)
            refusals = dict(api.refusals)
        ok = [s for s in served if s is not None]
        texts = self.tok.batch_decode([s[2] for s in ok], skip_special_tokens=True)
        teacher_acc = sum(parse_answer(t) == s[0].answer for t, s in zip(texts, ok, strict=True)) / len(self.eval_set)
        got = [t for t in traces if t is not None]
        decoded = self.tok.batch_decode([t[2] for t in got], skip_special_tokens=True)
        correct = [parse_answer(d) == solve(t[0].prompt) for d, t in zip(decoded, got, strict=True)]
        keep = [t for t, c in zip(got, correct, strict=True) if c or not cell.attack.filter_correct]
        out: dict[str, Any] = {
            "temperature": temperature, "teacher_acc": teacher_acc, "teacher_acc_greedy": self.teacher_acc_greedy,
            "traces_kept": len(keep) / max(1, len(traces)), "traces_correct": sum(correct) / max(1, len(got)),
            # how many served traces differ from what the undefended teacher writes greedily
            "traces_changed": self.changed(got, cell.seed),
            "refusals": refusals,
        }
        if cell.is_baseline:
            out["student_acc0"] = self.accuracy(self.student(cell.seed), self.eval_set)
        model = self.student(cell.seed)
        if keep:
            data = build_seq_data([t[1] for t in keep], [t[2] for t in keep], pad_id=self.pad)
            stats = train_lm_student(model, data, loss="sft", steps=cfg.student_steps, batch_size=cfg.student_batch,
                                     lr=cfg.student_lr, seed=cell.seed, desc="sft student")
            out["train_loss"] = stats["loss"]
        out["student_acc"] = self.accuracy(model, self.eval_set) if keep else math.nan
        return out

    def student(self, seed: int) -> torch.nn.Module:
        return build_student(self.cfg.student, self.tok, max_positions=SEQ_LEN, seed=seed, device=self.env.device)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        def pick(result: dict[str, Any]) -> dict[str, float]:
            return {k: v for k, v in result.items() if isinstance(v, (int, float))}

        rows = build_rows(records, pick, SPEC, bootstrap=self.env.study.bootstrap)
        for row in rows:  # the temperature control: other defenses are compared against its curve
            row["is_temperature"] = row.get("type") == SAMPLING_TEMPERATURE
        add_matched_gain(rows, is_reference=lambda r: bool(r.get("is_temperature")), x="teacher_acc",
                         score="student_acc", floor="student_acc0", name=MATCHED, ref_name=MATCHED_REF,
                         bootstrap=self.env.study.bootstrap)
        extra: dict[str, Any] = {}
        if self.proxy is not None:
            rec = self.proxy.record
            extra["proxy"] = {"parameters": rec.get("proxy_parameters"), "teacher_parameters": rec.get("teacher_parameters"),
                              "holdout_loss": rec.get("holdout_loss")}
        return {"reasoning": subtrack(rows, SPEC, teacher_acc_greedy=self.teacher_acc_greedy,
                                      base_temperature=self.cfg.base_temperature,
                                      constraint={"teacher_acc_loss_pts_max": self.cfg.acc_loss_max_pts}, **extra)}
