"""The budget defense through the chain, with an injected clock: decisions, tiers, strength, bad input."""

from __future__ import annotations

import pytest
from conftest import sample

from defense.base import Deps
from defense.chain import DefenseChain
from defense.config import parse_config
from defense.errors import ConfigError, InvalidInput
from defense.metrics import Metrics
from defense.throttle import Budget, BudgetParams
from defense.types import Cost, Decision, Prompt, RequestContext, SettleStatus, Usage

LIMITS = {
    "rpm": {"unit": "requests", "amount": 5, "period_s": 60},
    "tpm": {"unit": "total_tokens", "amount": 1000, "period_s": 60},
    "lpd": {"unit": "logprob_values", "amount": 3000, "period_s": 86400, "window": "sliding_window"},
}


def chain_for(params: dict, clock, metrics, *, uri="memory://", extra=(), mode="enforce"):
    loaded = parse_config({"defenses": [*extra, {"type": "budget", "mode": mode, "params": params}]})
    return DefenseChain.from_config(loaded, deps=Deps(clock=clock, metrics=metrics, state_uri=uri))


@pytest.fixture
def make(clock, metrics):
    built = []

    def make(params=None, **kw):
        ch = chain_for({"limits": LIMITS} if params is None else params, clock, metrics, **kw)
        built.append(ch)
        return ch

    yield make
    for ch in built:
        ch.close()


def ctx(rid, client="c_a", **kw):
    kw.setdefault("prompt", Prompt(text=f"question number {rid} about something else entirely"))
    kw.setdefault("max_tokens", 100)
    kw.setdefault("prompt_tokens", 10)
    return RequestContext(request_id=rid, client_id=client, model="m", **kw)


def test_throttle_carries_retry_after_and_settle_frees_budget(make, clock):
    ch = make()
    for i in range(5):
        assert ch.admit(ctx(f"r{i}")).decision is Decision.ALLOW
    t = ch.admit(ctx("r5"))
    assert t.decision is Decision.THROTTLE and t.reason_code == "budget_exceeded" and t.decided_by == "budget"
    assert t.retry_after_s == pytest.approx(12.0, abs=0.01)  # 5 per minute: one every 12 s
    assert "rpm" in t.reason
    clock.advance(12.0)
    assert ch.admit(ctx("r6")).allowed
    # tokens: 9 reservations of ~110 tokens fill 1000; settling with actual use frees the rest
    ch2 = make({"limits": {"tpm": LIMITS["tpm"]}})
    admitted = [f"t{i}" for i in range(20) if ch2.admit(ctx(f"t{i}", client="c_t")).allowed]
    assert len(admitted) == 9
    for rid in admitted:
        assert ch2.settle(ctx(rid, client="c_t"), Usage(prompt_tokens=10, completion_tokens=10))
    assert ch2.admit(ctx("t-next", client="c_t")).allowed


def test_retry_admit_and_settle_are_idempotent(make):
    ch = make()
    a = ch.admit(ctx("same"))
    b = ch.admit(ctx("same"))
    assert a.reservation_id == b.reservation_id
    budget: Budget = ch.entries[0].defense
    st = budget.budget_status("c_a")
    assert {lim.name: lim.reserved for lim in st.limits}["rpm"] == 1
    assert ch.settle(ctx("same"), Usage(prompt_tokens=10, completion_tokens=5)) is True
    assert ch.settle(ctx("same"), Usage(prompt_tokens=10, completion_tokens=5)) is False
    # a replica that never saw the request (a fresh chain, same store) still charges once
    assert budget.store.settle("default\x1fc_a\x1fsame", budget._plan(ctx("same")), (1, 10, 5, 15, 0, 0),
                               0.0, 900.0) is False


