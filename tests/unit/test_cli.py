from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from defense.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "defense.cli", *args], capture_output=True, text=True, cwd=kw.get("cwd", ROOT),
                          env={**os.environ, **kw.get("env", {})}, timeout=60)


def test_config_check_ok():
    r = run("config", "check", "examples/distillguard.yaml")
    assert r.returncode == 0, r.stderr
    assert "request_rules" in r.stdout


def test_config_check_misspelled_type_exits_2_naming_it_and_the_valid_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("defenses:\n  - type: request_rulez\n")
    r = run("config", "check", str(p))
    assert r.returncode == 2
    assert "defenses[0].type" in r.stderr and "'request_rulez'" in r.stderr and "known: " in r.stderr and "request_rules, " in r.stderr.split("known: ")[1]


def test_config_check_unknown_top_level_key_exits_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("defences: []\n")
    r = run("config", "check", str(p))
    assert r.returncode == 2
    assert "unknown key 'defences'" in r.stderr and "did you mean 'defenses'" in r.stderr


def test_keys_new_list_rotate(tmp_path, capsys):
    p = tmp_path / "keys.yaml"
    assert main(["keys", "new", str(p)]) == 0
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert main(["keys", "new", str(p)]) == 2  # refuses to overwrite
    assert main(["keys", "rotate", str(p)]) == 0
    capsys.readouterr()
    assert main(["keys", "list", str(p)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("primary")
    secret = [ln for ln in p.read_text().splitlines() if "secret:" in ln][0].split()[-1]
    assert secret not in "\n".join(lines)


@pytest.mark.parametrize("mode", [["--in-process"], ["--rpc"]])
def test_demo_runs(tmp_path, key_file, mode):
    r = run("demo", "--config", "examples/distillguard.yaml", "--json", *mode, env={"DISTILLGUARD_KEYS": str(key_file)})
    assert r.returncode == 0, r.stderr
    assert '"decision": "deny"' in r.stdout and '"reason_code": "top_logprobs_all"' in r.stdout
    if mode == ["--rpc"]:  # through the sidecar: settle retried once, charged once
        assert '"settle": [true, false]' in r.stdout
        assert '{"rpc": "GetBudget", "status": "OK"}' in r.stdout  # the example config's budget answers


def test_demo_without_key_file_explains(tmp_path):
    r = run("demo", "--config", "examples/distillguard.yaml", env={"DISTILLGUARD_KEYS": str(tmp_path / "none.yaml")})
    assert r.returncode == 2 and "distillguard keys new" in r.stderr


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("distillguard ")


@pytest.mark.parametrize("argv", [[], ["config"], ["nonsense"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_ood_fit_writes_a_detector_the_targeted_gate_loads(tmp_path):
    import json

    import numpy as np

    from defense.perturbation.targeted import GateParams, Targeted, TargetedParams

    x = np.random.default_rng(0).normal(size=(500, 4, 4)).astype(np.float32)  # [n, ...]: rows are flattened
    np.save(tmp_path / "train.npy", x)
    r = run("ood", "fit", str(tmp_path / "train.npy"), "--out", str(tmp_path / "det.npz"), "--quantile", "0.99")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dim"] == 16 and out["n_train"] == 500 and out["quantile"] == 0.99
    d = Targeted(TargetedParams(gate=GateParams(detector=out["detector"], misinform=True)))
    assert d._detector is not None and d._detector.dim == 16
    (tmp_path / "bad.npy").write_bytes(b"junk")
    bad = run("ood", "fit", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "x.npz"))
    assert bad.returncode == 2 and "cannot read" in bad.stderr
    np.save(tmp_path / "few.npy", x[:10])
    few = run("ood", "fit", str(tmp_path / "few.npy"), "--out", str(tmp_path / "x.npz"))
    assert few.returncode == 2 and "more inputs than dimensions" in few.stderr
