"""The deployment kit: Kubernetes manifests, the Dockerfile, and the Grafana dashboard stay true to the code."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from defense.config import parse_config
from defense.metrics import Metrics, _Family
from server_plugins.kserve.settings import parse_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "examples" / "kubernetes"
DASHBOARD = ROOT / "examples" / "grafana" / "distillguard-dashboard.json"
K8S_VERSION = "1.37.0"  # the newest schema kubernetes-validate ships


def manifests() -> list[tuple[str, dict]]:
    return [(f"{p.name}[{i}]", doc) for p in sorted(K8S.glob("*.yaml"))
            for i, doc in enumerate(yaml.safe_load_all(p.read_text())) if doc]


def find(kind: str, name: str) -> dict:
    for _, doc in manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def config_data() -> dict:
    return find("ConfigMap", "distillguard-config")["data"]


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[w for w, _ in manifests()])
def test_every_manifest_is_valid_kubernetes(where, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # strict: unknown fields are errors too


def test_the_pod_shares_a_socket_volume_and_mounts_keys_0400():
    spec = find("Deployment", "model-with-distillguard")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"model-server", "distillguard", "envoy"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["sockets"]
    assert volumes["keys"]["secret"]["defaultMode"] == 0o400
    assert volumes["config"]["configMap"]["name"] == "distillguard-config"

    def mounts(c: str) -> dict[str, str]:
        return {m["name"]: m["mountPath"] for m in containers[c].get("volumeMounts", [])}

    assert mounts("distillguard")["sockets"] == mounts("envoy")["sockets"]
    sidecar = yaml.safe_load(config_data()["distillguard.yaml"])
    sock = sidecar["server"]["listen"][0].removeprefix("unix:")
    assert Path(sock).parent == Path(mounts("distillguard")["sockets"])
    envoy = yaml.safe_load(config_data()["envoy.yaml"])
    pipes = re.findall(r"'pipe': \{'path': '([^']+)'\}", str(envoy))
    assert pipes == [sock]
    assert Path(sidecar["keys"]["file"]).parent == Path(mounts("distillguard")["keys"])
    # the sidecar reads the whole ConfigMap directory (a subPath mount would never see an update)
    assert "subPath" not in next(m for m in containers["distillguard"]["volumeMounts"] if m["name"] == "config")
    for c in ("distillguard", "envoy"):
        sc = containers[c]["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False


def test_the_shipped_configs_load_with_the_strict_loaders():
    loaded = parse_config(yaml.safe_load(config_data()["distillguard.yaml"]))
    assert [b.type for b in loaded.defenses] == ["request_rules", "budget", "keyed_noise"]
    proxy = parse_settings(yaml.safe_load(config_data()["kserve.yaml"]))
    assert proxy.upstream.startswith("127.0.0.1:")  # Triton is reachable only through the proxy
    triton = find("Deployment", "triton-with-distillguard")["spec"]["template"]["spec"]["containers"][0]
    assert "--grpc-address=127.0.0.1" in triton["args"]


def test_the_dockerfile_installs_what_the_sidecar_needs_and_nothing_heavy():
    dockerfile = (ROOT / "Dockerfile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    heavy = {"torch", "transformers", "tokenizers", "safetensors"}  # in-engine plugins and experiments only

    def name(req: str) -> str:
        return re.split(r"[<>=!\[;~ ]", req, maxsplit=1)[0].lower()

    for req in deps["dependencies"]:
        if name(req) not in heavy:
            assert f'"{name(req)}' in dockerfile.lower(), f"Dockerfile does not install {name(req)}"
    for req in deps["optional-dependencies"]["kserve"]:
        assert f'"{name(req)}' in dockerfile.lower(), f"Dockerfile EXTRAS=kserve does not install {name(req)}"
    for pkg in heavy:
        assert f'"{pkg}' not in dockerfile.lower()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".distillguard" in ignored and "**/keys.yaml" in ignored and ".venv" in ignored


def metric_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Sample name -> (family, label names) for every family defense/metrics.py defines."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for m in vars(Metrics()).values():
        if not isinstance(m, MetricWrapperBase | _Family):
            continue
        base, labels = m._name, tuple(m._labelnames)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[m._type]
        for s in suffixes:
            out[base + s] = (base, labels + (("le",) if s == "_bucket" else ()))
    return out


def test_every_metric_the_dashboard_queries_is_defined():
    dash = json.loads(DASHBOARD.read_text())
    families = metric_families()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        for metric, selector in re.findall(r"(distillguard_[a-z0-9_]+)(\{[^}]*\})?", expr):
            assert metric in families, f"dashboard queries {metric}, which defense/metrics.py does not define"
            used.add(families[metric][0])
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", selector):
                assert label in families[metric][1] + ("job", "instance"), f"{metric} has no label {label}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            names = [g.strip() for g in group.split(",")]
            metrics = re.findall(r"distillguard_[a-z0-9_]+", expr)
            for label in names:
                assert any(label in families[m][1] for m in metrics) or label in ("job", "instance"), \
                    f"'by ({group})' in {expr!r}: no metric there has label {label}"
    # not required to cover every family (a new one lands in metrics.py first), but it covers most
    assert len(used) >= 15


def test_dashboard_panels_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area


_NO_TORCH = '''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tokenizers", "safetensors"):
            raise ImportError(f"{name} is not in the sidecar image")
sys.meta_path.insert(0, Block())
import yaml
import defense.sidecar.server, server_plugins.kserve.server
from defense.config import parse_config
from defense.keys import KeyRing
from defense.runtime import build_runtime
cfg = yaml.safe_load(sys.stdin.read())
cfg["state"]["uri"] = "memory://"
rt = build_runtime(loaded=parse_config(cfg), keys=KeyRing.generate())
print(",".join(rt.chain.names))
'''


def test_the_sidecar_runs_without_torch_as_the_image_ships_it():
    out = subprocess.run([sys.executable, "-c", _NO_TORCH], input=config_data()["distillguard.yaml"], text=True,
                         capture_output=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "request_rules,budget,keyed_noise"


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler here")
def test_the_compiled_readers_are_built_where_a_compiler_is():
    """pyproject.toml marks the C extensions optional (an install without a compiler goes on without them),
    so a build that broke would only show as their tests skipping: where a compiler exists, they must be
    there, each listed in pyproject.toml."""
    modules = [m["name"] for m in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]]
    assert sorted(modules) == ["server_plugins.envoy._wire", "server_plugins.openai._lpscan"]
    for name in modules:
        assert importlib.import_module(name).__file__.endswith(".so")
