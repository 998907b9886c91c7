"""The vLLM plugin's core without vLLM: batch bookkeeping, prefixes, profiles, loading, the step."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.vllm_defenses import StepDefense, StepParams
from support.vllm_harness import signed_args, write_config, write_keys

from defense.base import Deps
from defense.chain import ChainEntry, DefenseChain
from defense.clock import FakeClock
from defense.errors import KeyFileError
from defense.keys import KeyRing
from defense.profile import DEFAULT_PROFILE, Profile
from server_plugins.vllm.batch import BatchSlots, RowState, TokenView
from server_plugins.vllm.core import EngineDefense, EngineShare, engine_share, served_model_name
from server_plugins.vllm.xargs import ProfileReader, ProfileSource, engine_args, strip_client_args

# -- TokenView ---------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 99), max_size=6), st.lists(st.integers(0, 99), max_size=6),
       st.integers(-8, 8), st.integers(-8, 8) | st.none(), st.sampled_from([1, 2, -1]))
def test_token_view_reads_like_the_concatenation(prompt, output, start, stop, step):
    view, whole = TokenView(prompt, output), prompt + output
    assert len(view) == len(whole) and list(view) == whole
    assert view[start:stop:step] == whole[start:stop:step]
    for i in range(-len(whole), len(whole)):
        assert view[i] == whole[i]
    with pytest.raises(IndexError):
        view[len(whole)]


def test_token_view_sees_tokens_appended_to_the_live_output():
    output: list[int] = []
    view = TokenView(None, output)  # vLLM gives no prompt ids for prompt embeddings
    assert len(view) == 0 and view[-3:] == []
    output += [4, 5]
    assert view[-1:] == [5] and len(view) == 2


# -- BatchSlots --------------------------------------------------------------------------------------


def _row(name: str) -> RowState:
    from defense.types import RequestContext

    return RowState(RequestContext(request_id=name, client_id=""), prefix=(len(name),))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_batch_slots_follow_vllm_v1_updates(data):
    """Random V1-style updates (removed, then added into holes or at the end, then condensing moves and
    swaps) keep every index's request where a plain dict model says it is."""
    slots, model, size, n = BatchSlots(), {}, 0, 0
    for _ in range(data.draw(st.integers(1, 8))):
        removed = data.draw(st.lists(st.sampled_from(sorted(model)), unique=True)) if model else []
        for i in removed:
            slots.remove(i)
            del model[i]
        for _ in range(data.draw(st.integers(0, 3))):
            holes = [i for i in range(size) if i not in model]
            index = holes[0] if holes else size
            size = max(size, index + 1)
            slots.put(index, _row(f"r{n}"))
            model[index] = f"r{n}"
            n += 1
        # condense: move the last requests into holes, as vLLM does before each step
        while True:
            holes = [i for i in range(size) if i not in model]
            if not holes or max(model, default=-1) < holes[0]:
                break
            last = max(model)
            slots.move(last, holes[0])
            model[holes[0]] = model.pop(last)
        size = len(model)
        if size >= 2 and data.draw(st.booleans()):
            a, b = data.draw(st.sampled_from([(i, j) for i in range(size) for j in range(size) if i < j]))
            slots.swap(a, b)
            model[a], model[b] = model[b], model[a]
        slots.resize(size)
        view = slots.view(None, device="cpu")
        assert [c.request_id for c in view.ctxs] == [model[i] for i in range(size)]
        assert [p[0] for p in view.prefixes] == [len(model[i]) for i in range(size)]


def test_view_is_cached_until_the_batch_or_the_order_changes():
    slots = BatchSlots()
    for i in range(3):
        slots.put(i, _row(f"r{i}"))
    slots.resize(3)
    v1 = slots.view(None, device="cpu")
    assert slots.view(None, device="cpu") is v1  # a decode step that only appended tokens: no rebuild
    slots.swap(0, 2)
    v2 = slots.view(None, device="cpu")
    assert v2 is not v1 and [c.request_id for c in v2.ctxs] == ["r2", "r1", "r0"]
    import numpy as np

    order = np.array([1, 0], dtype=np.int32)  # V2: rows name slots
    v3 = slots.view(order, device="cpu")
    assert [c.request_id for c in v3.ctxs] == ["r1", "r2"]
    assert slots.view(order.copy(), device="cpu") is v3
    assert slots.view(np.array([0, 1]), device="cpu") is not v3


def test_a_row_without_a_request_is_a_bookkeeping_error_not_a_silent_default():
    slots = BatchSlots()
    slots.put(1, _row("r1"))
    slots.resize(2)
    with pytest.raises(RuntimeError, match="batch index 0 has no request"):
        slots.view(None, device="cpu")


def test_unidirectional_move_empties_the_source():
    slots = BatchSlots()
    slots.put(3, _row("r3"))
    slots.move(3, 0)
    assert slots.get(3) is None and slots.get(0).ctx.request_id == "r3"


# -- profiles in extra args ---------------------------------------------------------------------------


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate()


