from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import sample
from support import defenses as sd

from defense.base import Mode, OnError
from defense.chain import ChainEntry, DefenseChain
from defense.errors import DefenseFailure, InvalidInput
from defense.types import Decision, LogprobBatch, OutputKind, Prompt, RequestContext, SettleStatus, Usage


@pytest.fixture(autouse=True)
def _reset_calls():
    sd.CALLS.clear()


def rec(tag, *, mode=Mode.ENFORCE, on_error=OnError.FAIL_OPEN, **kw):
    return ChainEntry(tag, sd.Recorder(sd.RecorderParams(tag=tag, **kw)), mode, on_error)


def shift(tag, *, mode=Mode.ENFORCE, on_error=OnError.FAIL_OPEN, fail=False):
    return ChainEntry(tag, sd.Shift(sd.ShiftParams(tag=tag, fail=fail)), mode, on_error)


def ctx(rid="r1", **kw):
    kw.setdefault("client_id", "c1")
    kw.setdefault("prompt", Prompt(text="hello"))
    return RequestContext(request_id=rid, **kw)


def batch(k=3, positions=4):
    logits = np.random.default_rng(0).normal(size=(positions, 32))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-logp, 1)[:, :k]
    return LogprobBatch(values=np.take_along_axis(logp, top, 1).astype(np.float32), token_ids=top.astype(np.int64))


def test_admission_runs_in_config_order_and_later_defenses_see_rewrites(clock, metrics):
    chain = DefenseChain([rec("a", cap_top_logprobs=5), rec("b", cap_top_logprobs=2), rec("c")],
                         metrics=metrics, clock=clock)
    adm = chain.admit(ctx(top_logprobs=10))
    assert [t for t, _ in sd.CALLS] == ["a", "b", "c"]
    assert sd.CALLS[1] == ("b", "admit top_logprobs=5")  # b saw a's clamp
    assert sd.CALLS[2] == ("c", "admit top_logprobs=2")
    assert adm.decision is Decision.ALLOW_MODIFIED
    assert adm.rewrites.top_logprobs == 2 and adm.ctx.top_logprobs == 2
    assert [s.defense for s in adm.steps] == ["a", "b", "c"]


def test_first_enforced_refusal_decides_and_releases_earlier_reservations(clock, metrics):
    chain = DefenseChain([rec("a"), rec("b", decision="throttle"), rec("c")], metrics=metrics, clock=clock)
    adm = chain.admit(ctx())
    assert adm.decision is Decision.THROTTLE and adm.decided_by == "b" and adm.retry_after_s == 1.5
    assert ("c", "admit top_logprobs=0") not in sd.CALLS  # c never ran
    assert ("a", "settle refused 0") in sd.CALLS  # a's reservation released
    assert not any(t == "b" and e.startswith("settle") for t, e in sd.CALLS)
    assert sample(metrics, "distillguard_requests_total", decision="throttle", shadow="false") == 1


def test_shadow_refusal_is_counted_and_changes_nothing(clock, metrics):
    chain = DefenseChain([rec("a", mode=Mode.SHADOW, decision="deny"), rec("b", mode=Mode.SHADOW, cap_top_logprobs=1)],
                         metrics=metrics, clock=clock)
    adm = chain.admit(ctx(top_logprobs=4))
    assert adm.decision is Decision.ALLOW and adm.shadow
    assert adm.ctx.top_logprobs == 4 and adm.rewrites.empty
    assert sample(metrics, "distillguard_shadow_effects_total", defense="a", stage="admit") == 1
    assert sample(metrics, "distillguard_shadow_effects_total", defense="b", stage="admit") == 1
    assert sample(metrics, "distillguard_defense_decisions_total", defense="a", decision="deny", mode="shadow") == 1


def test_shadow_response_defense_computes_but_returns_input(clock, metrics):
    chain = DefenseChain([shift("s", mode=Mode.SHADOW)], metrics=metrics, clock=clock)
    b = batch()
    out = chain.protect(b, ctx())
    assert ("s", "apply") in sd.CALLS
    assert out.batch is b and out.applied == ()
    assert sample(metrics, "distillguard_shadow_effects_total", defense="s", stage="protect") == 1


