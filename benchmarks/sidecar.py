"""Sidecar latency: Admit against a bare echo RPC on the same grpc.aio server, same settings, same UDS.

    ./dev bench sidecar            # or: .venv/bin/python benchmarks/sidecar.py [--calls N] [--seconds S]

One server process hosts both: the real DefenseService built from examples/distillguard.yaml (every
defense in it enabled) and an echo method that returns the serialized Admit request it gets. The client
(another process) alternates blocks of sequential calls so drift on this shared machine hits both
equally, then runs 8 concurrent clients against each. Writes benchmarks/results/sidecar.json and appends
a dated line to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, record  # noqa: E402

ECHO_METHOD = "/distillguard.bench.Echo/Call"
TARGETS = {"admit_p50_us": ("<=", 1.25, "echo_p50_us"), "admit_p99_us": ("<=", 2.0, "echo_p99_us")}


def serve(config: str, sock: str) -> None:
    """Child process: the sidecar with an echo method on the same server."""
    import grpc

    from defense.sidecar.server import Sidecar

    def add_echo(server: grpc.aio.Server) -> None:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        handler = grpc.unary_unary_rpc_method_handler(call)  # no (de)serializers: bytes in, bytes out
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("distillguard.bench.Echo",
                                                                              {"Call": handler}),))

    def ready(addresses: list[str], port: int | None) -> None:
        print("READY", addresses[0], flush=True)

    asyncio.run(Sidecar(config, listen=[sock], metrics_port=None, on_ready=ready,
                        extra_services=[add_echo]).run())


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _request(i: int):
    from defense.sidecar._proto.distillguard.v1 import defense_pb2 as pb

    msg = pb.AdmitRequest(request_id=f"bench-{os.getpid()}-{i}", model="tiny", api=pb.OPENAI_CHAT, max_tokens=64,
                          n=1, logprobs=True, top_logprobs=10, logit_bias_entries=1)
    msg.identity.client_id = f"c_{i % 50:04d}"
    msg.identity.tenant = "acme"
    msg.prompt.chat.messages.add(role="user", content="Summarize the plot of a short story in two sentences.")
    return msg


def measure(target: str, calls: int, seconds: float) -> dict:
    import grpc

    from defense.sidecar._proto.distillguard.v1 import defense_pb2 as pb
    from defense.sidecar._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc

    counter = iter(range(10**9))

    def make(channel):
        stub = pb_grpc.DefenseServiceStub(channel)
        echo = channel.unary_unary(ECHO_METHOD)
        return {"admit": lambda: stub.Admit(_request(next(counter)), timeout=5),
                "echo": lambda: pb.AdmitResponse.FromString(echo(_request(next(counter)).SerializeToString(), timeout=5))}

    channel = grpc.insecure_channel(target)
    fns = make(channel)
    for fn in fns.values():  # warm both paths
        for _ in range(200):
            fn()
    lat: dict[str, list[float]] = {"echo": [], "admit": []}
    block = 250
    for _ in range(max(1, calls // block)):
        for name in ("echo", "admit"):
            fn = fns[name]
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                lat[name].append(time.perf_counter() - t0)
    channel.close()

    rps = {}
    for name in ("echo", "admit"):
        stop = threading.Event()
        counts = [0] * 8

        def worker(j: int, name: str = name, stop: threading.Event = stop, counts: list[int] = counts) -> None:
            ch = grpc.insecure_channel(target)
            fn = make(ch)[name]
            while not stop.is_set():
                fn()
                counts[j] += 1
            ch.close()

        threads = [threading.Thread(target=worker, args=(j,)) for j in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # connect and warm
        c0, t0 = sum(counts), time.perf_counter()
        time.sleep(seconds)
        c1, t1 = sum(counts), time.perf_counter()
        stop.set()
        for t in threads:
            t.join()
        rps[name] = (c1 - c0) / (t1 - t0)
    us = 1e6
    return {
        "echo_p50_us": round(_percentile(lat["echo"], 0.5) * us, 1),
        "echo_p99_us": round(_percentile(lat["echo"], 0.99) * us, 1),
        "admit_p50_us": round(_percentile(lat["admit"], 0.5) * us, 1),
        "admit_p99_us": round(_percentile(lat["admit"], 0.99) * us, 1),
        "echo_rps_conc": round(rps["echo"], 1),
        "admit_rps_conc": round(rps["admit"], 1),
        "calls_per_rpc": len(lat["admit"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000, help="sequential calls per RPC")
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each 8-client run")
    ap.add_argument("--config", default=str(ROOT / "examples" / "distillguard.yaml"))
    ap.add_argument("--serve", metavar="SOCK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.config, args.serve)
        return 0
    with tempfile.TemporaryDirectory(prefix="dg-bench-") as tmp:
        sock = f"unix:{tmp}/sidecar.sock"
        server = subprocess.Popen([sys.executable, __file__, "--serve", sock, "--config", args.config],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            line = server.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("READY"):
                raise SystemExit(f"server did not start: {line!r}")
            result = measure(sock, args.calls, args.seconds)
        finally:
            server.terminate()
            server.wait(30)
    result.update({
        "admit_over_echo_p50": round(result["admit_p50_us"] / result["echo_p50_us"], 3),
        "admit_over_echo_p99": round(result["admit_p99_us"] / result["echo_p99_us"], 3),
        "config": os.path.relpath(args.config, ROOT),
        "transport": "uds", "server": "grpc.aio, one process; client: grpc sync, another process",
        "malloc_env": bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")),
        **machine(),
    })
    met = all(result[k] <= f * result[b] for k, (_, f, b) in TARGETS.items())
    summary = (f"admit p50 {result['admit_p50_us']} us vs echo {result['echo_p50_us']} us "
               f"(x{result['admit_over_echo_p50']}, target <= 1.25); p99 {result['admit_p99_us']} vs "
               f"{result['echo_p99_us']} us (x{result['admit_over_echo_p99']}, target <= 2); "
               f"8 clients {result['admit_rps_conc']} vs {result['echo_rps_conc']} calls/s; "
               f"targets {'met' if met else 'MISSED'}")
    result["targets_met"] = met
    record("sidecar", result, summary)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
