"""The real sidecar process, called through the client: every RPC, retries, health, reload, shutdown, TLS."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.sidecar import SidecarProcess, write_config

from defense.canonical import context_digest
from defense.types import Decision, LogprobBatch, Prompt, RequestContext, SettleStatus, Usage
from server_plugins.client import AsyncSidecarClient, SidecarClient, SidecarError, TlsConfig

pytestmark = pytest.mark.integration
ADMIN = "s3cret-admin-token"


@pytest.fixture
def sidecar(tmp_path):
    proc = SidecarProcess(write_config(tmp_path), env={"DISTILLGUARD_ADMIN_TOKEN": ADMIN})
    yield proc
    proc.stop()


def ctx(rid, **kw):
    kw.setdefault("client_id", "c_test")
    kw.setdefault("model", "tiny")
    kw.setdefault("prompt", Prompt(text="What is 2 + 2?"))
    return RequestContext(request_id=rid, **kw)


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def batch(k=5, positions=6):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(positions, 50)) * 2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-logp, 1)[:, :k]
    return LogprobBatch(values=np.take_along_axis(logp, top, 1).astype(np.float32), token_ids=top.astype(np.int64),
                        sampled_token_ids=top[:, 0].copy(), sampled_values=np.take_along_axis(logp, top, 1)[:, 0].astype(np.float32))


def test_health_reflection_and_metrics(sidecar):
    assert sidecar.target.startswith("unix:")
    sock = Path(sidecar.target[5:])
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert health_status(sidecar.target) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(sidecar.target, "distillguard.v1.DefenseService") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(sidecar.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
    assert "distillguard.v1.DefenseService" in names and "grpc.health.v1.Health" in names
    with SidecarClient(sidecar.target) as c:
        c.admit(ctx("m1"))
    body = urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=5).read().decode()
    assert 'distillguard_requests_total{decision="allow",shadow="false"} 1.0' in body
    assert "distillguard_rpc_duration_seconds_bucket" in body and "distillguard_build_info" in body


def test_every_rpc_through_the_client_with_retries(sidecar):
    with SidecarClient(sidecar.target, timeout_s=5) as c:
        first = c.admit(ctx("req-1", top_logprobs=20, logit_bias_entries=3, max_tokens=16))
        assert first.decision is Decision.ALLOW_MODIFIED
        assert first.rewrites.top_logprobs == 5 and first.rewrites.drop_logit_bias
        assert first.context_digest == context_digest("tiny", Prompt(text="what is 2 +   2?"))
        assert first.profile is not None and len(first.profile.signature) == 32
        retry = c.admit(ctx("req-1", top_logprobs=20, logit_bias_entries=3, max_tokens=16))
        assert retry.reservation_id == first.reservation_id != ""
        assert retry.decision is first.decision

        deny = c.admit(ctx("req-2", top_logprobs=-1))
        assert deny.decision is Decision.DENY and deny.reason_code == "top_logprobs_all" and deny.reason

        b = batch()
        out = c.protect(b, request_id="req-1", model="tiny", context_digest=first.context_digest,
                        client_id="c_test", profile=first.profile)
        # the example config's keyed noise: same tokens, same argmax, same top-k mass, other values
        assert out.applied == ("keyed_noise",) and not out.failed_open
        np.testing.assert_array_equal(out.batch.token_ids, b.token_ids)
        np.testing.assert_array_equal(out.batch.sampled_token_ids, b.sampled_token_ids)
        assert not np.array_equal(out.batch.values, b.values)
        assert (out.batch.values.argmax(1) == b.values.argmax(1)).all()
        np.testing.assert_allclose(np.exp(out.batch.values.astype(np.float64)).sum(1),
                                   np.exp(b.values.astype(np.float64)).sum(1), rtol=1e-5)
        again = c.protect(b, request_id="req-1", model="tiny", context_digest=first.context_digest,
                          client_id="c_test", profile=first.profile)
        np.testing.assert_array_equal(again.batch.values, out.batch.values)  # repeat-stable

        u = Usage(prompt_tokens=7, completion_tokens=16, logprob_values=80)
        assert c.settle(ctx("req-1"), u, reservation_id=first.reservation_id) is True
        assert c.settle(ctx("req-1"), u, reservation_id=first.reservation_id) is False  # charged once
        # a request that ended early still settles
        c.admit(ctx("req-3"))
        assert c.settle(ctx("req-3"), Usage(completion_tokens=2, status=SettleStatus.CLIENT_ABORT)) is True

        with pytest.raises(SidecarError) as e:  # the example config has no watermark to detect
            c.detect([[1, 2, 3]])
        assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION and "watermark" in e.value.details

    with SidecarClient(sidecar.target, admin_token="wrong") as c, pytest.raises(SidecarError) as e:
        c.get_budget("c_test")
    assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
    with SidecarClient(sidecar.target) as c, pytest.raises(SidecarError) as e:
        c.get_budget("c_test")
    assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
    with SidecarClient(sidecar.target, admin_token=ADMIN) as c:  # the example config's budget answers
        budget = c.get_budget("c_test")
        assert budget.tier == "default" and budget.strength >= 1.0
        limits = {lim.name: lim for lim in budget.limits}
        assert limits["tokens_per_day"].used >= 7 + 16 + 2  # req-1 and req-3 as settled (a day window: no drain)
        assert set(budget.signals) >= {"repeat", "template", "logit_bias_logprobs"}
        with pytest.raises(SidecarError) as e:
            c.get_budget("")
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_detect_with_a_watermark_configured(tmp_path):
    """Detect answers with the configured watermark and the key file the sidecar loaded."""
    from support.watermark import sample_streams

    from defense.base import Deps
    from defense.keys import KeyRing
    from defense.watermark import GreenListParams, GreenListWatermark

    params = {"gamma": 0.25, "delta": 2.0, "context": 2, "vocab_size": 4000}
    cfg = write_config(tmp_path, overrides={"defenses": [{"type": "request_rules"},
                                                          {"type": "watermark", "params": params}]})
    embedder = GreenListWatermark(GreenListParams(**params), deps=Deps(keys=KeyRing.load(tmp_path / "keys.yaml")))
    marked = sample_streams(embedder, 2, 100, 4000).tolist()
    proc = SidecarProcess(cfg)
    try:
        with SidecarClient(proc.target, timeout_s=10) as c:
            results = c.detect(marked + [list(range(1000, 1100))])
            assert [r.detected for r in results] == [True, True, False]
            assert results[0].key_id == embedder.key_id and results[0].scheme == "kgw" and results[0].log10_p < -6
            assert results[0].tokens_scored == 98
            for bad, code in (([[1, 2, 3]], "INVALID_ARGUMENT"), ([list(range(30)) + [4000]], "INVALID_ARGUMENT")):
                with pytest.raises(SidecarError) as e:
                    c.detect(bad)
                assert e.value.code.name == code
            with pytest.raises(SidecarError) as e:
                c.detect(marked, key_ids=["k-unknown"])
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and "unknown key id" in e.value.details
    finally:
        proc.stop()


def test_async_client(sidecar):
    async def go():
        c = AsyncSidecarClient(sidecar.target, timeout_s=5)
        try:
            results = await asyncio.gather(*(c.admit(ctx(f"a-{i}", top_logprobs=3)) for i in range(20)))
            assert {r.decision for r in results} == {Decision.ALLOW}
            assert len({r.reservation_id for r in results}) == 20
            out = await c.protect(batch(), request_id="a-0", model="tiny", context_digest=results[0].context_digest)
            assert out.batch.values.shape == (6, 5)
            assert await c.settle(ctx("a-0"), Usage(completion_tokens=1)) is True
        finally:
            await c.close()

    asyncio.run(go())


def _raw_stub(target):
    from defense.sidecar._proto.distillguard.v1 import defense_pb2 as pb
    from defense.sidecar._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(target)
    return ch, pb, pb_grpc.DefenseServiceStub(ch)


@pytest.mark.parametrize("build, words", [
    (lambda pb: pb.AdmitRequest(request_id="x"), "client_id is required"),
    (lambda pb: pb.AdmitRequest(identity=pb.ClientIdentity(client_id="c")), "request_id is required"),
    (lambda pb: pb.AdmitRequest(request_id="x", identity=pb.ClientIdentity(client_id="c"), n=-2), "n must be >= 1"),
    (lambda pb: pb.AdmitRequest(request_id="x", identity=pb.ClientIdentity(client_id="c"), temperature=float("nan")),
     "temperature"),
    (lambda pb: pb.AdmitRequest(request_id="x", identity=pb.ClientIdentity(client_id="c"), api=99), "unknown enum"),
    (lambda pb: pb.AdmitRequest(request_id="x" * 300, identity=pb.ClientIdentity(client_id="c")), "at most 256"),
    (lambda pb: pb.ProtectRequest(positions=2, k=2, values=[-1.0] * 3, token_ids=[1] * 4, context_digest=b"d" * 32),
     "values has 3 entries"),
    (lambda pb: pb.ProtectRequest(positions=1, k=2, values=[-1.0, float("nan")], token_ids=[1, 2],
                                  context_digest=b"d" * 32), "NaN"),
    (lambda pb: pb.ProtectRequest(positions=1, k=2, values=[-0.1, -0.2], token_ids=[1, 2], context_digest=b"d" * 32),
     "sum to"),
    (lambda pb: pb.ProtectRequest(positions=1, k=2, values=[-1.0, -2.0], token_ids=[1, 2]), "context_digest"),
    (lambda pb: pb.ProtectRequest(positions=3000, k=2000, context_digest=b"d" * 32), "more than"),
    (lambda pb: pb.SettleRequest(request_id="x", identity=pb.ClientIdentity(client_id="c"),
                                 usage=pb.Usage(completion_tokens=-5)), "completion_tokens must be >= 0"),
])
def test_malformed_requests_get_invalid_argument(sidecar, build, words):
    ch, pb, stub = _raw_stub(sidecar.target)
    with ch:
        req = build(pb)
        method = {"AdmitRequest": stub.Admit, "ProtectRequest": stub.Protect, "SettleRequest": stub.Settle}[type(req).__name__]
        with pytest.raises(grpc.RpcError) as e:
            method(req, timeout=5)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in e.value.details()
    assert health_status(sidecar.target) == health_pb2.HealthCheckResponse.SERVING  # still up


def test_message_over_the_size_limit_is_refused(tmp_path):
    proc = SidecarProcess(write_config(tmp_path, overrides={"server": {"max_message_bytes": 65536}}))
    try:
        ch, pb, stub = _raw_stub(proc.target)
        with ch, pytest.raises(grpc.RpcError) as e:
            stub.Admit(pb.AdmitRequest(request_id="big", identity=pb.ClientIdentity(client_id="c"),
                                       prompt=pb.Prompt(text="x" * 100_000)), timeout=5)
        # gRPC's own limit answers before the handler: the standard status for an oversized message
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health_status(proc.target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.stop()


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _metric(port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_reload_keeps_last_good_config(sidecar):
    cfg = sidecar.config
    good = yaml.safe_load(cfg.read_text())
    # a broken config (misspelled defense type) on disk: the running config stays
    broken = dict(good, defenses=[{"type": "request_rulez"}])
    cfg.write_text(yaml.safe_dump(broken))
    assert _wait(lambda: _metric(sidecar.metrics_port, 'distillguard_config_reloads_total{result="failure"}') >= 1)
    with SidecarClient(sidecar.target, timeout_s=5) as c:
        assert c.admit(ctx("r-a", top_logprobs=20)).rewrites.top_logprobs == 5
        # SIGHUP retries the broken file: still counted, still serving
        sidecar.signal(signal.SIGHUP)
        assert _wait(lambda: _metric(sidecar.metrics_port, 'distillguard_config_reloads_total{result="failure"}') >= 2)
        assert health_status(sidecar.target) == health_pb2.HealthCheckResponse.SERVING
        # a good change is picked up
        good["defenses"][0]["params"]["max_top_logprobs"] = 2
        cfg.write_text(yaml.safe_dump(good))
        assert _wait(lambda: _metric(sidecar.metrics_port, 'distillguard_config_reloads_total{result="success"}') >= 1)
        assert c.admit(ctx("r-b", top_logprobs=20)).rewrites.top_logprobs == 2
        # an admission from before the reload is still idempotent
        assert c.settle(ctx("r-a"), Usage(completion_tokens=1)) is True
        assert c.settle(ctx("r-a"), Usage(completion_tokens=1)) is False
    assert "config reload failed" in sidecar.log() and "unknown defense type" in sidecar.log()


def test_sigterm_reports_not_serving_before_the_socket_closes(tmp_path):
    proc = SidecarProcess(write_config(tmp_path, overrides={"server": {"drain_s": 1.5}}))
    target = proc.target
    assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
    proc.signal(signal.SIGTERM)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            seen.append(health_status(target))
        except grpc.RpcError:
            seen.append("closed")
            break
        time.sleep(0.05)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
    assert seen[-1] == "closed"
    assert seen.index(health_pb2.HealthCheckResponse.NOT_SERVING) < seen.index("closed")
    assert proc.stop() == 0
    assert not Path(target[5:]).exists()


def test_fail_open_only_on_unavailable(tmp_path):
    dead = f"unix:{tmp_path}/nobody.sock"
    with SidecarClient(dead, timeout_s=0.3, fail_open=True) as c:
        r = c.admit(ctx("f-1"))
        assert r.allowed and r.failed_open
        b = batch()
        assert c.protect(b, request_id="f-1", model="m", context_digest=b"\0" * 32).failed_open
    with SidecarClient(dead, timeout_s=0.3, fail_open=False) as c, pytest.raises(SidecarError) as e:
        c.admit(ctx("f-2"))
    assert e.value.code is grpc.StatusCode.UNAVAILABLE


def test_fail_open_client_never_passes_a_refusal(sidecar):
    with SidecarClient(sidecar.target, timeout_s=5, fail_open=True) as c:
        r = c.admit(ctx("f-3", top_logprobs=-1))
        assert r.decision is Decision.DENY and not r.failed_open
        with pytest.raises(SidecarError) as e:  # a malformed request is not "unavailable"
            c.protect(batch(), request_id="f-3", model="m", context_digest=b"short")
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test-ca", cwd=d)
    for name, cn in (("server", "localhost"), ("client", "client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def test_mutual_tls_on_tcp(tmp_path):
    _make_certs(tmp_path)
    tls = {"cert_file": str(tmp_path / "server.pem"), "key_file": str(tmp_path / "server.key"),
           "client_ca_file": str(tmp_path / "ca.pem")}
    proc = SidecarProcess(write_config(tmp_path, listen=["127.0.0.1:0"], overrides={"server": {"tls": tls}}))
    try:
        target = proc.target.replace("127.0.0.1", "localhost")
        good = TlsConfig(ca_file=str(tmp_path / "ca.pem"), cert_file=str(tmp_path / "client.pem"),
                         key_file=str(tmp_path / "client.key"))
        with SidecarClient(target, timeout_s=5, tls=good) as c:
            assert c.admit(ctx("t-1")).decision is Decision.ALLOW
        with SidecarClient(target, timeout_s=2, tls=TlsConfig(ca_file=str(tmp_path / "ca.pem"))) as c, \
                pytest.raises(SidecarError) as e:
            c.admit(ctx("t-2"))
        assert e.value.code is grpc.StatusCode.UNAVAILABLE  # handshake refused: no client certificate
        with SidecarClient(proc.target, timeout_s=2) as c, pytest.raises(SidecarError):
            c.admit(ctx("t-3"))  # plaintext to a TLS port
    finally:
        proc.stop()


def test_serve_refuses_to_start_without_key_file(tmp_path):
    cfg = write_config(tmp_path)
    (tmp_path / "keys.yaml").unlink()
    r = subprocess.run([sys.executable, "-m", "defense.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2 and "distillguard keys new" in r.stderr


def test_serve_refuses_a_world_readable_key_file(tmp_path):
    cfg = write_config(tmp_path)
    (tmp_path / "keys.yaml").chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "defense.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2 and "chmod 600" in r.stderr