def test_enforced_response_defense_changes_output_and_counts(clock, metrics):
    chain = DefenseChain([shift("s")], metrics=metrics, clock=clock)
    b = batch()
    before = b.values.copy()
    out = chain.protect(b, ctx())
    assert out.applied == ("s",)
    assert not np.array_equal(out.batch.values, b.values)
    np.testing.assert_array_equal(b.values, before)  # the input was not mutated
    assert sample(metrics, "distillguard_response_values_changed_total", defense="s") == 8


def test_off_mode_is_never_called(clock, metrics):
    chain = DefenseChain([rec("a", mode=Mode.OFF, decision="deny"), shift("s", mode=Mode.OFF)],
                         metrics=metrics, clock=clock)
    assert chain.admit(ctx()).decision is Decision.ALLOW
    chain.protect(batch(), ctx())
    assert sd.CALLS == []


def test_fail_open_passes_and_counts(clock, metrics, caplog):
    chain = DefenseChain([rec("a", decision="raise"), rec("b"), shift("s", fail=True)], metrics=metrics, clock=clock)
    with caplog.at_level(logging.WARNING, logger="distillguard.chain"):
        adm = chain.admit(ctx())
        b = batch()
        out = chain.protect(b, ctx())
    assert adm.decision is Decision.ALLOW and adm.steps[0].error == "RuntimeError"
    assert out.batch is b
    assert sample(metrics, "distillguard_defense_errors_total", defense="a", stage="admit", policy="fail_open") == 1
    assert sample(metrics, "distillguard_defense_errors_total", defense="s", stage="protect", policy="fail_open") == 1
    assert "RuntimeError" in caplog.text and "recorder asked to fail" not in caplog.text


def test_fail_closed_refuses_with_an_error_and_releases(clock, metrics):
    chain = DefenseChain([rec("a"), rec("b", decision="raise", on_error=OnError.FAIL_CLOSED)],
                         metrics=metrics, clock=clock)
    with pytest.raises(DefenseFailure, match="'b' failed during admit"):
        chain.admit(ctx())
    assert ("a", "settle refused 0") in sd.CALLS
    chain2 = DefenseChain([shift("s", fail=True, on_error=OnError.FAIL_CLOSED)], metrics=metrics, clock=clock)
    with pytest.raises(DefenseFailure):
        chain2.protect(batch(), ctx())
    assert sample(metrics, "distillguard_defense_errors_total", defense="s", stage="protect", policy="fail_closed") == 1


def test_fail_closed_in_shadow_mode_fails_open(clock, metrics):
    chain = DefenseChain([rec("a", decision="raise", mode=Mode.SHADOW, on_error=OnError.FAIL_CLOSED)],
                         metrics=metrics, clock=clock)
    assert chain.admit(ctx()).decision is Decision.ALLOW


def test_admit_and_settle_are_idempotent_on_request_id(clock, metrics):
    chain = DefenseChain([rec("a")], metrics=metrics, clock=clock)
    first = chain.admit(ctx("rid-7", top_logprobs=2))
    again = chain.admit(ctx("rid-7", top_logprobs=2))
    assert first.reservation_id.startswith("rsv_")
    assert (again.decision, again.reservation_id, again.rewrites, again.ctx.context_digest) == (
        first.decision, first.reservation_id, first.rewrites, first.ctx.context_digest)
    # the ledger remembers the decision, not the prompt (memory and GC work for 100k remembered requests)
    assert first.ctx.prompt.text == "hello" and again.ctx.prompt == Prompt()
    assert sum(1 for t, e in sd.CALLS if e.startswith("admit")) == 1
    assert chain.settle(ctx("rid-7"), Usage(completion_tokens=5)) is True
    assert chain.settle(ctx("rid-7"), Usage(completion_tokens=5)) is False
    assert [e for _, e in sd.CALLS if e.startswith("settle")] == ["settle ok 5"]
    # another client with the same request id is a different request
    other = chain.admit(ctx("rid-7", client_id="c2"))
    assert other.reservation_id != first.reservation_id


