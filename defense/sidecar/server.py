"""The sidecar process: grpc.aio server, health, reflection, metrics, hot reload, graceful shutdown.

Lifecycle (the envoyproxy/ratelimit and grpc graceful-shutdown patterns):
- start: a bad config, key file or listen address refuses to start with a message naming it;
- reload on SIGHUP, or when the config or key file changes on disk: a new runtime is built and swapped
  in only if it builds; a failure keeps the running one and counts distillguard_config_reloads_total;
- SIGTERM/SIGINT: health goes NOT_SERVING, RPCs are still served for ``drain_s``, then the server stops
  accepting and in-flight RPCs get ``grace_s``; then the chain closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .. import __version__
from ..config import LoadedConfig, ServerSettings, check_listen_address, load_config
from ..deferred import Deferred
from ..errors import ConfigError
from ..metrics import Metrics
from ..runtime import build_runtime, keys_path, load_keys
from ..settings import read_environment
from ._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc
from .servicer import SERVICE_NAME, DefenseServicer, RuntimeHolder

log = logging.getLogger("distillguard.sidecar")


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second sidecar on the same port must fail, not share it
    ]


def admin_token(settings: ServerSettings) -> str | None:
    token = read_environment().admin_token
    if token:
        return token
    if settings.admin_token_file:
        try:
            token = Path(settings.admin_token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read admin token file: {e.strerror}", path="server.admin_token_file") from None
        if not token:
            raise ConfigError("admin token file is empty", path="server.admin_token_file")
        return token
    return None


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    try:
        key, cert = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
        ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    except OSError as e:
        raise ConfigError(f"cannot read TLS file {e.filename}: {e.strerror}", path="server.tls") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _bind(server: grpc.aio.Server, addr: str, creds: grpc.ServerCredentials | None) -> str:
    if addr.startswith("unix:"):
        path = Path(addr[5:].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a killed sidecar; binding over a live one fails below with EADDRINUSE anyway
        old = os.umask(0o177)  # the socket is created 0600: only this user may talk to the sidecar
        try:
            server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return f"unix:{path}"
    try:
        port = server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {addr}: {e}", path="server.listen") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {addr}", path="server.listen")
    host = addr.rpartition(":")[0]
    return f"{host}:{port}"


class Sidecar:
    """One sidecar process's server; ``run()`` serves until stopped."""

    def __init__(self, config_path: str, *, listen: Sequence[str] = (), metrics_port: int | None = -1,
                 on_ready: Callable[[list[str], int | None], None] | None = None,
                 extra_services: Sequence[Callable[[grpc.aio.Server], None]] = ()) -> None:
        self.config_path = config_path
        self.listen_override = tuple(check_listen_address(a) for a in listen)
        self.metrics_port_override = metrics_port  # -1: as configured
        self.on_ready = on_ready
        # more services on the same server (a front such as Envoy's ext_proc, or a benchmark's echo)
        self.extra_services = tuple(extra_services)
        self.metrics = Metrics()
        self.metrics.build_info.labels(__version__).set(1)
        loaded = load_config(config_path)
        self.settings = self._settings(loaded)
        # the ext_proc front's settles and the chain's metrics and ledger records (bookkeeping): one queue, run
        # on the loop's next turn (one callback for what a turn queued), drained at shutdown
        self.deferred = Deferred()
        self.holder = RuntimeHolder(build_runtime(loaded=loaded, keys=load_keys(loaded), metrics=self.metrics,
                                                bookkeeping=self.deferred.add))
        self._stamp = self._file_stamp(loaded)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.addresses: list[str] = []
        self.metrics_port: int | None = None
        self._http = None

    def _settings(self, loaded: LoadedConfig) -> ServerSettings:
        s = loaded.config.server
        changes: dict[str, object] = {}
        if self.listen_override:
            changes["listen"] = self.listen_override
        if self.metrics_port_override != -1:
            changes["metrics_port"] = self.metrics_port_override
        return dataclasses.replace(s, **changes) if changes else s

    def _file_stamp(self, loaded: LoadedConfig) -> tuple[str, float]:
        kp = keys_path(loaded)
        try:
            kst = os.stat(kp).st_mtime_ns if kp else 0
        except OSError:
            kst = -1
        return loaded.sha256, kst

    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> str:
        """Try to load the config and keys again; returns 'success', 'unchanged' or 'failure'."""
        try:
            loaded = load_config(self.config_path)
            stamp = self._file_stamp(loaded)
            if stamp == self._stamp:
                return "unchanged"
            if self._settings(loaded) != self.settings:
                log.warning("server settings changed in %s; they apply at the next restart", self.config_path)
            old = self.holder.runtime
            self.holder.runtime = build_runtime(loaded=loaded, keys=load_keys(loaded), metrics=self.metrics,
                                                ledger=old.chain.ledger, bookkeeping=self.deferred.add)
            self._stamp = stamp
        except Exception as e:  # noqa: BLE001 - any failure keeps the last good config
            self.metrics.config_reloads.labels("failure").inc()
            log.error("config reload failed, keeping the running config: %s", e)
            return "failure"
        self.metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s (sha256 %s)", self.config_path, loaded.sha256[:16])
        # in-flight RPCs may still hold the old chain: close it once they have had time to finish
        asyncio.get_running_loop().call_later(self.settings.grace_s + 1.0, old.chain.close)
        return "success"

    async def _watch(self) -> None:
        poll = self.settings.reload_poll_s
        last_failed: tuple[str, float] | None = None
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._reload.wait(), timeout=poll if poll > 0 else None)
                forced = True
            except TimeoutError:
                forced = False
            self._reload.clear()
            if self._stop.is_set():
                return
            if forced:  # SIGHUP: always try (a file that failed before may have been fixed)
                self.reload()
                continue
            # a poll: reload only when a file changed, and count a broken version once
            try:
                stamp = (_sha_of(self.config_path), self._keys_mtime())
            except OSError:
                stamp = ("", self._keys_mtime())
            if stamp in (self._stamp, last_failed):
                continue
            last_failed = stamp if self.reload() == "failure" else None

    def _keys_mtime(self) -> float:
        kp = keys_path(self.holder.runtime.loaded)
        try:
            return os.stat(kp).st_mtime_ns if kp else 0
        except OSError:
            return -1

    # -- serve ----------------------------------------------------------------------------------
    async def run(self) -> None:
        settings = self.settings
        server = grpc.aio.server(options=server_options(settings))
        servicer = DefenseServicer(self.holder, admin_token=admin_token(settings))
        pb_grpc.add_DefenseServiceServicer_to_server(servicer, server)
        for add in self.extra_services:
            add(server)
        if self.holder.runtime.loaded.config.front.envoy_ext_proc:  # read at start, like the listen addresses
            from server_plugins.envoy.ext_proc import add_ext_proc  # the adapter lives with the other fronts

            add_ext_proc(server, lambda: self.holder.runtime, self.deferred)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        creds = _credentials(settings)
        self.addresses = [_bind(server, a, creds) for a in settings.listen]
        if settings.metrics_port is not None:
            from prometheus_client import start_http_server

            self._http, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        watcher = asyncio.create_task(self._watch())
        log.info("serving on %s", ", ".join(self.addresses))
        # everything built so far lives for the process: keep it out of the collector's scans, so the
        # cyclic GC walks only per-request garbage (about 8 us of a 60 us Admit before this)
        gc.collect()
        gc.freeze()
        if self.on_ready:
            self.on_ready(self.addresses, self.metrics_port)
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down: health NOT_SERVING, draining %.1f s, grace %.1f s", settings.drain_s, settings.grace_s)
            await health_servicer.enter_graceful_shutdown()
            await asyncio.sleep(settings.drain_s)
            await server.stop(settings.grace_s)
            self.deferred.drain()  # settles of answered exchanges still queued
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.holder.runtime.chain.close()
            if self._http is not None:
                self._http.shutdown()
            for a in self.addresses:
                if a.startswith("unix:"):
                    Path(a[5:]).unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()


def _sha_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def serve(config_path: str, *, listen: Sequence[str] = (), metrics_port: int | None = -1) -> int:
    """Run the sidecar until SIGTERM; returns the process exit code."""

    def ready(addresses: list[str], port: int | None) -> None:
        metrics = f"; metrics http://127.0.0.1:{port}/metrics" if port is not None else ""
        print(f"distillguard sidecar serving on {', '.join(addresses)}{metrics}", flush=True)

    async def main() -> None:
        sidecar = Sidecar(config_path, listen=listen, metrics_port=metrics_port, on_ready=ready)
        await sidecar.run()

    asyncio.run(main())
    print("distillguard sidecar stopped", file=sys.stderr, flush=True)
    return 0
