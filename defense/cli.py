"""The ``distillguard`` command.

Built-in: ``config check|show``, ``keys new|rotate|list``, ``serve``, ``demo``, ``detect``, ``version``. Other packages add
subcommands through the ``distillguard.commands`` entry point group: each entry point names a function
``register(subparsers)`` that adds its parsers and sets ``func`` (returning an exit code).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

import yaml

from .errors import ConfigError, DistillGuardError, KeyFileError

COMMANDS_GROUP = "distillguard.commands"
EXIT_BAD_INPUT = 2


def _config_check(args: argparse.Namespace) -> int:
    from .config import load_config

    loaded = load_config(args.file)
    names = ", ".join(f"{b.name} ({b.type}, {b.mode.value}, {b.on_error.value})" for b in loaded.defenses)
    print(f"ok: {args.file}: {len(loaded.defenses)} defense(s): {names or 'none'}")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from .config import load_config
    from .schema import to_mapping

    loaded = load_config(args.file)
    doc = to_mapping(loaded.config)
    doc["defenses"] = [
        {"name": b.name, "type": b.type, "mode": b.mode.value, "on_error": b.on_error.value,
         "params": to_mapping(b.params)} for b in loaded.defenses
    ]
    yaml.safe_dump(doc, sys.stdout, sort_keys=False)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from .keys import write_new_key_file

    kid = write_new_key_file(args.file, overwrite=args.force)
    print(f"wrote {args.file} (mode 0600) with active key {kid}")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    from .keys import rotate_key_file

    kid = rotate_key_file(args.file, retire_old=args.retire_old)
    print(f"added active key {kid} to {args.file}; it is now the primary key")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from .keys import KeyRing

    ring = KeyRing.load(args.file)
    for kid in ring.key_ids:
        mark = "\tprimary" if kid == ring.primary_id else ""
        print(f"{kid}\t{ring.status(kid)}{mark}")
    return 0


def _version(args: argparse.Namespace) -> int:
    from . import __version__

    print(f"distillguard {__version__}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .settings import read_environment
    from .sidecar.server import serve

    path = args.config or read_environment().config_path
    if not path:
        raise ConfigError("give --config FILE or set DISTILLGUARD_CONFIG")
    return serve(path, listen=args.listen or (), metrics_port=args.metrics_port)


def _metrics_port(text: str) -> int | None:
    if text in ("off", "none"):
        return None
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 or 'off', got {text}")
    return port


def _demo(args: argparse.Namespace) -> int:
    if args.rpc or args.in_process:
        from .demo import run_demo

        return run_demo(args.config or "examples/distillguard.yaml", as_json=args.json, in_process=args.in_process)
    from server_plugins.demo import run_stack_demo

    return run_stack_demo(args.config, keep_running=args.keep_running, as_json=args.json)


def _ood_fit(args: argparse.Namespace) -> int:
    """Fit the input-density OOD detector the targeted defense's gate reads (``gate.detector``)."""
    import numpy as np

    from .perturbation.ood import InputDensity

    try:
        x = np.load(args.inputs, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {args.inputs} as a .npy array: {e}") from None
    if x.ndim < 2:
        raise ConfigError(f"{args.inputs}: need an array [n, ...] of training inputs, got shape {list(x.shape)}")
    try:
        det = InputDensity.fit(x.reshape(len(x), -1), quantile=args.quantile, shrinkage=args.shrinkage)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path = det.save(args.out)
    print_json({"detector": str(path), "dim": det.dim, "n_train": det.n_train, "quantile": det.quantile,
                "threshold": round(det.threshold, 6)})
    return 0


def _budget_show(args: argparse.Namespace) -> int:
    """GetBudget on the running sidecar, with the admin token from DISTILLGUARD_ADMIN_TOKEN."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from .settings import read_environment
    from .sidecar._proto.distillguard.v1 import defense_pb2 as pb
    from .sidecar._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc

    env = read_environment()
    target, token, loaded = args.target, env.admin_token, None
    if target is None or args.from_token or token is None:
        from .config import load_config

        path = args.config or env.config_path
        if path:
            loaded = load_config(path)
        elif target is None:
            raise ConfigError("give --target ADDR (unix:/path.sock or host:port), --config FILE, or set DISTILLGUARD_CONFIG")
    if target is None:
        listen = loaded.config.server.listen  # type: ignore[union-attr]
        target = next((a for a in listen if a.startswith("unix:")), listen[0])
    if token is None and loaded is not None:
        from .sidecar.server import admin_token

        token = admin_token(loaded.config.server)
    client_id = args.client
    if args.from_token:  # CLIENT is "-": hash the API key read from stdin, as a front would
        from .identity import client_id_from_token
        from .runtime import load_keys

        if loaded is None:
            raise ConfigError("--from-token needs the key file: give --config FILE or set DISTILLGUARD_CONFIG")
        raw = sys.stdin.readline().strip()
        if not raw:
            raise ConfigError("--from-token: no API key on stdin")
        client_id = client_id_from_token(raw, load_keys(loaded))  # type: ignore[arg-type]
    md = (("authorization", f"Bearer {token}"),) if token else None
    req = pb.GetBudgetRequest(client_id=client_id, tenant=args.tenant, model=args.model)
    with grpc.insecure_channel(target) as ch:
        try:
            resp = pb_grpc.DefenseServiceStub(ch).GetBudget(req, timeout=args.timeout, metadata=md)
        except grpc.RpcError as e:
            hint = " (set DISTILLGUARD_ADMIN_TOKEN)" if e.code() is grpc.StatusCode.UNAUTHENTICATED else ""
            print(f"error: GetBudget at {target}: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
            return 1
    if args.json:
        doc = MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        print_json({"client_id": client_id, "tenant": args.tenant or "default", **doc})
        return 0
    print(f"client {client_id}  tenant {args.tenant or 'default'}  tier {resp.tier}")
    print(f"suspicion {resp.suspicion_score:.3f}  strength x{resp.strength:.2f}")
    if resp.signals:
        print("signals   " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(resp.signals.items())))
    rows = [("limit", "unit", "scope", "used", "reserved", "remaining", "of", "reset_s")]
    rows += [(lim.name + (" (shadow)" if lim.shadow else ""), lim.unit, lim.scope, str(lim.used), str(lim.reserved),
              str(lim.remaining), str(lim.limit), f"{lim.reset_in_s:.1f}") for lim in resp.limits]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillguard", description="Defenses against model distillation.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cfg = sub.add_parser("config", help="validate or print a config file").add_subparsers(dest="action", required=True)
    p = cfg.add_parser("check", help="validate a config file (exit 2 naming the bad field)")
    p.add_argument("file")
    p.set_defaults(func=_config_check)
    p = cfg.add_parser("show", help="print the config with every default filled in")
    p.add_argument("file")
    p.set_defaults(func=_config_show)

    keys = sub.add_parser("keys", help="make and rotate key files").add_subparsers(dest="action", required=True)
    p = keys.add_parser("new", help="write a new key file (mode 0600) with one active key")
    p.add_argument("file")
    p.add_argument("--force", action="store_true", help="overwrite an existing file (old keys are lost)")
    p.set_defaults(func=_keys_new)
    p = keys.add_parser("rotate", help="add a new active key (the new primary); detection keeps trying old ones")
    p.add_argument("file")
    p.add_argument("--retire-old", action="store_true", help="mark the existing keys retired")
    p.set_defaults(func=_keys_rotate)
    p = keys.add_parser("list", help="list key ids and statuses (never the secrets)")
    p.add_argument("file")
    p.set_defaults(func=_keys_list)

    p = sub.add_parser("serve", help="run the gRPC sidecar")
    p.add_argument("--config", help="config file (default: DISTILLGUARD_CONFIG)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="unix:/path.sock or host:port; repeatable; replaces server.listen")
    p.add_argument("--metrics-port", type=_metrics_port, default=-1, metavar="N",
                   help="Prometheus port (0: any free port, off: none); replaces server.metrics_port")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the end-to-end demo: vLLM (cpu) with the plugin, the sidecar and Envoy on "
                                    "loopback, a legitimate and a distilling client (what ./dev demo runs)")
    p.add_argument("--config", help="config (default: examples/demo.yaml; with --rpc or --in-process: "
                                    "examples/distillguard.yaml)")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the stack up after the report and print its URL, model and an API key, until Ctrl-C")
    p.add_argument("--rpc", action="store_true",
                   help="instead: start only the sidecar, send each RPC once through the client, print the answers")
    p.add_argument("--in-process", action="store_true",
                   help="instead: run the --rpc requests through the chain in this process")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.set_defaults(func=_demo)

    from .watermark.cli import register as register_detect  # light: imports nothing until it runs

    register_detect(sub)

    budget = sub.add_parser("budget", help="read budgets from the running sidecar").add_subparsers(dest="action",
                                                                                                   required=True)
    p = budget.add_parser("show", help="a client's limits, suspicion signals and strength (GetBudget; admin token "
                                       "from DISTILLGUARD_ADMIN_TOKEN)")
    p.add_argument("client", metavar="CLIENT", help="client id as a front sends it (the keyed hash, c_...); "
                                                    "'-' with --from-token reads the API key from stdin")
    p.add_argument("--tenant", default="", help="tenant (default: 'default')")
    p.add_argument("--model", default="", help="served model (default: the limits for every model)")
    p.add_argument("--target", help="sidecar address (default: the config's first unix: listen address)")
    p.add_argument("--config", help="config file (default: DISTILLGUARD_CONFIG)")
    p.add_argument("--from-token", action="store_true", help="hash the API key on stdin with the key file")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_budget_show)

    ood = sub.add_parser("ood", help="out-of-distribution detectors for the targeted defense's gate").add_subparsers(
        dest="action", required=True)
    p = ood.add_parser("fit", help="fit the input-density detector on training inputs (a .npy [n, ...] array)")
    p.add_argument("inputs", help=".npy file of the model's training inputs, one row per input")
    p.add_argument("--out", required=True, help="where to write the detector (use it as gate.detector)")
    p.add_argument("--quantile", type=float, default=0.999,
                   help="share of the training inputs below the threshold (default 0.999)")
    p.add_argument("--shrinkage", type=float, default=0.01, help="covariance shrinkage (default 0.01)")
    p.set_defaults(func=_ood_fit)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_version)

    for ep in entry_points(group=COMMANDS_GROUP):
        try:
            ep.load()(sub)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the whole command down
            logging.getLogger("distillguard.cli").warning("command plugin %r failed to load: %s", ep.name, e)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, KeyFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DistillGuardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())
