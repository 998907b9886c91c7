"""``distillguard kserve-proxy``: registered through the ``distillguard.commands`` entry point group."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from defense.errors import ConfigError
    from defense.settings import read_environment

    try:
        from .server import serve
    except ImportError as e:
        raise ConfigError(f"the KServe proxy needs tritonclient[grpc] and googleapis-common-protos "
                          f"(pip install 'distillguard[kserve]'): {e}") from None

    config = args.config or read_environment().config_path
    if not config:
        raise ConfigError("give --config FILE (the defense config) or set DISTILLGUARD_CONFIG")
    return serve(config, args.proxy_config, listen=args.listen or (), upstream=args.upstream,
                 metrics_port=args.metrics_port)


def _metrics_port(text: str) -> int | None:
    if text in ("off", "none"):
        return None
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 or 'off', got {text}")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kserve-proxy", help="run the KServe v2 (Triton gRPC) proxy in front of a Triton server")
    p.add_argument("--config", help="the defense config (default: DISTILLGUARD_CONFIG)")
    p.add_argument("--proxy-config", required=True, metavar="FILE",
                   help="the proxy's YAML: listen, upstream, and each model's outputs (examples/kserve.yaml)")
    p.add_argument("--listen", action="append", metavar="ADDR", help="host:port or unix:/path; replaces listen")
    p.add_argument("--upstream", metavar="ADDR", help="Triton's gRPC host:port; replaces upstream")
    p.add_argument("--metrics-port", type=_metrics_port, default=-1, metavar="N",
                   help="Prometheus port (0: any free port, off: none); replaces metrics_port")
    p.set_defaults(func=_run)