def test_a_private_id_is_settled_once_through_the_chain(make, tmp_path):
    """An in-process front's id (private_id) leaves no marker in a sqlite store and no record in the chain's
    ledger; it is settled with its Admission, and a retried settle is still charged once."""
    import sqlite3

    ch = make(uri=f"sqlite:///{tmp_path}/s.db")
    budget: Budget = ch.entries[0].defense
    adms = {}
    for rid in ("p1", "p2"):
        adm = adms[rid] = ch.admit(ctx(rid, private_id=True))
        assert adm.allowed
        assert ch.settle(adm.ctx, Usage(prompt_tokens=10, completion_tokens=5), adm) is True
    assert ch.settle(adms["p1"].ctx, Usage(prompt_tokens=10, completion_tokens=5), adms["p1"]) is False
    with pytest.raises(ValueError, match="settle it with the Admission"):
        ch.settle(adms["p1"].ctx, Usage(prompt_tokens=10, completion_tokens=5))
    assert not ch.ledger.records
    used = {lim.name: lim.used for lim in budget.budget_status("c_a").limits}
    assert used["rpm"] == 2 and used["tpm"] == 30
    with sqlite3.connect(tmp_path / "s.db") as c:
        assert sum(c.execute(f"SELECT count(*) FROM dg_settled{i}").fetchone()[0] for i in (0, 1)) == 0


def test_tensor_apis_reserve_the_values_they_will_return(make):
    """A classifier front knows its output size: the values are reserved at admission, not only charged later."""
    ch = make()
    budget: Budget = ch.entries[0].defense
    probs = {"prompt": Prompt(tensor_bytes=b"\x00" * 256), "max_tokens": 0, "logprobs": True}
    assert ch.admit(ctx("k1", **probs, output_values=40)).allowed
    assert {lim.name: lim.reserved for lim in budget.budget_status("c_a").limits}["lpd"] == 40
    assert ch.estimate(ctx("k2", **probs)).logprob_values == 0  # unknown size: charged at settle only
    with pytest.raises(InvalidInput, match="output_values"):
        ctx("k3", output_values=-1)


def test_request_larger_than_a_limit_is_denied_not_throttled(make):
    ch = make()
    d = ch.admit(ctx("huge", max_tokens=5000))
    assert d.decision is Decision.DENY and d.reason_code == "budget_request_too_large" and d.retry_after_s == 0


def test_absurd_costs_and_usage(make, metrics):
    ch = make()
    with pytest.raises(InvalidInput, match="beyond any budget"):
        ch.admit(ctx("absurd", prompt_tokens=10**16))
    budget: Budget = ch.entries[0].defense
    ch.admit(ctx("ok"))
    budget.settle(ctx("ok"), Usage(completion_tokens=10**17))  # clamped and counted, no crash
    assert sample(metrics, "distillguard_budget_events_total", defense="budget", event="absurd_usage") == 1
    with pytest.raises(InvalidInput):
        Cost(prompt_tokens=-1)


def test_shadow_mode_counts_but_never_blocks(make, metrics):
    ch = make(mode="shadow")
    results = [ch.admit(ctx(f"s{i}")) for i in range(8)]
    assert all(r.allowed for r in results)
    assert [r.shadow for r in results] == [False] * 5 + [True] * 3
    assert sample(metrics, "distillguard_defense_decisions_total", defense="budget", decision="throttle",
                  mode="shadow") == 3
    for i in range(8):  # the shadow-throttled requests are charged what they used when they settle
        ch.settle(ctx(f"s{i}"), Usage(prompt_tokens=10, completion_tokens=10))
    st = ch.entries[0].defense.budget_status("c_a")
    assert {lim.name: lim.used + lim.reserved for lim in st.limits}["rpm"] == 8


def test_shadow_limit_counts_and_is_reported(make, metrics):
    ch = make({"limits": {"rpm": {**LIMITS["rpm"], "shadow": True}}})
    assert all(ch.admit(ctx(f"x{i}")).decision is Decision.ALLOW for i in range(7))
    assert sample(metrics, "distillguard_budget_events_total", defense="budget", event="shadow_limit_exceeded") == 2
    st = ch.entries[0].defense.budget_status("c_a")
    assert st.limits[0].shadow and st.limits[0].reserved == 7 and st.limits[0].remaining == 0


