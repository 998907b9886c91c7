"""report.md and the plots of a run: per subtrack a table (mean [95% interval] over seeds) and a
Pareto plot (utility cost on x, gain erased on y, one curve per defense over its strengths)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

_X_LABELS = {
    "benign_loss_pts": "benign accuracy loss (points)",
    "mean_tv": "mean TV distance of returned answers from clean",
    "gen_ppl_increase": "perplexity increase of served text",
    "teacher_acc_loss_pts": "teacher accuracy loss (points)",
    "legit_refused_pts": "legitimate requests refused (%)",
    "student_tokens": "student tokens scored",
    "teacher_acc": "teacher accuracy as served",
}
_Y_LABELS = {
    "gain_erased": "distillation gain erased",
    "logprob_extra_gain_erased": "logprob extra gain erased (vs text SFT)",
    "log10_p": "log10 p",
    "student_acc": "distilled student accuracy",
}


def fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("mean") is None or not math.isfinite(m["mean"]):
        return "–"
    mean, lo, hi = m["mean"], m.get("lo"), m.get("hi")
    s = _num(mean)
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        s += f" [{_num(lo)}, {_num(hi)}]"
    return s


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str]) -> list[str]:
    multi_attack = len({r["attack"] for r in rows}) > 1
    head = (["attack"] if multi_attack else []) + ["defense", "seeds", *columns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["attack"]] if multi_attack else []) + [r["label"], str(len(r["seeds"]))]
        cells += [fmt(r["metrics"].get(c)) for c in columns]
        out.append("| " + " | ".join(cells) + " |")
    return out


def pareto_plot(path: Path, title: str, rows: list[dict[str, Any]], x: str, y: str, *, cost_axis: bool = True,
                join_baseline: bool = False) -> bool:
    """One curve per (attack, defense) over its strengths; returns False when no point is finite.

    ``join_baseline`` starts each defense's curve at its attack's undefended point (strength 0), as in a
    teacher-accuracy-versus-student-accuracy plot; ``cost_axis`` marks x as the utility cost.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str], list[tuple[float, float, dict, dict, Any]]] = defaultdict(list)
    for r in rows:
        mx, my = r["metrics"].get(x), r["metrics"].get(y)
        if not mx or not my or not _finite(mx["mean"]) or not _finite(my["mean"]):
            continue
        curves[(r["attack"], r["defense"])].append((mx["mean"], my["mean"], mx, my, r.get("value")))
    if not curves:
        return False
    if join_baseline:
        for (attack, defense), pts in curves.items():
            base = curves.get((attack, "none"))
            if defense != "none" and base:
                pts.append((*base[0][:4], -math.inf))
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    multi_attack = len({a for a, _ in curves}) > 1
    for (attack, defense), pts in curves.items():
        pts.sort(key=lambda p: (p[4] is None, _sort_key(p[4])))
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        xerr = [[max(0.0, p[0] - _lo(p[2], p[0])) for p in pts], [max(0.0, _hi(p[2], p[0]) - p[0]) for p in pts]]
        yerr = [[max(0.0, p[1] - _lo(p[3], p[1])) for p in pts], [max(0.0, _hi(p[3], p[1]) - p[1]) for p in pts]]
        label = f"{defense} ({attack})" if multi_attack else defense
        marker = "*" if defense == "none" else "o"
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker=marker, markersize=9 if marker == "*" else 5,
                    capsize=2, linewidth=1.2, label=label)
        for p in pts:
            if p[4] is not None and p[4] != -math.inf:
                ax.annotate(f"{p[4]:g}" if isinstance(p[4], (int, float)) else str(p[4]), (p[0], p[1]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    if cost_axis:  # a gain-erased axis: mark zero (an accuracy axis keeps its own range)
        ax.axhline(0.0, color="gray", linewidth=0.6)
    ax.set_xlabel(_X_LABELS.get(x, x) + ("  (utility cost)" if cost_axis else ""))
    ax.set_ylabel(_Y_LABELS.get(y, y))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def curve_plot(path: Path, title: str, curves: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    for label, c in curves.items():
        qs = sorted(c, key=int)
        ax.plot([int(q) for q in qs], [c[q] for q in qs], marker="o", label=label)
    ax.set_xlabel("distiller queries admitted")
    ax.set_ylabel("student clone accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _lo(m: dict, default: float) -> float:
    v = m.get("lo")
    return v if _finite(v) else default


def _hi(m: dict, default: float) -> float:
    v = m.get("hi")
    return v if _finite(v) else default


def _sort_key(v: Any) -> Any:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def write_report(out_dir: Path, metrics: dict[str, Any]) -> Path:
    lines = [f"# Study `{metrics['study']}`", ""]
    t = metrics.get("timings_s", {})
    lines.append(f"Device {metrics.get('device')}, seeds {metrics.get('seeds')}, total {t.get('total', 0):.0f} s "
                 "(" + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k != "total") + "). "
                 "Cells show the mean over seeds and a 95% bootstrap interval over seeds; gain erased is "
                 "1 - (S_def - S_0) / (S_clean - S_0) against the baseline (`none`) of the same attack.")
    lines.append("")
    for name, sub in metrics["tracks"].items():
        spec = sub["spec"]
        lines += [f"## {name}", ""]
        info = {k: v for k, v in sub.items() if k not in ("spec", "rows", "curves", "s0_by_seed", "sft_baseline")}
        if info:
            lines.append(", ".join(f"{k}: {_short(v)}" for k, v in info.items()))
            lines.append("")
        lines += table(sub["rows"], spec["columns"])
        lines.append("")
        png = f"pareto_{name}.png"
        if pareto_plot(out_dir / png, name, sub["rows"], spec["x"], spec["y"]):
            lines += [f"![Pareto plot: {name}]({png})", ""]
        else:
            lines += ["(no finite points to plot)", ""]
        for px, py in spec.get("plots", ()):
            xpng = f"{name}_{py}_vs_{px}.png"
            if pareto_plot(out_dir / xpng, f"{name}: {_Y_LABELS.get(py, py)} vs {_X_LABELS.get(px, px)}", sub["rows"],
                           px, py, cost_axis=False, join_baseline=True):
                lines += [f"![{py} vs {px}: {name}]({xpng})", ""]
        if sub.get("curves"):
            cpng = f"curve_{name}.png"
            curve_plot(out_dir / cpng, f"{name}: student quality over queries", sub["curves"])
            lines += [f"![student quality over queries: {name}]({cpng})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _short(v: Any) -> str:
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)
