"""Our ext_proc subset: the committed module matches the generator, and every field matches Envoy's API."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor as d

from server_plugins.envoy._proto import ext_proc_pb2 as pb

ROOT = Path(__file__).resolve().parents[3]
GENERATE = ROOT / "proto" / "generate_ext_proc.py"
ENVOY_PY = ROOT / ".venvs" / "envoy" / "bin" / "python"

UPSTREAM = {  # our message -> the Envoy API message it mirrors
    "HeaderValue": "envoy.config.core.v3.HeaderValue",
    "HeaderMap": "envoy.config.core.v3.HeaderMap",
    "HeaderValueOption": "envoy.config.core.v3.HeaderValueOption",
    "ProcessingMode": "envoy.extensions.filters.http.ext_proc.v3.ProcessingMode",
    "HttpStatus": "envoy.type.v3.HttpStatus",
    **{m: f"envoy.service.ext_proc.v3.{m}" for m in (
        "HttpHeaders", "HttpBody", "HttpTrailers", "ProcessingRequest", "HeaderMutation", "BodyMutation",
        "CommonResponse", "HeadersResponse", "BodyResponse", "TrailersResponse", "ImmediateResponse",
        "ProcessingResponse")},
}

# runs in .venvs/envoy (xds-protos): each upstream message's fields and enums, as JSON
_DUMP = """
import json, sys
from google.protobuf import descriptor_pool
import envoy.service.ext_proc.v3.external_processor_pb2  # noqa: F401 - loads the whole file tree
import envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2  # noqa: F401
pool = descriptor_pool.Default()
out = {}
for name in json.loads(sys.argv[1]):
    m = pool.FindMessageTypeByName(name)
    out[name] = {
        "fields": {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "",
                            f.containing_oneof.name if f.containing_oneof else ""] for f in m.fields},
        "enums": {e.name: {v.name: v.number for v in e.values} for e in m.enum_types},
    }
print(json.dumps(out))
"""


def _load_generate():
    spec = importlib.util.spec_from_file_location("_dg_generate_ext_proc", GENERATE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_module_matches_the_generator(tmp_path):
    done = subprocess.run([sys.executable, str(GENERATE), "--out", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    for name in _load_generate().GENERATED_FILES:
        assert (tmp_path / name).read_text() == (ROOT / "server_plugins/envoy/_proto" / name).read_text(), (
            f"{name} is stale: run `python proto/generate_ext_proc.py` and commit the result")


@pytest.mark.skipif(not ENVOY_PY.exists(), reason=".venvs/envoy (with xds-protos) not made; ./dev setup makes it")
def test_every_field_matches_envoys_api():
    done = subprocess.run([str(ENVOY_PY), "-c", _DUMP, json.dumps(sorted(UPSTREAM.values()))], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    upstream = json.loads(done.stdout)
    ours_to_theirs = {f"distillguard.envoy.v3.{k}": v for k, v in UPSTREAM.items()}
    checked = 0
    for ours, theirs in UPSTREAM.items():
        msg = pb.DESCRIPTOR.message_types_by_name[ours]
        want = upstream[theirs]
        for f in msg.fields:
            assert f.name in want["fields"], f"{ours}.{f.name} is not in {theirs}"
            number, ftype, repeated, mtype, oneof = want["fields"][f.name]
            assert f.number == number, f"{ours}.{f.name}: field number {f.number}, Envoy has {number}"
            assert f.is_repeated == repeated, f"{ours}.{f.name}: repeated differs"
            if f.type == d.FieldDescriptor.TYPE_MESSAGE:
                assert ours_to_theirs[f.message_type.full_name] == mtype, f"{ours}.{f.name}: message type differs"
            elif f.type == d.FieldDescriptor.TYPE_INT32:  # our int32 for Envoy's enum of HTTP statuses: a varint
                assert ftype in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_ENUM), f"{ours}.{f.name}"
            else:
                assert f.type == ftype, f"{ours}.{f.name}: type {f.type}, Envoy has {ftype}"
            assert (f.containing_oneof.name if f.containing_oneof else "") == oneof, f"{ours}.{f.name}: oneof"
            checked += 1
        for e in msg.enum_types:
            for v in e.values:
                assert want["enums"][e.name][v.name] == v.number, f"{ours}.{e.name}.{v.name}"
    assert checked >= 45  # every declared field was compared (48 today)