def test_another_defenses_refusal_releases_the_reservation(make):
    ch = make(extra=[{"type": "support.defenses:Recorder", "params": {"tag": "late", "decision": "deny"}}])
    # the recorder runs first here; put the budget first to see the release
    loaded = parse_config({"defenses": [{"type": "budget", "params": {"limits": LIMITS}},
                                        {"type": "support.defenses:Recorder", "params": {"decision": "deny"}}]})
    ch = DefenseChain.from_config(loaded, deps=Deps(clock=ch.clock, metrics=Metrics(), state_uri="memory://"))
    try:
        assert ch.admit(ctx("d1")).decision is Decision.DENY
        st = ch.entries[0].defense.budget_status("c_a")
        assert all(lim.used == 0 and lim.reserved == 0 for lim in st.limits)
    finally:
        ch.close()


def test_tiers_clients_tenants_labels_and_max_parallel(make, metrics):
    params = {
        "limits": LIMITS,
        "tiers": {"default": {"limits": ["rpm"]},
                  "pro": {"amounts": {"rpm": 50}, "max_parallel": 2},
                  "free": {"limits": ["rpm"], "amounts": {"rpm": 1}}},
        "clients": {"c_vip": "pro"}, "tenants": {"acme": "free"}, "tier_label": "plan",
    }
    ch = make(params)
    b: Budget = ch.entries[0].defense
    assert b.budget_status("c_vip").tier == "pro"
    assert b.budget_status("c_x", "acme").tier == "free"
    assert b.budget_status("c_x").tier == "default"
    assert [lim.name for lim in b.budget_status("c_vip").limits] == ["rpm", "tpm", "lpd", "max_parallel"]
    assert b.budget_status("c_vip").limits[0].limit == 50
    # max_parallel 2 for pro: the third in-flight request waits for a settle
    assert ch.admit(ctx("p1", client="c_vip")).allowed and ch.admit(ctx("p2", client="c_vip")).allowed
    third = ch.admit(ctx("p3", client="c_vip"))
    assert third.decision is Decision.THROTTLE and third.reason_code == "max_parallel" and third.retry_after_s == 1.0
    ch.settle(ctx("p1", client="c_vip"), Usage(completion_tokens=3, status=SettleStatus.CLIENT_ABORT))
    assert ch.admit(ctx("p4", client="c_vip")).allowed
    # a front's label picks a tier; an unknown one falls back to the default tier and is counted
    assert ch.admit(ctx("l1", client="c_l", labels={"plan": "pro"})).allowed
    assert b._plan(ctx("l1", client="c_l", labels={"plan": "pro"})).tier == "pro"
    assert b._plan(ctx("l2", client="c_l", labels={"plan": "platinum"})).tier == "default"
    assert sample(metrics, "distillguard_budget_events_total", defense="budget", event="unknown_tier") == 1


def test_model_filter_and_scopes(make):
    params = {"limits": {
        "big_model": {"unit": "requests", "amount": 1, "period_s": 60, "models": ["big"]},
        "tenant_rpm": {"unit": "requests", "amount": 3, "period_s": 60, "scope": "tenant"},
        "global_rpm": {"unit": "requests", "amount": 100, "period_s": 60, "scope": "global"},
    }}
    ch = make(params)
    assert ch.admit(RequestContext(request_id="a", client_id="c1", model="big")).allowed
    assert not ch.admit(RequestContext(request_id="b", client_id="c1", model="big")).allowed
    assert ch.admit(RequestContext(request_id="c", client_id="c1", model="small")).allowed
    # the tenant's third request from another client fills the tenant limit
    assert ch.admit(RequestContext(request_id="d", client_id="c2", model="small")).allowed
    t = ch.admit(RequestContext(request_id="e", client_id="c3", model="small"))
    assert t.decision is Decision.THROTTLE and "tenant_rpm" in t.reason
    assert ch.admit(RequestContext(request_id="f", client_id="c3", tenant="other", model="small")).allowed


