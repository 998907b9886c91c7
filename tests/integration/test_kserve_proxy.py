"""tritonclient -> the KServe proxy (a real `distillguard kserve-proxy` process) -> a real Triton server.

Triton is nvidia-pytriton's bundled tritonserver in .venvs/triton (made by ./dev setup), serving an MLP
classifier from the model factory. One Triton serves the whole module; the proxies are cheap.
"""

from __future__ import annotations

import queue
import socket
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from google.rpc import error_details_pb2, status_pb2
from support.sidecar import write_config
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from defense.models.classifier import ClassifierConfig, build_classifier
from server_plugins.kserve.triton import ProxyProcess, TritonProcess, export_classifier, unavailable_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IN_DIM, CLASSES = 16, 10
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kserve.yaml"
BUDGET = {
    "type": "budget",
    "params": {
        # a generous default; tenant "stingy" gets 3 requests an hour
        "limits": {"req": {"unit": "requests", "amount": 100000, "period_s": 3600}},
        "tiers": {"tight": {"amounts": {"req": 3}}},
        "tenants": {"stingy": "tight"},
    },
}


def start_proxy(tmp: Path, upstream: str, *, metrics: bool = False) -> ProxyProcess:
    # the example's defenses, with this test's budget in place of the example's
    shipped = yaml.safe_load((EXAMPLE.parent / "distillguard.yaml").read_text())["defenses"]
    config = write_config(tmp, overrides={"defenses": [BUDGET, *(d for d in shipped if d["type"] != "budget")]})
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc.update(listen=["127.0.0.1:0"], upstream=upstream, max_input_bytes=64 * 1024,
               max_message_bytes=1024 * 1024, metrics_port=0 if metrics else None, grace_s=0.5)
    path = tmp / "kserve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return ProxyProcess(config, path)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no Triton server: {reason}")
    tmp = tmp_path_factory.mktemp("triton")
    weights = export_classifier(build_classifier(ClassifierConfig(in_dim=IN_DIM, n_classes=CLASSES, hidden=(32,)),
                                                 seed=3), tmp / "mlp.npz")
    errors = []
    for attempt in range(2):  # fresh ports and workspace on the second try
        try:
            proc = TritonProcess(weights, tmp / f"try{attempt}")
            break
        except RuntimeError as e:
            errors.append(str(e))
    else:
        # the server itself would not start on this machine (seen once on a CI host, silent for 180 s);
        # the diagnosis (its log, tritonserver's log, every thread's stack) goes into the skip reason
        pytest.skip("Triton did not start here, twice:\n" + "\n".join(e[-2500:] for e in errors))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    proc = start_proxy(tmp_path_factory.mktemp("proxy"), triton.target, metrics=True)
    yield proc
    proc.stop()


def x_input(x: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    return inp


def infer(target: str, x: np.ndarray, *, outputs: list[str] | None = None, token: str = "benign",
          tenant: str | None = None, model: str = "mlp"):
    headers = {"authorization": f"Bearer {token}"}
    if tenant:
        headers["x-distillguard-tenant"] = tenant
    with tc.InferenceServerClient(target) as c:
        outs = [tc.InferRequestedOutput(n) for n in outputs] if outputs else None
        return c.infer(model, [x_input(x)], outputs=outs, headers=headers, client_timeout=30)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, IN_DIM)).astype(np.float32)


def error_of(fn) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as ei:
        fn()
    return ei.value


def test_benign_inference_keeps_its_argmax_and_never_sees_logits(triton, proxy):
    x = inputs(64)
    direct = infer(triton.target, x)
    through = infer(proxy.target, x)
    names = [o.name for o in through.get_response().outputs]
    assert "logits" not in names and sorted(names) == ["label", "logprobs", "probs"]
    clean, noisy = direct.as_numpy("probs"), through.as_numpy("probs")
    assert noisy.shape == clean.shape and noisy.dtype == np.float32
    np.testing.assert_array_equal(noisy.argmax(1), clean.argmax(1))
    np.testing.assert_allclose(noisy.sum(1), 1.0, atol=1e-5)
    assert np.abs(noisy - clean).max() > 1e-3  # perturbed, not passed through
    np.testing.assert_array_equal(through.as_numpy("label"), direct.as_numpy("label"))  # passthrough output
    lp = through.as_numpy("logprobs")
    np.testing.assert_array_equal(lp.argmax(1), clean.argmax(1))
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0, atol=1e-4)

    # asking for the logits by name: they are withheld, the rest is served; asking only for them is refused
    some = infer(proxy.target, x[:2], outputs=["logits", "probs"])
    assert [o.name for o in some.get_response().outputs] == ["probs"]
    e = error_of(lambda: infer(proxy.target, x[:2], outputs=["logits"]))
    assert "PERMISSION_DENIED" in e.status() and "logits" in e.message()


def test_the_same_input_gets_the_same_answer_alone_in_a_batch_or_repeated(proxy):
    x = inputs(8, seed=1)
    batch = infer(proxy.target, x, outputs=["probs"]).as_numpy("probs")
    again = infer(proxy.target, x, outputs=["probs"]).as_numpy("probs")
    alone = infer(proxy.target, x[5:6], outputs=["probs"]).as_numpy("probs")
    shuffled = infer(proxy.target, x[::-1], outputs=["probs"]).as_numpy("probs")
    np.testing.assert_array_equal(again, batch)
    np.testing.assert_array_equal(alone[0], batch[5])  # batch companions cannot vary a row's noise
    np.testing.assert_array_equal(shuffled[::-1], batch)


