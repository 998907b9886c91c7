from __future__ import annotations

from pathlib import Path

import pytest

from defense.base import Mode, OnError
from defense.config import load_config, parse_config
from defense.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distillguard.yaml"


def test_example_config_loads():
    loaded = load_config(EXAMPLE)
    names = [b.name for b in loaded.defenses]
    assert names[0] == "request_rules" and "budget" in names  # rules clamp first, the budget reserves the clamped request
    assert loaded.config.state.uri == "sqlite:///.distillguard/state.db"
    assert len(loaded.sha256) == 64


@pytest.mark.parametrize("doc, path, words", [
    ({"servr": {}}, "servr", ["unknown key 'servr'", "did you mean 'server'", "valid keys: version, server"]),
    ({"server": {"listn": []}}, "server.listn", ["unknown key 'listn'", "listen"]),
    ({"server": {"grace_s": "soon"}}, "server.grace_s", ["must be a number"]),
    ({"server": {"listen": ["nowhere"]}}, "server", ["'unix:/path.sock' or 'host:port'"]),
    ({"defenses": [{"type": "request_rulez"}]}, "defenses[0].type",
     ["unknown defense type 'request_rulez'", "did you mean 'request_rules'", "known: ", "request_rules, "]),
    ({"defenses": [{"type": "request_rules", "mode": "shadw"}]}, "defenses[0].mode", ["valid: enforce, shadow, off"]),
    ({"defenses": [{"type": "request_rules", "on_error": "open"}]}, "defenses[0].on_error", ["fail_open, fail_closed"]),
    ({"defenses": [{"type": "request_rules", "params": {"max_top": 3}}]}, "defenses[0].params.max_top",
     ["unknown key 'max_top'", "max_top_logprobs"]),
    ({"defenses": [{"type": "request_rules", "params": {"over_cap": "cut"}}]}, "defenses[0].params.over_cap",
     ["valid: clamp, deny"]),
    ({"defenses": [{"type": "request_rules", "params": {"allow_all_logprobs": "yes"}}]},
     "defenses[0].params.allow_all_logprobs", ["true or false"]),
    ({"defenses": [{"type": "request_rules"}, {"type": "request_rules"}]}, "defenses[1]", ["duplicate defense name"]),
    ({"state": {"uri": "postgres://x"}}, "state", ["sqlite://, redis://"]),
    ({"version": 2}, "<top level>", ["version must be 1"]),
    ([1, 2], "<top level>", ["must be a mapping"]),
])
def test_bad_config_names_the_field(doc, path, words):
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == path
    for w in words:
        assert w in str(e.value)


def test_defaults_and_policy_resolution():
    loaded = parse_config({"defenses": [{"type": "request_rules", "name": "rules", "mode": "shadow",
                                         "on_error": "fail_open"}, {"type": "request_rules", "name": "r2"}]})
    a, b = loaded.defenses
    assert (a.name, a.mode, a.on_error) == ("rules", Mode.SHADOW, OnError.FAIL_OPEN)
    assert b.on_error is OnError.FAIL_CLOSED  # the defense's own default


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_config_path_from_environment(monkeypatch):
    monkeypatch.setenv("DISTILLGUARD_CONFIG", str(EXAMPLE))
    assert load_config().source == str(EXAMPLE)
    monkeypatch.delenv("DISTILLGUARD_CONFIG")
    with pytest.raises(ConfigError, match="DISTILLGUARD_CONFIG is not set"):
        load_config()