def test_strength_rises_with_budget_use(make, clock):
    params = {"limits": {"tpd": {"unit": "total_tokens", "amount": 1000, "period_s": 86400}},
              "strength": {"usage": [[0.5, 1.0], [1.0, 3.0]], "suspicion": [[0.5, 1.0], [1.0, 2.0]]},
              "signals": {"enabled": False}}
    ch = make(params)
    strengths = [ch.admit(ctx(f"u{i}", max_tokens=90)).ctx.strength for i in range(9)]
    # 100 tokens each (10 prompt + 90): the multiplier starts past half the budget, 3x at all of it
    assert strengths[:5] == [1.0] * 5
    assert strengths[5:] == pytest.approx([1.4, 1.8, 2.2, 2.6])


def test_strength_rises_with_suspicion(make):
    ch = make({"limits": {}, "signals": {"min_requests": 5}})
    for i in range(12):  # the same prompt over and over, with logprobs: averaging
        a = ch.admit(ctx(f"same{i}", prompt=Prompt(text="repeat after me please now"), top_logprobs=5))
        ch.settle(ctx(f"same{i}"), Usage(prompt_tokens=6, completion_tokens=50, logprob_values=300))
    assert a.ctx.strength > 1.0
    st = ch.entries[0].defense.budget_status("c_a")
    assert st.flagged and st.suspicion_score >= 0.5 and st.signals["repeat"] > 0.9 and st.strength == a.ctx.strength


def test_reload_shares_the_store_and_the_signals(clock, metrics):
    a = chain_for({"limits": LIMITS}, clock, metrics)
    for i in range(3):
        a.admit(ctx(f"r{i}"))
    b = chain_for({"limits": LIMITS}, clock, metrics)  # the new config, built before the old one closes
    a.close()
    assert b.settle(ctx("r0"), Usage(prompt_tokens=5)) is True
    assert sum(b.admit(ctx(f"n{i}")).allowed for i in range(5)) == 2  # 3 held before the reload count
    b.close()


@pytest.mark.parametrize("params, words", [
    ({"limits": {"x": {"unit": "tokens", "amount": 1, "period_s": 1}}}, "valid: requests, prompt_tokens"),
    ({"limits": {"x": {"unit": "requests", "amount": 0, "period_s": 1}}}, "amount must be in 1.."),
    ({"limits": {"x": {"unit": "requests", "amount": 1, "period_s": -1}}}, "period_s must be in"),
    ({"limits": {"x y": {"unit": "requests", "amount": 1, "period_s": 1}}}, "limit name 'x y'"),
    ({"tiers": {"t": {"limits": ["nope"]}}}, "unknown limit 'nope'"),
    ({"clients": {"c": "gold"}}, "unknown tier 'gold'"),
    ({"limits": {"x": {"unit": "requests", "amount": 1, "period_s": 1, "scope": "tenant"}},
      "tiers": {"t": {"amounts": {"x": 5}}}}, "only client-scope limits"),
    ({"strength": {"usage": [[0.5, 2.0], [0.2, 3.0]]}}, "strictly increasing"),
    ({"strength": {"suspicion": [[0.5, 0.5]]}}, "must be finite and >= 1"),
    ({"signals": {"weights": {"vibes": 1.0}}}, "unknown signal weights"),
    ({"on_store_unavailable": "pray"}, "valid: local, refuse"),
    ({"lease_fraction": 0.9}, "lease_fraction must be in"),
])
def test_bad_params_fail_at_load_naming_the_field(params, words):
    with pytest.raises(ConfigError) as e:
        parse_config({"defenses": [{"type": "budget", "params": params}]})
    assert words in str(e.value) and "defenses[0].params" in str(e.value)


def test_params_direct_construction_validates():
    with pytest.raises(ValueError, match="fallback_share"):
        BudgetParams(fallback_share=0.0)
