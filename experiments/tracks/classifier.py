"""Classifier track: a digits MLP behind the defended API, cloned by Knockoff-style attackers.

Every query is one request (a KServe v2-style tensor prompt, so the canonical context is the input's
bytes) through admit -> protect -> settle. The API returns the defended probability vector, or only
its top-1 label (``output: top1``). Students are MLPs fit to what came back (soft labels); S_0 is the
same student before training. Benign users query the test set through the same API.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from defense.errors import ConfigError
from defense.models.classifier import (
    ClassifierConfig,
    MLPClassifier,
    build_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from defense.perturbation.ood import InputDensity
from defense.types import Api, LogprobBatch, OutputKind, Prompt, RequestContext, Usage

from ..aggregate import Delta, Gain, Spec, build_rows, subtrack
from ..api import TeacherAPI, dense_ids
from ..attacks import account_id, average_probabilities, probes
from ..config import AttackConfig, ClassifierTrack, DefenseEntry, defenses_for
from ..metrics import (
    expected_calibration_error,
    kl_divergence,
    spearman_topk,
    top1_agreement,
    total_variation,
)
from ..runner import Cell, write_json
from ..train import train_soft_classifier
from . import TrackRunner
from .digits import N_CLASSES, digits_split, indist_queries, nudge, ood_queries

PLAIN = AttackConfig(name="plain")
MODEL = "digits-mlp"
# the input-density OOD detector for `gate: {detector: auto}` entries: fitted on the teacher's 898 training
# digits; at quantile 0.999 about 0.3% of held-out digits trip it (one of 360 on the standard split)
DETECTOR_FILE = "input_density.npz"
DETECTOR_QUANTILE = 0.999
DETECTOR_SHRINKAGE = 0.01


def wants_detector(entry: DefenseEntry) -> bool:
    gate = entry.params.get("gate")
    return isinstance(gate, dict | MappingProxyType) and gate.get("detector") == "auto"

SPEC = Spec(
    # argmax-preserving defenses all sit at 0 benign loss (the summary's constraint): the distortion of
    # what legitimate users get back is the utility cost that tells them apart
    x="mean_tv",
    y="gain_erased",
    columns=("clone_acc", "fidelity", "gain_erased", "clone_acc_drop_pts", "benign_loss_pts", "top1_agreement",
             "mean_tv", "ece", "queries_kept"),
    gains=(Gain("gain_erased", "clone_acc", "clone_acc", "clone_acc0"),
           Gain("fidelity_gain_erased", "fidelity", "fidelity", "fidelity0")),
    deltas=(Delta("clone_acc_drop_pts", "clone_acc", 100.0), Delta("benign_loss_pts", "benign_acc", 100.0)),
)


def predict_proba(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """[N, 64] -> [N, C] float32 probabilities (rows sum to 1 within float32 rounding)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.as_tensor(x, dtype=torch.float32, device=device)).double()
        return torch.softmax(logits, dim=-1).float().cpu().numpy()


