"""The ``distillguard`` command.

Built-in: ``config check|show``, ``keys new|rotate|list``, ``demo``, ``version``. Other packages add
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
    from .demo import run_demo

    return run_demo(args.config, as_json=args.json, in_process=args.in_process)


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

    p = sub.add_parser("demo", help="start the sidecar, send each RPC once through the client, print the answers")
    p.add_argument("--config", default="examples/distillguard.yaml")
    p.add_argument("--in-process", action="store_true", help="run the requests through the chain in this process")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.set_defaults(func=_demo)

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
