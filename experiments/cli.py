"""``distillguard experiment run|summarize``, registered through the ``distillguard.commands`` entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from . import progress
    from .config import load_study, resolved
    from .runner import run_study

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"device={args.device}")  # in the resolved config, so the run says where it ran
    study, _ = load_study(args.config, overrides)
    if args.dry_run:
        import yaml

        from .config import defenses_for

        yaml.safe_dump(json.loads(json.dumps(resolved(study), default=str)), sys.stdout, sort_keys=False)
        for track in study.enabled_tracks():
            names = [d.label(v) for d in defenses_for(study, track) for v in d.strengths]
            print(f"# {track}: none, {', '.join(names) or '(no defense applies)'} x seeds {list(study.seeds)}")
        return 0
    progress.set_enabled(not args.no_progress)
    out = run_study(study, Path(args.out) if args.out else None, argv=sys.argv)
    print(f"wrote {out}/report.md, {out}/metrics.json")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from .summarize import write_summary

    summary = write_summary(args.run_dirs, args.out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from .summarize import DEFAULT_OUT

    exp = subparsers.add_parser("experiment", help="attack-versus-defense studies (experiments/configs/)")
    sub = exp.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("run", help="run (or resume) a study; writes runs/NAME-TIMESTAMP/ unless --out")
    p.add_argument("config", help="a study YAML, e.g. experiments/configs/smoke.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value (VALUE parsed as YAML), e.g. --set seeds=[0] "
                        "--set tracks.lm.enabled=false; repeatable")
    p.add_argument("--out", help="run directory; an existing run of the same config resumes where it stopped")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where models run (default: the config's device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the cells, run nothing")
    p.set_defaults(func=_run)
    p = sub.add_parser("summarize", help="write experiments/results/summary.json from finished runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"where to write (default {DEFAULT_OUT})")
    p.set_defaults(func=_summarize)