def query_api(
    api: TeacherAPI,
    teacher: torch.nn.Module,
    x: np.ndarray,
    *,
    who: str,
    attack: AttackConfig,
    seed: int,
    output: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Send every query (and the attack's repeats and near-duplicates) through the API.

    Returns (answers [N, C]: the mean of the answers each query got, kept [N] bool: any answer came back).
    """
    plist = probes(attack)
    variants = {p.variant: nudge(x, p.variant, seed) for p in plist}
    raw = {v: predict_proba(teacher, xv) for v, xv in variants.items()}  # the engine's answers, batched
    answers = np.zeros((len(x), N_CLASSES), dtype=np.float64)
    kept = np.zeros(len(x), dtype=bool)
    no_ids = np.empty((1, 0), dtype=np.int64)
    usage = Usage(prompt_tokens=x.shape[1], completion_tokens=1, logprob_values=N_CLASSES)
    for i in range(len(x)):  # one request per query and probe: that is what the API sees
        got = []
        for p in plist:
            xi = variants[p.variant][i]
            ctx = RequestContext(request_id=f"{who}-{seed}-{i}-{p.tag}", client_id=account_id(who, i, attack),
                                 model=MODEL, api=Api.KSERVE_V2, prompt=Prompt(tensor_bytes=xi.tobytes()),
                                 max_tokens=1)
            granted = api.admit(ctx)
            if granted is None:
                continue
            batch = LogprobBatch(values=raw[p.variant][i : i + 1], token_ids=no_ids, kind=OutputKind.PROBABILITIES)
            vec = api.answer(granted, batch, usage).values[0].astype(np.float64)
            if output == "top1":  # a label-only API: the defended vector's argmax, nothing else
                vec = np.eye(N_CLASSES)[int(np.argmax(vec))]
            got.append(vec)
        if got:
            answers[i] = average_probabilities(got) if len(got) > 1 else got[0]
            if attack.hard_labels:
                answers[i] = np.eye(N_CLASSES)[int(np.argmax(answers[i]))]
            kept[i] = True
    return answers.astype(np.float32), kept


def clone_metrics(student: MLPClassifier, teacher_probs: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    probs = predict_proba(student, x_test).astype(np.float64)
    with np.errstate(divide="ignore"):
        kl = kl_divergence(np.log(teacher_probs.astype(np.float64)), np.log(np.maximum(probs, 1e-30)))
    return {
        "clone_acc": float(np.mean(probs.argmax(1) == y_test)),
        "fidelity": float(np.mean(probs.argmax(1) == teacher_probs.argmax(1))),
        "kl": float(np.mean(kl)),
    }


class ClassifierRunner(TrackRunner):
    cfg: ClassifierTrack

    def prepare(self) -> None:
        for a in self.cfg.attacks:
            if a.temperature_pair is not None:
                raise ConfigError("temperature differencing needs logprobs; a classifier has no temperature",
                                  path="tracks.classifier.attacks")
        self.split = digits_split(self.cfg.split_seed)
        self.teacher = self.load_teacher()
        self.detector: Path | None = None
        if any(wants_detector(e) for e in defenses_for(self.env.study, "classifier")):
            # Adaptive Misinformation's OOD detector, fitted on the owner's data: the teacher's training inputs
            self.detector = self.env.teacher_dir("classifier") / DETECTOR_FILE
            if not self.detector.exists():
                InputDensity.fit(self.split.x_teacher, quantile=DETECTOR_QUANTILE,
                                 shrinkage=DETECTOR_SHRINKAGE).save(self.detector)
        self.test_probs = predict_proba(self.teacher, self.split.x_test)
        self.teacher_acc = float(np.mean(self.test_probs.argmax(1) == self.split.y_test))

    def load_teacher(self) -> MLPClassifier:
        folder = self.env.teacher_dir("classifier")
        if (folder / "classifier_config.json").exists():
            model, _ = load_classifier(folder)
        else:
            cfg = ClassifierConfig(in_dim=64, n_classes=N_CLASSES, hidden=tuple(self.cfg.teacher_hidden))
            model = build_classifier(cfg, seed=self.env.study.teacher_seed)
            stats = train_classifier(model, self.split.x_teacher, self.split.y_teacher, epochs=self.cfg.teacher_epochs,
                                     lr=self.cfg.teacher_lr, seed=self.env.study.teacher_seed)
            save_classifier(model, cfg, folder)
            write_json(folder / "train_stats.json", stats)
        return model.to(self.env.device).eval()

    def entry_for(self, entry: DefenseEntry | None) -> DefenseEntry | None:
        """The cell's entry with ``gate.detector: auto`` pointing at the detector fitted in ``prepare``."""
        if entry is None or self.detector is None or not wants_detector(entry):
            return entry
        gate = {**entry.params["gate"], "detector": str(self.detector.resolve())}
        return replace(entry, params=MappingProxyType({**entry.params, "gate": gate}))

    def attacker_queries(self, attacker: str, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 0 if attacker == "ood" else 1, 7])
        if attacker == "ood":
            return ood_queries(self.cfg.queries, rng)
        return indist_queries(self.split.x_pool, self.cfg.queries, rng)

    def benign(self, api: TeacherAPI, seed: int) -> dict[str, float]:
        x, y = self.split.x_test, self.split.y_test
        got, kept = query_api(api, self.teacher, x, who="user", attack=PLAIN, seed=seed, output="probabilities")
        clean = self.test_probs[kept].astype(np.float64)
        got = got[kept].astype(np.float64)
        ids = dense_ids(len(got), N_CLASSES)
        return {
            "benign_acc": float(np.mean(got.argmax(1) == y[kept])) if kept.any() else math.nan,
            "benign_served": float(kept.mean()),
            "top1_agreement": top1_agreement(clean, ids, got, ids),
            "mean_tv": float(np.mean(total_variation(clean, got))) if kept.any() else math.nan,
            "spearman": spearman_topk(clean, ids, got, ids),
            "ece": expected_calibration_error(got, y[kept]),
            "ece_clean": expected_calibration_error(clean, y[kept]),
        }

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        out: dict[str, Any] = {"teacher_acc": self.teacher_acc}
        with self.env.api(self.entry_for(cell.entry), cell.value) as api:
            out["benign"] = self.benign(api, cell.seed)
            for attacker in self.cfg.attackers:
                xq = self.attacker_queries(attacker, cell.seed)
                answers, kept = query_api(api, self.teacher, xq, who=f"distiller-{attacker}", attack=cell.attack,
                                          seed=cell.seed, output=self.cfg.output)
                out[attacker] = self.distill(xq[kept], answers[kept], cell.seed)
                out[attacker]["queries_kept"] = float(kept.mean())
            out["refusals"] = dict(api.refusals)
        return out

    def distill(self, x: np.ndarray, targets: np.ndarray, seed: int) -> dict[str, float]:
        cfg = ClassifierConfig(in_dim=64, n_classes=N_CLASSES, hidden=tuple(self.cfg.student_hidden))
        student = build_classifier(cfg, seed=seed).to(self.env.device)
        before = clone_metrics(student, self.test_probs, self.split.x_test, self.split.y_test)
        stats = train_soft_classifier(student, x, targets, epochs=self.cfg.student_epochs, lr=self.cfg.student_lr,
                                      seed=seed)
        after = clone_metrics(student, self.test_probs, self.split.x_test, self.split.y_test)
        return {**after, **{f"{k}0": v for k, v in before.items()}, "train_loss": stats["loss"]}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for attacker in self.cfg.attackers:
            def pick(result: dict[str, Any], a: str = attacker) -> dict[str, float] | None:
                if a not in result:
                    return None
                return {**result["benign"], **result[a], "teacher_acc": result["teacher_acc"]}

            rows = build_rows(records, pick, SPEC, bootstrap=self.env.study.bootstrap)
            out[f"classifier_{attacker}"] = subtrack(
                rows, SPEC, teacher_acc=self.teacher_acc, output=self.cfg.output, queries=self.cfg.queries,
                constraint={"benign_loss_pts_max": self.cfg.benign_loss_max_pts})
        return out
