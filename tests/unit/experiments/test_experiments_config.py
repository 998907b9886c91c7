"""Study configs: overrides, strict loading with errors that name the field, cells, checkpoints."""

from pathlib import Path

import pytest
import yaml

from defense.errors import ConfigError
from experiments.config import (
    AttackConfig,
    Study,
    apply_overrides,
    chain_doc,
    defenses_for,
    load_study,
    parse_study,
    resolved,
)
from experiments.runner import Env, _check_resume, experiment_keys

CONFIGS = Path(__file__).resolve().parents[3] / "experiments" / "configs"
FLATTEN = "experiments.standins:Flatten"


def test_overrides_parse_values_as_yaml_and_reach_nested_keys_and_list_items():
    doc = {"name": "s", "tracks": {"lm": {"queries": 5}}, "defenses": [{"name": "a", "values": [1]}]}
    out = apply_overrides(doc, ["seeds=[0, 1]", "tracks.lm.queries=7", "tracks.reasoning.enabled=false",
                                "defenses.0.values=[0.5, 2]", "name=other"])
    assert out["seeds"] == [0, 1] and out["tracks"]["lm"]["queries"] == 7
    assert out["tracks"]["reasoning"] == {"enabled": False}
    assert out["defenses"][0]["values"] == [0.5, 2] and out["name"] == "other"
    assert doc["tracks"]["lm"]["queries"] == 5  # the input is not mutated


@pytest.mark.parametrize(("item", "match"), [
    ("seeds", "KEY=VALUE"),
    ("defenses.3.values=[1]", "out of range"),
    ("defenses.x.values=[1]", "must be an integer"),
    ("name.sub=1", "not a mapping"),
])
def test_bad_overrides_say_what_is_wrong(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides({"name": "s", "defenses": [{"name": "a"}]}, [item])


def test_unknown_keys_and_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"tracks\.classifier\.querys: unknown key .*did you mean 'queries'"):
        parse_study({"name": "s", "tracks": {"classifier": {"querys": 3}}})
    with pytest.raises(ConfigError, match=r"tracks\.lm: .*must fit in seq_len"):
        parse_study({"name": "s", "tracks": {"lm": {"gen_tokens": 200}}})
    with pytest.raises(ConfigError, match=r"api\.path: invalid value 'grpc'"):
        parse_study({"name": "s", "api": {"path": "grpc"}})
    with pytest.raises(ConfigError, match=r"tracks\.lm\.attacks\[0\]: repeats must be >= 1"):
        parse_study({"name": "s", "tracks": {"lm": {"attacks": [{"repeats": 0}]}}})
    with pytest.raises(ConfigError, match="defense names must be unique"):
        parse_study({"name": "s", "defenses": [{"name": "a", "type": FLATTEN}, {"name": "a", "type": FLATTEN}]})


def test_defense_entries_are_checked_through_the_registry_at_every_strength():
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.type: unknown defense type 'no_such'"):
        parse_study({"name": "s", "defenses": [{"name": "a", "type": "no_such"}]})
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.values: t must be > 0.*at t=-1"):
        parse_study({"name": "s", "defenses": [{"name": "f", "type": FLATTEN, "param": "t", "values": [2, -1]}]})
    with pytest.raises(ConfigError, match=r"defenses\[0\]: param 't' is swept but values is empty"):
        parse_study({"name": "s", "defenses": [{"name": "f", "type": FLATTEN, "param": "t"}]})
    with pytest.raises(ConfigError, match="not 'none'"):
        parse_study({"name": "s", "defenses": [{"name": "none", "type": FLATTEN}]})