def test_early_ending_request_still_settles(clock, metrics):
    chain = DefenseChain([rec("a")], metrics=metrics, clock=clock)
    chain.admit(ctx("r9"))
    chain.settle(ctx("r9"), Usage(completion_tokens=2, status=SettleStatus.CLIENT_ABORT))
    assert ("a", "settle client_abort 2") in sd.CALLS


def test_strength_is_the_max_asked_by_enforced_defenses(clock, metrics):
    chain = DefenseChain([rec("a", strength=1.5), rec("b", strength=3.0, mode=Mode.SHADOW), rec("c", strength=2.0)],
                         metrics=metrics, clock=clock)
    assert chain.admit(ctx()).ctx.strength == 2.0


def test_context_digest_is_filled_and_canonical(clock, metrics):
    chain = DefenseChain([], metrics=metrics, clock=clock)
    a = chain.admit(ctx("x1", prompt=Prompt(text="Hello   World"), model="m"))
    b = chain.admit(ctx("x2", prompt=Prompt(text=" hello world\n"), model="m"))
    c = chain.admit(ctx("x3", prompt=Prompt(text="hello world!"), model="m"))
    assert len(a.ctx.context_digest) == 32
    assert a.ctx.context_digest == b.ctx.context_digest != c.ctx.context_digest


@pytest.mark.parametrize("values, kind, match", [
    ([[np.nan, -1.0]], OutputKind.TOP_LOGPROBS, "NaN"),
    ([[0.5, -1.0]], OutputKind.TOP_LOGPROBS, "<= 0"),
    ([[-0.1, -0.2]], OutputKind.TOP_LOGPROBS, "sum to"),
    ([[0.5, 0.6]], OutputKind.PROBABILITIES, "sum to 1"),
    ([[-0.1, 1.1]], OutputKind.PROBABILITIES, ">= 0"),
    ([[np.inf, 0.0]], OutputKind.PROBABILITIES, "NaN or infinity"),
])
def test_protect_refuses_impossible_outputs(clock, metrics, values, kind, match):
    chain = DefenseChain([shift("s")], metrics=metrics, clock=clock)
    v = np.array(values, dtype=np.float32)
    b = LogprobBatch(values=v, token_ids=np.array([[1, 2]]), kind=kind)
    with pytest.raises(InvalidInput, match=match):
        chain.protect(b, ctx())


def test_repeated_token_ids_are_invalid_input(clock, metrics):
    chain = DefenseChain([shift("s")], metrics=metrics, clock=clock)
    b = LogprobBatch(values=np.log(np.array([[0.2, 0.1, 0.1], [0.5, 0.2, 0.1]], np.float32)),
                     token_ids=np.array([[4, 7, -1], [3, 9, 3]]))
    with pytest.raises(InvalidInput, match="position 1 lists token id 3 more than once"):
        chain.protect(b, ctx())
    ok = LogprobBatch(values=b.values, token_ids=np.array([[4, -1, -1], [3, 9, 2]]))
    chain.protect(ok, ctx())  # several missing slots are not repeats


def test_mismatched_shapes_are_invalid_input():
    with pytest.raises(InvalidInput, match="does not match"):
        LogprobBatch(values=np.zeros((2, 3), np.float32), token_ids=np.zeros((2, 4), np.int64))


def test_close_closes_every_defense_even_if_one_raises(clock, metrics):
    closed = []

    class C(sd.Recorder):
        def close(self):
            closed.append(self.params.tag)
            if self.params.tag == "a":
                raise RuntimeError("boom")

    chain = DefenseChain([ChainEntry("a", C(sd.RecorderParams(tag="a"))), ChainEntry("b", C(sd.RecorderParams(tag="b")))],
                         metrics=metrics, clock=clock)
    chain.close()
    chain.close()
    assert closed == ["a", "b"]


