"""The committed gRPC stubs match the proto, and the messages keep the contract's shape."""

from __future__ import annotations

import difflib
import importlib.util
import pickle
import random
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from defense.sidecar._proto.distillguard.v1 import defense_pb2 as pb
from defense.sidecar._proto.distillguard.v1 import defense_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
GENERATE = REPO_ROOT / "proto" / "generate.py"
COMMITTED = REPO_ROOT / "defense" / "sidecar" / "_proto"

POSITIONS, K = 256, 20  # a long completion with OpenAI's maximum top_logprobs


def _load_generate_module():
    spec = importlib.util.spec_from_file_location("_distillguard_proto_generate", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_generator(tmp_path):
    done = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"proto/generate.py failed:\n{done.stderr}"
    stale = []
    for name in _load_generate_module().GENERATED_FILES:
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        committed_path = COMMITTED / name
        committed = committed_path.read_text(encoding="utf-8") if committed_path.exists() else ""
        if fresh != committed:
            diff = difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                fromfile=f"committed/{name}",
                tofile=f"generated/{name}",
                n=1,
            )
            stale.append("".join(list(diff)[:40]))
    assert not stale, (
        "the stubs in defense/sidecar/_proto differ from proto/distillguard/v1/defense.proto: "
        "run `python proto/generate.py` and commit the result\n" + "\n".join(stale)
    )


def test_generate_refuses_another_grpcio_tools(monkeypatch):
    module = _load_generate_module()
    monkeypatch.setattr(module.metadata, "version", lambda name: "1.80.0")
    with pytest.raises(module.GenerateError, match=r"grpcio-tools 1\.81\.1 is required, found 1\.80\.0"):
        module.check_grpcio_tools()


def _protect_request() -> pb.ProtectRequest:
    rng = random.Random(7)
    token_ids = [rng.randrange(0, 128_256) for _ in range(POSITIONS * K)]
    token_ids[-1] = -1  # the last position returned one alternative fewer than k
    # array("f") rounds to float32 now, so the comparison after the round trip is exact
    values = array("f", (-rng.expovariate(0.5) for _ in range(POSITIONS * K)))
    return pb.ProtectRequest(
        request_id="req-1",
        model="tiny",
        context_digest=bytes(range(32)),
        temperature=0.7,
        logprobs_mode=pb.LOGPROBS_MODE_PROCESSED,
        kind=pb.OUTPUT_KIND_TOP_LOGPROBS,
        positions=POSITIONS,
        k=K,
        token_ids=token_ids,
        values=values.tolist(),
        sampled_token_ids=token_ids[::K],
        sampled_values=values.tolist()[::K],
        profile=pb.SignedProfile(payload=b'{"strength":1.0}', signature=b"\x01" * 32, key_id="sign-1"),
        identity=pb.ClientIdentity(client_id="c" * 64, tenant="default"),
    )


def test_protect_request_round_trips_packed_arrays():
    request = _protect_request()
    data = request.SerializeToString()

    parsed = pb.ProtectRequest.FromString(data)

    assert parsed == request
    assert (parsed.positions, parsed.k) == (POSITIONS, K)
    assert list(parsed.token_ids) == list(request.token_ids)
    assert list(parsed.values) == list(request.values)
    assert len(parsed.sampled_token_ids) == len(parsed.sampled_values) == POSITIONS
    # packed: `values` (field 10) is one length-delimited record of 5120 float32s, not a tag per value
    assert b"\x52\x80\xa0\x01" in data  # tag (10 << 3 | 2), then varint 20480
    assert len(data) < 2 * POSITIONS * K * 4 + 1024


def test_optional_fields_tell_unset_from_zero():
    assert not pb.Rewrites().HasField("top_logprobs")
    assert pb.Rewrites(top_logprobs=0).HasField("top_logprobs")
    assert not pb.AdmitRequest().HasField("prompt_tokens")
    assert not pb.ProtectRequest().HasField("temperature")
    prompt = pb.Prompt(tensor_bytes=b"\x00\x01")
    assert prompt.WhichOneof("content") == "tensor_bytes"


def test_messages_carry_their_real_module_and_pickle():
    assert pb.ProtectRequest.__module__ == pb.__name__
    request = _protect_request()
    assert pickle.loads(pickle.dumps(request)) == request


def test_service_lists_exactly_the_five_rpcs():
    service = pb.DESCRIPTOR.services_by_name["DefenseService"]
    assert pb.DESCRIPTOR.name == "distillguard/v1/defense.proto"
    assert service.full_name == "distillguard.v1.DefenseService"
    names = [method.name for method in service.methods]
    assert names == ["Admit", "Protect", "Settle", "Detect", "GetBudget"]
    assert all(not (m.client_streaming or m.server_streaming) for m in service.methods)
    assert list(pb.DESCRIPTOR.services_by_name) == ["DefenseService"]
    for name in ("DefenseServiceStub", "DefenseServiceServicer", "add_DefenseServiceServicer_to_server"):
        assert hasattr(pb_grpc, name), name
