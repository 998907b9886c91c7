"""The KServe proxy process: a grpc.aio server with the proxy's handlers, health, metrics and reload.

Its own server, not the sidecar's: clients reach it over the network, and the sidecar's DefenseService
(Admit and Settle take the caller's word for the client id) must not be reachable from there.
- start: a bad defense config, key file, proxy config or listen address refuses to start, naming it;
- SIGHUP rebuilds the chain from the defense config and swaps it in only if it builds (the proxy config
  itself applies at the next start);
- SIGTERM/SIGINT: health goes NOT_SERVING, the server stops accepting, in-flight calls get ``grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from defense import __version__
from defense.config import check_listen_address, load_config
from defense.deferred import Deferred
from defense.errors import ConfigError
from defense.metrics import Metrics
from defense.runtime import build_runtime, load_keys
from defense.sidecar.servicer import RuntimeHolder

from .proxy import SERVICE, KServeProxy
from .settings import ProxySettings, load_settings

log = logging.getLogger("distillguard.kserve")
READY_PREFIX = "distillguard kserve proxy serving on "


def _bind(server: grpc.aio.Server, addr: str) -> str:
    if addr.startswith("unix:"):
        path = Path(addr[5:].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a killed proxy
        server.add_insecure_port(f"unix:{path}")
        return f"unix:{path}"
    try:
        port = server.add_insecure_port(addr)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {addr}: {e}", path="listen") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {addr}", path="listen")
    return f"{addr.rpartition(':')[0]}:{port}"


class ProxyServer:
    def __init__(self, config_path: str, settings: ProxySettings, *,
                 on_ready: Callable[[list[str]], None] | None = None) -> None:
        self.config_path = config_path
        self.settings = settings
        self.on_ready = on_ready
        self.metrics = Metrics()
        self.metrics.build_info.labels(__version__).set(1)
        loaded = load_config(config_path)
        # settles, and the chain's metrics and ledger records (bookkeeping): one queue, drained once a request's
        # answer is out (the bookkeeping waits there for its settle, or the proxy's kick) and at shutdown
        self.deferred = Deferred()
        self.holder = RuntimeHolder(build_runtime(loaded=loaded, keys=load_keys(loaded), metrics=self.metrics,
                                                bookkeeping=self.deferred.hold))
        self.proxy = KServeProxy(settings, self.holder, deferred=self.deferred)
        self._stop = asyncio.Event()
        self.addresses: list[str] = []
        self.metrics_port: int | None = None

    def reload(self) -> bool:
        try:
            loaded = load_config(self.config_path)
            old = self.holder.runtime
            self.holder.runtime = build_runtime(loaded=loaded, keys=load_keys(loaded), metrics=self.metrics,
                                                ledger=old.chain.ledger, bookkeeping=self.deferred.hold)
        except Exception as e:  # noqa: BLE001 - any failure keeps the running chain
            self.metrics.config_reloads.labels("failure").inc()
            log.error("config reload failed, keeping the running config: %s", e)
            return False
        self.metrics.config_reloads.labels("success").inc()
        # in-flight calls may still hold the old chain
        asyncio.get_running_loop().call_later(self.settings.grace_s + 1.0, old.chain.close)
        return True

    async def run(self) -> None:
        s = self.settings
        n = s.max_message_bytes
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", n),
                                          ("grpc.max_send_message_length", n), ("grpc.so_reuseport", 0)])
        self.proxy.open()
        self.proxy.add_to_server(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self.addresses = [_bind(server, a) for a in s.listen]
        http = None
        if s.metrics_port is not None:
            from prometheus_client import start_http_server

            http, _ = start_http_server(s.metrics_port, addr=s.metrics_host, registry=self.metrics.registry)
            self.metrics_port = http.server_port
        await server.start()
        for name in ("", SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # everything built so far lives for the process: keep it out of the collector's scans, so the
        # cyclic GC walks only per-request garbage (as the sidecar does)
        gc.collect()
        gc.freeze()
        if self.on_ready:
            self.on_ready(self.addresses)
        try:
            await self._stop.wait()
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(s.grace_s)
            await self.proxy.close()
            self.holder.runtime.chain.close()
            if http is not None:
                http.shutdown()
            for a in self.addresses:
                if a.startswith("unix:"):
                    Path(a[5:]).unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()


def serve(config_path: str, proxy_config: str, *, listen: Sequence[str] = (), upstream: str | None = None,
          metrics_port: int | None = -1) -> int:
    settings = load_settings(proxy_config)
    changes: dict[str, object] = {}
    if listen:
        changes["listen"] = tuple(check_listen_address(a) for a in listen)
    if upstream:
        changes["upstream"] = upstream
    if metrics_port != -1:
        changes["metrics_port"] = metrics_port
    if changes:
        settings = dataclasses.replace(settings, **changes)

    def ready(addresses: list[str]) -> None:
        metrics = f"; metrics http://127.0.0.1:{server.metrics_port}/metrics" if server.metrics_port is not None else ""
        print(f"{READY_PREFIX}{', '.join(addresses)} -> {settings.upstream}{metrics}", flush=True)

    server = ProxyServer(config_path, settings, on_ready=ready)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.run())
    print("distillguard kserve proxy stopped", file=sys.stderr, flush=True)
    return 0