def test_request_context_keeps_dataclass_semantics_with_its_fast_init():
    import dataclasses

    import pytest

    from defense.errors import InvalidInput
    from defense.types import RequestContext

    c = RequestContext("r1", "c1")
    assert c.tenant == "default" and c.labels == {} and c.output_values is None and c.strength == 1.0
    assert set(vars(c)) == {f.name for f in dataclasses.fields(RequestContext)}
    assert RequestContext(request_id="r1", client_id="c1") == c
    assert RequestContext("r1", "c1", top_logprobs=3).logprobs is True  # __post_init__ still runs
    with pytest.raises(InvalidInput, match="request_id"):
        RequestContext("", "c1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.client_id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        RequestContext("r1")  # client_id is required
    assert dataclasses.replace(c, tenant="t2").tenant == "t2"


def _admit_metrics(metrics):
    names = [("distillguard_requests_total", {"decision": "allow_modified", "shadow": "true"}),
             ("distillguard_defense_decisions_total", {"defense": "a", "decision": "allow_modified",
                                                       "mode": "enforce"}),
             ("distillguard_defense_decisions_total", {"defense": "b", "decision": "deny", "mode": "shadow"}),
             ("distillguard_defense_duration_seconds_count", {"defense": "a", "stage": "admit"}),
             ("distillguard_defense_duration_seconds_count", {"defense": "b", "stage": "admit"})]
    rewrites = [s.labels for f in metrics.registry.collect() if f.name == "distillguard_rewrites"
                for s in f.samples if s.name.endswith("_total") and s.value]
    return [sample(metrics, n, **labels) for n, labels in names], rewrites


def test_deferred_bookkeeping_counts_and_remembers_the_same_only_later(clock):
    from defense.metrics import Metrics

    def run(bookkeeping):
        metrics = Metrics()
        chain = DefenseChain([rec("a", cap_top_logprobs=2), rec("b", mode=Mode.SHADOW, decision="deny")],
                             metrics=metrics, clock=clock, bookkeeping=bookkeeping)
        adm = chain.admit(ctx("rid-1", top_logprobs=5))
        return metrics, chain, adm

    inline, chain_i, adm_i = run(None)
    queued: list = []
    later, chain_d, adm_d = run(queued.append)
    assert (adm_d.decision, adm_d.rewrites, adm_d.reservation_id) == (adm_i.decision, adm_i.rewrites,
                                                                      adm_i.reservation_id)
    assert len(queued) == 1 and not chain_d.ledger.records
    assert _admit_metrics(later)[0] == [0.0] * 5
    queued.pop()()
    assert _admit_metrics(later) == _admit_metrics(inline)
    assert _admit_metrics(inline)[0] == [1.0] * 5 and _admit_metrics(inline)[1]  # the clamp is counted
    assert chain_d.admit(ctx("rid-1", top_logprobs=5)).reservation_id == adm_i.reservation_id  # remembered
    assert sum(1 for t, e in sd.CALLS if t == "a" and e.startswith("admit")) == 2  # once per chain


def test_soon_runs_on_the_loops_next_turn_or_at_once_without_a_loop():
    import asyncio

    from defense.deferred import soon

    ran: list[str] = []
    soon(lambda: ran.append("no loop"))
    assert ran == ["no loop"]

    async def go():
        soon(lambda: ran.append("later"))
        ran.append("first")
        await asyncio.sleep(0)
        return list(ran)

    assert asyncio.run(go()) == ["no loop", "first", "later"]


def test_deferred_protect_bookkeeping_counts_the_same_only_later(clock):
    from defense.metrics import Metrics

    def counts(metrics):
        return [sample(metrics, "distillguard_response_values_changed_total", defense="s"),
                sample(metrics, "distillguard_shadow_effects_total", defense="w", stage="protect"),
                sample(metrics, "distillguard_defense_duration_seconds_count", defense="s", stage="protect"),
                sample(metrics, "distillguard_defense_duration_seconds_count", defense="w", stage="protect")]

    def run(bookkeeping):
        metrics = Metrics()
        chain = DefenseChain([shift("s"), shift("w", mode=Mode.SHADOW)], metrics=metrics, clock=clock,
                             bookkeeping=bookkeeping)
        return metrics, chain.protect(batch(), ctx())

    inline, out_i = run(None)
    queued: list = []
    later, out_d = run(queued.append)
    assert out_d.applied == out_i.applied == ("s",)
    np.testing.assert_array_equal(out_d.batch.values, out_i.batch.values)
    assert len(queued) == 1 and counts(later) == [0.0] * 4
    queued.pop()()
    assert counts(later) == counts(inline) == [8.0, 1.0, 1.0, 1.0]


def test_settle_skips_stateless_admission_defenses_and_counts_once(clock, metrics):
    """A defense without a settle of its own (request rules) is not called or timed at settle; one with it is,
    and a retried settle is counted as a duplicate."""
    from defense.rules import RequestRules

    chain = DefenseChain([ChainEntry("rules", RequestRules(), Mode.ENFORCE, OnError.FAIL_OPEN), rec("a")],
                         metrics=metrics, clock=clock)
    chain.admit(ctx("s1"))
    assert chain.settle(ctx("s1"), Usage(completion_tokens=3)) is True
    assert chain.settle(ctx("s1"), Usage(completion_tokens=3)) is False
    assert [c for t, c in sd.CALLS if t == "a"] == ["admit top_logprobs=0", "settle ok 3"]
    seconds = "distillguard_defense_duration_seconds_count"
    assert sample(metrics, seconds, defense="a", stage="settle") == 1
    assert not sample(metrics, seconds, defense="rules", stage="settle")
    assert sample(metrics, "distillguard_settles_total", status="ok", duplicate="false") == 1
    assert sample(metrics, "distillguard_settles_total", status="ok", duplicate="true") == 1


def test_with_values_keeps_every_other_field():
    import dataclasses

    from defense.types import LogprobsMode

    b = LogprobBatch(values=np.log(np.full((2, 3), 0.2, dtype=np.float32)), token_ids=np.arange(6).reshape(2, 3),
                     kind=OutputKind.TOP_LOGPROBS, sampled_token_ids=np.array([0, 4]),
                     sampled_values=np.array([-1.0, -2.0], dtype=np.float32), temperature=0.7,
                     logprobs_mode=LogprobsMode.PROCESSED, position_offset=5)
    new_values, new_sampled = b.values - 0.5, np.array([-1.5, -2.5], dtype=np.float32)
    out = b.with_values(new_values, new_sampled)
    for f in dataclasses.fields(LogprobBatch):  # a field added later must be carried too
        want = {"values": new_values, "sampled_values": new_sampled}.get(f.name, getattr(b, f.name))
        assert getattr(out, f.name) is want, f.name
    with pytest.raises(ValueError, match="shape"):
        b.with_values(new_values[:1], None)


@pytest.mark.parametrize("kind", [OutputKind.TOP_LOGPROBS, OutputKind.PROBABILITIES])
def test_shaped_batch_is_the_validated_one(kind):
    import dataclasses

    values = np.full((2, 3), 1 / 3, dtype=np.float32)
    ids = np.arange(6).reshape(2, 3) if kind is OutputKind.TOP_LOGPROBS else np.empty((2, 0), dtype=np.int64)
    want, got = LogprobBatch(values=values, token_ids=ids, kind=kind), LogprobBatch.shaped(values, ids, kind)
    for f in dataclasses.fields(LogprobBatch):  # a field added later must get its default here too
        assert getattr(got, f.name) is getattr(want, f.name) or getattr(got, f.name) == getattr(want, f.name), f.name


def test_prime_asks_live_response_defenses_in_order_and_leaves_errors_to_protect(clock, metrics):
    chain = DefenseChain([rec("a"), shift("s1"), shift("off", mode=Mode.OFF),
                          shift("s2", fail=True, on_error=OnError.FAIL_CLOSED)], metrics=metrics, clock=clock)
    chain.prime(ctx())  # s2's failure is not raised here, nor counted
    assert sd.CALLS == [("s1", "prime"), ("s2", "prime")]
    assert sample(metrics, "distillguard_defense_errors_total", defense="s2", stage="protect", policy="fail_closed") == 0
    with pytest.raises(DefenseFailure):  # protect meets it again, under the defense's policy
        chain.protect(batch(), ctx())
    assert sample(metrics, "distillguard_defense_errors_total", defense="s2", stage="protect", policy="fail_closed") == 1


_DENSE_KEYS = []


def _dense_chain(metrics, clock, *, bookkeeping=None, fail_policy=None):
    from defense.base import Deps
    from defense.keys import KeyRing
    from defense.perturbation.keyed import KeyedNoise, KeyedNoiseParams
    from defense.perturbation.quantize import Quantize, QuantizeParams

    if not _DENSE_KEYS:
        _DENSE_KEYS.append(KeyRing.generate())  # one key for every chain: the same noise
    keys = _DENSE_KEYS[0]
    entries = [
        ChainEntry("noise", KeyedNoise(KeyedNoiseParams(sigma=0.7), deps=Deps(keys=keys)), Mode.ENFORCE,
                   OnError.FAIL_OPEN),
        ChainEntry("watch", KeyedNoise(KeyedNoiseParams(sigma=2.0), deps=Deps(keys=keys)), Mode.SHADOW,
                   OnError.FAIL_OPEN),
        ChainEntry("steps", Quantize(QuantizeParams(step=0.05)), Mode.ENFORCE, OnError.FAIL_OPEN),  # no dense path
    ]
    if fail_policy is not None:
        entries.insert(1, shift("boom", fail=True, on_error=fail_policy))
    return DefenseChain(entries, metrics=metrics, clock=clock, bookkeeping=bookkeeping)


def _dense_metrics(metrics):
    return [sample(metrics, "distillguard_response_values_changed_total", defense=d) for d in ("noise", "steps")] + [
        sample(metrics, "distillguard_shadow_effects_total", defense="watch", stage="protect"),
        *(sample(metrics, "distillguard_defense_duration_seconds_count", defense=d, stage="protect")
          for d in ("noise", "watch", "steps", "boom")),
        sample(metrics, "distillguard_defense_errors_total", defense="boom", stage="protect", policy="fail_open")]


@pytest.mark.parametrize("fail_policy", [None, OnError.FAIL_OPEN])
def test_protect_dense_gives_protects_values_and_metrics(clock, fail_policy):
    """The values-only Protect for dense probability vectors is protect() without the batch: the same values
    bit for bit (a defense with a dense path, one in shadow, one without, one that fails open), the same
    counts, times and errors."""
    from defense.metrics import Metrics

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(10), size=3).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    c = ctx(model="m", prompt=Prompt(tensor_bytes=probs.tobytes()))
    m_batch, m_dense = Metrics(), Metrics()
    want = _dense_chain(m_batch, clock, fail_policy=fail_policy).protect(
        LogprobBatch(values=probs.copy(), token_ids=np.empty((3, 0), np.int64), kind=OutputKind.PROBABILITIES), c)
    got = _dense_chain(m_dense, clock, fail_policy=fail_policy).protect_dense(probs.copy(), c)
    assert want.applied == ("noise", "steps")
    assert got.dtype == np.float32 and got.shape == probs.shape
    np.testing.assert_array_equal(got, want.batch.values)
    assert not np.array_equal(got, probs)
    assert _dense_metrics(m_dense) == _dense_metrics(m_batch)
    assert _dense_metrics(m_dense)[2:6] == [1.0, 1.0, 1.0, 1.0]  # the shadow's effect; each defense timed