def test_profile_reader_accepts_only_a_valid_signature_for_this_request(ring, caplog):
    reader, now = ProfileReader(ring), 1_000.0
    good = signed_args(ring, Profile(strength=3.0), "r1", now=now)
    assert reader.read(good, now=now + 1) == (Profile(strength=3.0), "r1", ProfileSource.SIGNED)
    assert reader.read(None, now=now) == (DEFAULT_PROFILE, "", ProfileSource.ABSENT)
    assert reader.read({"temperature_hint": 1}, now=now)[2] is ProfileSource.ABSENT
    forged = signed_args(KeyRing.generate(), Profile(strength=3.0), "r2", now=now) | {"dg_kid": ring.primary_id}
    replayed = good | {"dg_rid": "r3"}
    tampered = good | {"dg_profile": Profile(strength=0.0).payload().hex()}
    expired = signed_args(ring, Profile(strength=3.0), "r4", now=now - 700, ttl_s=600)
    no_rid = {k: v for k, v in good.items() if k != "dg_rid"}
    with caplog.at_level(logging.WARNING, logger="vllm.distillguard"):
        for args in (forged, replayed, tampered, expired, no_rid, {"dg_sig": "zz", "dg_rid": "r5"}):
            profile, _, source = reader.read(args, now=now)
            assert (profile, source) == (DEFAULT_PROFILE, ProfileSource.INVALID)
    assert "applying the default profile" in caplog.text
    assert good["dg_sig"] not in caplog.text and good["dg_profile"] not in caplog.text


def test_a_verified_profile_stays_with_its_request_after_expiry(ring):
    """vLLM re-adds a preempted request; its profile must not fall back to the default halfway."""
    reader = ProfileReader(ring, max_remembered=2)
    args = signed_args(ring, Profile(strength=2.0), "r1", now=0.0, ttl_s=10)
    assert reader.read(args, now=5.0)[0].strength == 2.0
    assert reader.read(args, now=50.0)[0].strength == 2.0  # remembered
    for i in range(2):  # pushed out of the bounded memory: then expiry applies again
        reader.read(signed_args(ring, Profile(), f"x{i}", now=40.0), now=41.0)
    assert reader.read(args, now=50.0)[2] is ProfileSource.INVALID


def test_front_helpers_strip_client_keys_and_bind_the_request_id(ring):
    assert strip_client_args({"dg_profile": "x", "dg_rid": "y", "force": 1}) == {"force": 1}
    from defense.profile import sign_profile

    args = engine_args(sign_profile(Profile(), "r9", keys=ring, now=0, ttl_s=5), "r9")
    assert args["dg_rid"] == "r9" and all(isinstance(v, str) for v in args.values())


# -- loading ------------------------------------------------------------------------------------------


