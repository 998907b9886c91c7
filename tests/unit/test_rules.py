"""Request rules: caps, refusals and strips, per tier, shrinking with the profile's strength."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from defense.base import Deps
from defense.chain import DefenseChain
from defense.config import parse_config
from defense.rules import RequestRules, RequestRulesParams, TierRules
from defense.types import Cost, Decision, RequestContext


def ctx(**kw) -> RequestContext:
    return RequestContext(request_id="r", client_id="c", **kw)


def verdict(params: RequestRulesParams | None = None, **kw):
    return RequestRules(params).admit(ctx(**kw), Cost())


def test_safe_defaults():
    assert verdict(top_logprobs=3).decision is Decision.ALLOW
    v = verdict(top_logprobs=20)
    assert v.rewrites.top_logprobs == 5
    assert verdict(top_logprobs=-1).reason_code == "top_logprobs_all"
    v = verdict(top_logprobs=2, logit_bias_entries=4, prompt_logprobs=True, echo=True, raw_logits_outputs=("logits",))
    rw = v.rewrites
    assert rw.drop_logit_bias and rw.drop_prompt_logprobs and rw.drop_echo and rw.strip_outputs == ("logits",)
    # logit_bias without logprobs is an ordinary request
    assert verdict(logit_bias_entries=4).decision is Decision.ALLOW


@pytest.mark.parametrize(("field", "kw", "code"), [
    ("logit_bias_with_logprobs", {"logprobs": True, "logit_bias_entries": 1}, "logit_bias_with_logprobs"),
    ("prompt_logprobs", {"prompt_logprobs": True}, "prompt_logprobs"),
    ("echo_with_logprobs", {"echo": True, "logprobs": True}, "echo_with_logprobs"),
    ("raw_logits_outputs", {"raw_logits_outputs": ("logits",)}, "raw_logits_outputs"),
])
def test_deny_actions(field, kw, code):
    v = verdict(RequestRulesParams(**{field: "deny"}), **kw)
    assert v.decision is Decision.DENY and v.reason_code == code and v.reason
    assert verdict(RequestRulesParams(**{field: "allow"}), **kw).rewrites.empty


def test_over_cap_deny_and_request_caps():
    p = RequestRulesParams(over_cap="deny", max_n=2, max_tokens=100)
    assert verdict(p, top_logprobs=6).reason_code == "top_logprobs_over_cap"
    rw = verdict(p, n=4, max_tokens=500).rewrites
    assert rw.n == 2 and rw.max_tokens == 100
    assert verdict(p).rewrites.max_tokens == 100  # no max_tokens given: the cap is the reservation


def test_tiers_pick_their_caps_by_label():
    p = RequestRulesParams(tiers=MappingProxyType({"free": TierRules(max_top_logprobs=0, max_tokens=64),
                                                   "pro": TierRules(max_top_logprobs=20)}))
    assert verdict(p, top_logprobs=5, labels={"tier": "free"}).rewrites.top_logprobs == 0
    assert verdict(p, labels={"tier": "free"}).rewrites.max_tokens == 64
    assert verdict(p, top_logprobs=20, labels={"tier": "pro"}).decision is Decision.ALLOW
    assert verdict(p, top_logprobs=20, labels={"tier": "unknown"}).rewrites.top_logprobs == 5


def test_strength_shrinks_the_cap_and_never_denies_for_it():
    assert verdict(top_logprobs=5, strength=2.0).rewrites.top_logprobs == 2
    assert verdict(top_logprobs=5, strength=100.0).rewrites.top_logprobs == 1
    deny_over = RequestRulesParams(over_cap="deny")
    assert verdict(deny_over, top_logprobs=5, strength=4.0).rewrites.top_logprobs == 1
    assert verdict(RequestRulesParams(shrink_with_strength=False), top_logprobs=5, strength=4.0).decision is Decision.ALLOW


def test_strength_raised_earlier_in_the_chain_reaches_the_rules():
    loaded = parse_config({"version": 1, "defenses": [
        {"type": "support.defenses:Recorder", "params": {"strength": 2.5}},
        {"type": "request_rules"},
    ]})
    chain = DefenseChain.from_config(loaded, deps=Deps())
    adm = chain.admit(ctx(top_logprobs=5))
    assert adm.rewrites.top_logprobs == 2 and adm.ctx.strength == 2.5


def test_tier_config_from_yaml_is_validated():
    loaded = parse_config({"version": 1, "defenses": [
        {"type": "request_rules", "params": {"tiers": {"free": {"max_top_logprobs": 0}}}}]})
    assert loaded.defenses[0].params.tiers["free"].max_top_logprobs == 0
    from defense.errors import ConfigError

    with pytest.raises(ConfigError, match="max_top_logprobs must be in 0..1000"):
        parse_config({"version": 1, "defenses": [
            {"type": "request_rules", "params": {"tiers": {"free": {"max_top_logprobs": -2}}}}]})
    with pytest.raises(ConfigError, match="max_top_logprob"):
        parse_config({"version": 1, "defenses": [
            {"type": "request_rules", "params": {"tiers": {"free": {"max_top_logprob": 2}}}}]})