def test_protect_dense_checks_values_and_fails_closed_like_protect(clock, metrics):
    chain = _dense_chain(metrics, clock)
    for bad, match in (([[np.nan, 1.0]], "NaN or infinity"), ([[-0.1, 1.1]], ">= 0"), ([[0.5, 0.6]], "sum to 1")):
        with pytest.raises(InvalidInput, match=match):
            chain.protect_dense(np.array(bad, np.float32), ctx(model="m"))
    closed = _dense_chain(metrics, clock, fail_policy=OnError.FAIL_CLOSED)
    with pytest.raises(DefenseFailure, match="boom"):
        closed.protect_dense(np.array([[0.25, 0.75]], np.float32), ctx(model="m"))
    assert sample(metrics, "distillguard_defense_errors_total", defense="boom", stage="protect",
                  policy="fail_closed") == 1.0


def test_protect_dense_bookkeeping_waits_like_protects(clock):
    from defense.metrics import Metrics

    queued: list = []
    metrics = Metrics()
    _dense_chain(metrics, clock, bookkeeping=queued.append).protect_dense(np.array([[0.25, 0.75]], np.float32),
                                                                       ctx(model="m"))
    assert len(queued) == 1 and sum(_dense_metrics(metrics)) == 0.0
    queued.pop()()
    assert _dense_metrics(metrics)[3] == 1.0