def test_no_config_means_no_engine_defense(monkeypatch, caplog):
    monkeypatch.delenv("DISTILLGUARD_CONFIG", raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.distillguard"):
        assert EngineDefense.from_environment() is None
    assert "DISTILLGUARD_CONFIG is not set" in caplog.text


def test_a_config_without_sampling_defenses_builds_nothing_in_the_engine(tmp_path, monkeypatch):
    keys_file, _ = write_keys(tmp_path)
    state = tmp_path / "state.db"
    cfg = write_config(tmp_path, keys_file, [{"type": "request_rules"},
                                             {"type": "budget", "params": {"limits": {}}}])
    text = cfg.read_text() + f"state: {{uri: 'sqlite:///{state}'}}\n"
    cfg.write_text(text)
    monkeypatch.setenv("DISTILLGUARD_CONFIG", str(cfg))
    assert EngineDefense.from_environment() is None
    assert not state.exists()  # the budget store is the sidecar's: the engine never opens it


def test_a_sampling_config_needs_the_key_file(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, tmp_path / "missing.yaml", [{"type": "support.vllm_defenses:StepDefense"}])
    monkeypatch.setenv("DISTILLGUARD_CONFIG", str(cfg))
    monkeypatch.delenv("DISTILLGUARD_KEYS", raising=False)
    with pytest.raises(KeyFileError, match="does not exist"):
        EngineDefense.from_environment()


def test_a_sampling_config_loads_only_its_sampling_defenses(tmp_path, monkeypatch):
    keys_file, _ = write_keys(tmp_path)
    cfg = write_config(tmp_path, keys_file, [{"type": "request_rules"},
                                             {"type": "support.vllm_defenses:StepDefense", "name": "step"},
                                             {"type": "support.vllm_defenses:StepDefense", "name": "off", "mode": "off"}])
    monkeypatch.setenv("DISTILLGUARD_CONFIG", str(cfg))
    engine = EngineDefense.from_environment(model="tiny")
    assert engine is not None and engine.names == ("step",) and engine.chain.names == ["step"]
    assert not engine.has_watermark and engine.step is engine.chain


# -- the step -----------------------------------------------------------------------------------------


def _engine(ring: KeyRing, *defenses, clock: FakeClock | None = None) -> EngineDefense:
    clock = clock or FakeClock(1_000.0)
    chain = DefenseChain([ChainEntry(type(d).__name__ + str(i), d) for i, d in enumerate(defenses)], clock=clock)
    return EngineDefense(chain, ring, model="tiny", clock=clock)


def test_rows_carry_their_profile_strength_and_a_distinct_request_id(ring):
    engine = _engine(ring, StepDefense(StepParams()))
    signed = engine.row(signed_args(ring, Profile(strength=3.0), "r1", now=engine.clock.now()), temperature=0.7)
    a, b = engine.row(None), engine.row({"dg_profile": "zz"})
    assert signed.ctx.strength == 3.0 and signed.ctx.request_id == "r1" and signed.ctx.temperature == 0.7
    assert signed.ctx.labels["profile"] == "signed" and b.ctx.labels["profile"] == "invalid"
    assert (a.ctx.strength, b.ctx.strength) == (1.0, 1.0)
    assert a.ctx.request_id != b.ctx.request_id  # per-row caches (antidistillation) key on it


def test_process_runs_the_chain_on_the_whole_batch(ring):
    engine = _engine(ring, StepDefense(StepParams(step=1)))
    slots = BatchSlots()
    now = engine.clock.now()
    rows = [([4, 5], None, 1), ([9], signed_args(ring, Profile(strength=2.0), "r", now=now), 2), ([], None, 1)]
    for i, (prompt, args, _) in enumerate(rows):
        slots.put(i, engine.row(args, prefix=TokenView(prompt, [])))
    slots.resize(3)
    out = engine.process(torch.zeros(3, 50), slots.view(None, device="cpu"))
    assert out.argmax(dim=1).tolist() == [6, 11, 0]  # empty prefix: -1 + 1


def test_a_profile_without_watermark_skips_only_the_watermark(ring):
    kgw = pytest.importorskip("defense.watermark.kgw")
    wm = kgw.GreenListWatermark(kgw.GreenListParams(delta=5.0), deps=Deps(keys=ring))
    off = signed_args(ring, Profile(watermark=False), "r-off", now=1_000.0)

    def step(engine: EngineDefense) -> tuple[torch.Tensor, torch.Tensor]:
        slots = BatchSlots()
        slots.put(0, engine.row(None, prefix=[3, 4]))
        slots.put(1, engine.row(off, prefix=[3, 4]))
        slots.resize(2)
        logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
        logits[1] = logits[0]
        return logits, engine.process(logits, slots.view(None, device="cpu"))

    logits, out = step(_engine(ring, wm))
    assert not torch.equal(out[0], logits[0]) and torch.equal(out[1], logits[1])
    logits, out = step(_engine(ring, wm, StepDefense(StepParams(step=2))))
    assert out.argmax(dim=1).tolist() == [6, 6]  # the step defense still runs on the opted-out row
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 1]


def test_served_model_name_reads_vllm_config_shapes():
    cfg = type("Cfg", (), {"model_config": type("M", (), {"served_model_name": ["tiny", "alias"], "model": "/m"})()})()
    assert served_model_name(cfg) == "tiny"
    assert served_model_name(object()) == ""


def test_one_share_per_engine_loaded_once(monkeypatch):
    monkeypatch.delenv("DISTILLGUARD_CONFIG", raising=False)
    cfg_a, cfg_b = object(), object()
    a = engine_share(cfg_a)
    assert engine_share(cfg_a) is a and engine_share(cfg_b) is not a and a.engine is None


def test_a_second_instance_passes_on_what_the_first_returned_this_step():
    share = EngineShare(None)
    logits = torch.zeros(2, 3)
    assert not share.already_applied(logits)  # fresh logits: apply
    out = share.applied(logits, logits + 1)
    assert share.already_applied(out)  # the sibling right after in the pipeline: pass on
    assert not share.already_applied(torch.zeros(2, 3))  # the next step's logits: apply
    unchanged = torch.ones(1)
    share.applied(unchanged, unchanged)  # a step that changed nothing leaves no mark
    assert not share.already_applied(unchanged)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_nan_and_infinite_logits_do_not_stop_the_step_or_touch_the_other_rows(ring, scheme, fused):
    """A model that emits NaN or infinite logits for some rows: the engine's step still runs (an exception
    here would fail the whole batch in vLLM), and every other row gets exactly what it gets without them."""
    from defense.watermark import GreenListParams, GreenListWatermark, GumbelParams, GumbelWatermark

    d = (GreenListWatermark(GreenListParams(delta=2.0, fused=fused), deps=Deps(keys=ring)) if scheme == "kgw"
         else GumbelWatermark(GumbelParams(fused=fused), deps=Deps(keys=ring)))
    engine = _engine(ring, d)
    slots = BatchSlots()
    for i in range(4):
        slots.put(i, engine.row(None, prefix=[3, 4, 5 + i], temperature=0.8))
    slots.resize(4)
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    clean = engine.process(logits.clone(), slots.view(None, device="cpu"))
    logits[1] = float("nan")
    logits[2, :5] = float("inf")
    logits[3] = float("-inf")
    out = engine.process(logits, slots.view(None, device="cpu"))
    assert torch.equal(out[0], clean[0])