def retry_info(target: str, x: np.ndarray, tenant: str) -> tuple[grpc.StatusCode, dict]:
    req = service_pb2.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    del t  # raw contents below
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    with grpc.insecure_channel(target) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req, metadata=[("authorization", "Bearer greedy"), ("x-distillguard-tenant", tenant)],
                            timeout=10)
    return ei.value.code(), dict(ei.value.trailing_metadata() or ())


def test_a_throttled_client_gets_resource_exhausted_with_retry_info(proxy):
    x = inputs(1, seed=2)
    for _ in range(3):
        infer(proxy.target, x, token="greedy", tenant="stingy")
    e = error_of(lambda: infer(proxy.target, x, token="greedy", tenant="stingy"))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED" and "budget" in e.message()
    code, trailers = retry_info(proxy.target, x, "stingy")
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(trailers["retry-after"]) >= 1
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.seconds >= 1
    infer(proxy.target, x, token="other", tenant="stingy")  # another client of the same tier is unaffected
    infer(proxy.target, x, token="greedy")  # the same token in another tenant is another client


def test_bad_requests_get_clear_errors(proxy):
    x = inputs(2)
    e = error_of(lambda: infer(proxy.target, x, model="resnet"))
    assert "NOT_FOUND" in e.status() and "'resnet'" in e.message() and "mlp" in e.message()
    e = error_of(lambda: infer(proxy.target, inputs(2)[:, :5]))
    assert "INVALID_ARGUMENT" in e.status() and "[-1, 16]" in e.message() and "[2, 5]" in e.message()
    with tc.InferenceServerClient(proxy.target) as c:
        wrong = tc.InferInput("x", [2, IN_DIM], "FP64")
        wrong.set_data_from_numpy(x.astype(np.float64))
        e = error_of(lambda: c.infer("mlp", [wrong]))
        assert "INVALID_ARGUMENT" in e.status() and "must be FP32, got FP64" in e.message()
        e = error_of(lambda: c.infer("mlp", [x_input(x)], outputs=[tc.InferRequestedOutput("nope")]))
        assert "no output 'nope'" in e.message()
        e = error_of(lambda: c.infer("mlp", [x_input(x)], outputs=[tc.InferRequestedOutput("probs", class_count=3)]))
        assert "INVALID_ARGUMENT" in e.status() and "classification" in e.message()
        e = error_of(lambda: c.get_system_shared_memory_status())
        assert "UNIMPLEMENTED" in e.status() and "shared memory" in e.message()
        # health and metadata pass through
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mlp")
        assert [o.name for o in c.get_model_metadata("mlp").outputs] == ["probs", "logprobs", "logits", "label"]
    big = np.zeros((1100, IN_DIM), np.float32)  # 70 KB of input, over this proxy's 64 KB max_input_bytes
    e = error_of(lambda: infer(proxy.target, big))
    assert "INVALID_ARGUMENT" in e.status() and "max_input_bytes" in e.message()
    huge = np.zeros((20000, IN_DIM), np.float32)  # 1.3 MB: over the gRPC message limit itself
    e = error_of(lambda: infer(proxy.target, huge))
    assert "RESOURCE_EXHAUSTED" in e.status()


def test_streaming_inference_is_protected_too(triton, proxy):
    x = inputs(4, seed=4)
    clean = infer(triton.target, x).as_numpy("probs")
    results: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(proxy.target) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)),
                       headers={"authorization": "Bearer streamer"})
        for i in range(4):
            c.async_stream_infer("mlp", [x_input(x[i:i + 1])], request_id=f"r{i}")
        c.async_stream_infer("resnet", [x_input(x[:1])], request_id="bad")
        got = [results.get(timeout=30) for _ in range(5)]
        c.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "NOT_FOUND" in str(errors[0])
    by_id = {r.get_response().id: r for r, e in got if e is None}
    assert sorted(by_id) == ["r0", "r1", "r2", "r3"]
    for i in range(4):
        r = by_id[f"r{i}"]
        assert "logits" not in [o.name for o in r.get_response().outputs]
        p = r.as_numpy("probs")[0]
        assert p.argmax() == clean[i].argmax() and np.abs(p - clean[i]).max() > 1e-4


class Relay:
    """A loopback TCP relay in front of Triton that the test can cut, as a network failure would."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            self.conns += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.open = False
        try:  # wakes the blocked accept(); close() alone leaves the socket listening until accept returns
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def settles(proc: ProxyProcess, status: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(f'distillguard_settles_total{{duplicate="false",status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_upstream_down_is_unavailable_and_releases_the_reservation(triton, tmp_path):
    relay = Relay(triton.target)
    proc = start_proxy(tmp_path, f"127.0.0.1:{relay.port}", metrics=True)
    try:
        x = inputs(1, seed=5)
        infer(proc.target, x, token="greedy", tenant="stingy")  # 1 of the tier's 3 requests; metadata cached
        relay.cut()
        for _ in range(3):  # charged, the third of these would be throttled instead
            e = error_of(lambda: infer(proc.target, x, token="greedy", tenant="stingy"))
            assert e.status() == "StatusCode.UNAVAILABLE" and "upstream Triton" in e.message()
        assert settles(proc, "upstream_error") == 3
    finally:
        relay.cut()
        proc.stop()


def test_an_upstream_that_was_never_there_is_unavailable(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    proc = start_proxy(tmp_path, dead)
    try:
        e = error_of(lambda: infer(proc.target, inputs(1)))
        assert e.status() == "StatusCode.UNAVAILABLE" and dead in e.message()
        e = error_of(lambda: tc.InferenceServerClient(proc.target).is_server_ready())
        assert "UNAVAILABLE" in e.status()
    finally:
        proc.stop()
