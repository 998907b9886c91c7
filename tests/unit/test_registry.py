from __future__ import annotations

import sys
import textwrap

import pytest

from defense.config import parse_config
from defense.errors import ConfigError
from defense.registry import Registry
from defense.rules import RequestRules


def test_builtin_by_name():
    assert Registry().resolve("request_rules") is RequestRules


def test_module_class_string():
    from support.defenses import Recorder

    loaded = parse_config({"defenses": [{"type": "support.defenses:Recorder", "params": {"tag": "x"}}]})
    assert loaded.defenses[0].cls is Recorder and loaded.defenses[0].name == "recorder"
    assert loaded.defenses[0].params.tag == "x"


@pytest.mark.parametrize("ref, words", [
    ("support.defenses:NotADefense", "not a subclass of one of AdmissionDefense, SamplingDefense, ResponseDefense"),
    ("support.defenses:Missing", "has no attribute 'Missing'"),
    ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
])
def test_module_class_errors(ref, words):
    with pytest.raises(ConfigError, match="defenses\\[0\\].type") as e:
        parse_config({"defenses": [{"type": ref}]})
    assert words in str(e.value)


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A defense shipped by another installed distribution, found through its entry point."""
    (tmp_path / "dg_plugin_mod.py").write_text(textwrap.dedent("""
        from defense.base import AdmissionDefense
        from defense.types import ALLOW

        class PluginDefense(AdmissionDefense):
            def admit(self, ctx, cost):
                return ALLOW
    """))
    dist = tmp_path / "dg_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dg-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[distillguard.defenses]\nplugin_defense = dg_plugin_mod:PluginDefense\n"
                                           "request_rules = dg_plugin_mod:PluginDefense\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert "plugin_defense" in reg.known
    cls = reg.resolve("plugin_defense")
    assert cls.__name__ == "PluginDefense" and cls.__module__ == "dg_plugin_mod"
    # a plugin cannot shadow a built-in
    assert reg.resolve("request_rules") is RequestRules
    loaded = parse_config({"defenses": [{"type": "plugin_defense"}]}, registry=reg)
    assert loaded.defenses[0].cls is cls
    sys.modules.pop("dg_plugin_mod", None)


def test_register_checks_type():
    reg = Registry(group=None)
    with pytest.raises(ConfigError, match="not a subclass"):
        reg.register("bad", int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("request_rules", RequestRules)
