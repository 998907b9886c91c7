"""The KServe proxy's YAML: strict keys, output lists that cannot overlap, the example parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from defense.errors import ConfigError
from server_plugins.kserve.settings import ModelSpec, load_settings, parse_settings

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "kserve.yaml"
MODELS = {"mlp": {"probabilities": ["probs"], "strip": ["logits"]}}


def test_the_example_parses():
    s = load_settings(EXAMPLE)
    spec = s.models["mlp"]
    assert spec.protected == {"probs", "logprobs"} and spec.returned == {"probs", "logprobs", "label"}
    assert spec.strip == ("logits",) and spec.batched


@pytest.mark.parametrize(("doc", "message"), [
    ({"models": MODELS, "listne": ["127.0.0.1:1"]}, "unknown key 'listne' at the top level (did you mean 'listen'?)"),
    ({"models": {"mlp": {"probabilites": ["p"]}}}, "did you mean 'probabilities'"),
    ({"models": {"mlp": {"probabilities": ["p"], "strip": ["p"]}}}, "'p' is listed under both probabilities and strip"),
    ({}, "models must declare at least one model"),
    ({"models": MODELS, "forward_metadata": ["Authorization"]}, "must not include authorization"),
    ({"models": MODELS, "max_input_bytes": 4096, "max_message_bytes": 4096}, "must be larger than max_input_bytes"),
    ({"models": MODELS, "listen": ["localhost"]}, "must be 'unix:/path.sock' or 'host:port'"),
    ({"models": MODELS, "upstream_timeout_s": 0}, "upstream_timeout_s must be in (0, 3600]"),
    ({"models": {"mlp": {"batched": "yes"}}}, "must be true or false"),
])
def test_bad_settings_name_the_field(doc, message):
    with pytest.raises(ConfigError) as ei:
        parse_settings(doc)
    assert message in str(ei.value)


def test_a_bad_file_names_itself_and_the_field(tmp_path):
    p = tmp_path / "kserve.yaml"
    p.write_text("models: {mlp: {strip: [logits]}}\nupstream_timeout_s: -1\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    assert str(p) in str(ei.value) and "upstream_timeout_s" in str(ei.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_empty_output_names_are_refused():
    with pytest.raises(ValueError, match="empty output name"):
        ModelSpec(passthrough=("",))