def test_chain_doc_puts_the_study_chain_first_and_sets_the_swept_value():
    study = parse_study({"name": "s", "chain": [{"type": "request_rules", "params": {"max_top_logprobs": 20}}],
                         "defenses": [{"name": "f", "type": FLATTEN, "param": "t", "values": [3.0]}]})
    doc = chain_doc(study, study.defenses[0], 3.0)
    assert [d["type"] for d in doc["defenses"]] == ["request_rules", FLATTEN]
    assert doc["defenses"][1] == {"type": FLATTEN, "name": "f", "mode": "enforce", "params": {"t": 3.0}}
    assert chain_doc(study, None, None)["defenses"] == [{"type": "request_rules", "params": {"max_top_logprobs": 20}}]


def test_defenses_apply_to_the_tracks_their_kind_fits_unless_named():
    study = parse_study({"name": "s", "defenses": [
        {"name": "flat", "type": FLATTEN},  # response: classifier and lm
        {"name": "mix", "type": "experiments.standins:UniformMix"},  # sampling: lm and reasoning
        {"name": "cap", "type": "experiments.standins:RequestCap"},  # admission: everywhere
        {"name": "temp", "type": "sampling_temperature", "param": "t", "values": [1.0]},  # reasoning
        {"name": "only", "type": FLATTEN, "tracks": ["lm"]},
    ]})
    names = {t: [d.name for d in defenses_for(study, t)] for t in ("classifier", "lm", "reasoning", "budget")}
    assert names == {"classifier": ["flat", "cap"], "lm": ["flat", "mix", "cap", "only"],
                     "reasoning": ["mix", "cap", "temp"], "budget": ["cap"]}


def test_cells_put_the_baseline_first_for_every_seed_and_attack(tmp_path):
    study = parse_study({"name": "s", "seeds": [3, 4], "defenses": [
        {"name": "f", "type": FLATTEN, "param": "t", "values": [2.0, 4.0]}]})
    env = Env(study, tmp_path)
    cells = env.cells("classifier", (AttackConfig(), AttackConfig(name="avg", repeats=4)))
    labels = [(c.seed, c.attack.name, c.label) for c in cells]
    assert labels[:3] == [(3, "base", "none"), (3, "base", "f(t=2.0)"), (3, "base", "f(t=4.0)")]
    assert labels[3] == (3, "avg", "none") and len(cells) == 12
    assert cells[1].path(tmp_path) == tmp_path / "cells/classifier/base/f(t=2.0)/seed3.json"


def test_finished_cells_are_loaded_not_rerun(tmp_path):
    study = parse_study({"name": "s", "seeds": [0, 1]})
    env = Env(study, tmp_path)
    cells = env.cells("classifier", (AttackConfig(),))
    calls = []

    def fn(cell):
        calls.append(cell.seed)
        return {"x": cell.seed}

    first = env.run_cells("classifier", cells[:1], fn)
    again = env.run_cells("classifier", cells, fn)
    assert calls == [0, 1]  # seed 0 ran once; the second pass only ran seed 1
    assert [r["result"] for r in again] == [{"x": 0}, {"x": 1}] and first[0] == again[0]


def test_a_run_directory_resumes_only_the_same_config(tmp_path):
    study = parse_study({"name": "s"})
    assert _check_resume(tmp_path, study) is False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(resolved(study)))
    assert _check_resume(tmp_path, study) is True
    other = parse_study({"name": "s", "seeds": [5]})
    with pytest.raises(ConfigError, match=r"differs at: seeds"):
        _check_resume(tmp_path, other)


def test_experiment_keys_are_reproducible_and_private(tmp_path):
    a = experiment_keys(tmp_path / "a.yaml", 7)
    b = experiment_keys(tmp_path / "b.yaml", 7)
    c = experiment_keys(tmp_path / "c.yaml", 8)
    assert a.derive("x") == b.derive("x") != c.derive("x")
    assert (tmp_path / "a.yaml").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    study, _ = load_study(path, check_defenses=False)
    assert isinstance(study, Study) and study.enabled_tracks()
    if path.name != "smoke.yaml":
        assert len(study.seeds) >= 3, "standard configs run at least 3 seeds"
