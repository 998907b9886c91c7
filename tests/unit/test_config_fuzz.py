"""Any edit of a shipped config: a value replaced by one of any type, a key removed, an unknown key added.
Loading it and building its runtime either works or raises ConfigError naming what is wrong; never another
exception, which an operator would meet as a traceback."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defense.config import parse_config
from defense.errors import ConfigError
from defense.keys import KeyRing
from defense.metrics import Metrics
from defense.runtime import build_runtime
from server_plugins.kserve.settings import parse_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.sampled_from([0, -1, 2**64, 10**400 // 10**380]),
                     st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "x", "enforce", "1", "0.5", "-1"]),
                     st.text(max_size=5))
_ANY = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=5)


def _paths(node: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*at, i))
    return out


@st.composite
def _edited(draw: st.DrawFn, doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)[1:]))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        how = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if how == "replace":
            parent[path[-1]] = draw(_ANY)
        elif how == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "mode", "params", "type", "limits", "unit"]))] = draw(_ANY)
        else:
            parent.append(draw(_ANY))
    return doc


def _load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


@pytest.mark.parametrize("name", ["distillguard.yaml", "demo.yaml"])
@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_an_edited_config_loads_or_names_what_is_wrong(name, data):
    doc = data.draw(_edited(_load(name)))
    if isinstance(doc, dict):  # state and keys are the deployment's: kept in memory here
        doc["state"] = {"uri": "memory://"}
        doc.pop("keys", None)
    try:
        loaded = parse_config(doc)
        build_runtime(loaded=loaded, keys=KeyRing.generate(), metrics=Metrics()).chain.close()
    except ConfigError as e:
        assert str(e)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_an_edited_proxy_config_loads_or_names_what_is_wrong(data):
    doc = data.draw(_edited(_load("kserve.yaml")))
    try:
        parse_settings(doc)
    except ConfigError as e:
        assert str(e)
