"""`distillguard detect`: token ids or text in, JSON out; bad input exits 2 with a message."""

from __future__ import annotations

import json

import pytest
import yaml
from support.watermark import fixed_ring, sample_streams

from defense.base import Deps
from defense.cli import main
from defense.watermark import GreenListParams, GreenListWatermark
from server_plugins.transformers import generate


@pytest.fixture
def setup(tmp_path):
    ring = fixed_ring(tmp_path, 2, tag="cli", retired=1)
    key_file = next(tmp_path.glob("keys-cli-*.yaml"))
    params = {"gamma": 0.25, "delta": 2.0, "context": 2, "vocab_size": 5000}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"keys": {"file": str(key_file)}, "state": {"uri": "memory://"},
                                   "defenses": [{"type": "watermark", "params": params}]}))
    wm = GreenListWatermark(GreenListParams(**params), deps=Deps(keys=ring))
    return tmp_path, cfg, key_file, ring, wm


def run(capsys, *argv):
    code = main(["detect", *map(str, argv)])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_token_ids_from_config(setup, capsys):
    tmp, cfg, _, ring, wm = setup
    streams = sample_streams(wm, 3, 80, 5000).tolist()
    inp = tmp / "in.jsonl"
    inp.write_text("\n".join([json.dumps(streams[0]), json.dumps({"token_ids": streams[1]}), "",
                              json.dumps(list(range(100, 180)))]) + "\n")
    code, doc, err = run(capsys, inp, "--config", cfg)
    assert code == 0, err
    first, second, plain = doc["results"]
    assert first["detected"] and second["detected"] and not plain["detected"]
    assert first["key_id"] == ring.primary_id and first["scheme"] == "kgw" and first["tokens_scored"] == 78
    assert set(first) == {"key_id", "tokens_scored", "z", "log10_p", "detected", "scheme"}
    assert doc["combined"]["detected"] and doc["keys_tried"] == [ring.primary_id, "k-cli-0"]


def test_flags_without_config(setup, capsys, monkeypatch):
    tmp, _, key_file, ring, wm = setup
    monkeypatch.delenv("DISTILLGUARD_CONFIG", raising=False)
    inp = tmp / "in.jsonl"
    inp.write_text(json.dumps(sample_streams(wm, 1, 80, 5000)[0].tolist()) + "\n")
    code, doc, err = run(capsys, inp, "--keys", key_file, "--context", 2, "--key-id", ring.primary_id)
    assert code == 0 and doc["results"][0]["detected"], err
    code, doc, _ = run(capsys, inp, "--keys", key_file, "--context", 1)  # the wrong h finds nothing
    assert code == 0 and not doc["results"][0]["detected"]


@pytest.mark.slow
def test_text_with_a_tokenizer_folder(tiny_lm, prompts, tmp_path, capsys, monkeypatch):
    model, tok, folder = tiny_lm
    monkeypatch.delenv("DISTILLGUARD_CONFIG", raising=False)
    ring = fixed_ring(tmp_path, tag="cli-text")
    wm = GreenListWatermark(GreenListParams(), deps=Deps(keys=ring))
    ids = generate(model, prompts[:2], defense=wm, max_new_tokens=200, stop_at_eos=False, seed=7)
    inp = tmp_path / "texts.txt"
    inp.write_text(tok.decode(ids[0]).replace("\n", " ") + "\n" + json.dumps({"text": tok.decode(ids[1])}) + "\n")
    code, doc, err = run(capsys, inp, "--keys", next(tmp_path.glob("keys-*.yaml")), "--tokenizer", folder)
    assert code == 0, err
    # text re-tokenized by the served model's tokenizer keeps the mark (each stream alone is ~200 tokens at h=1)
    assert all(r["log10_p"] < -3 for r in doc["results"]) and doc["combined"]["detected"], doc


@pytest.mark.parametrize("lines, extra, words", [
    ([json.dumps(list(range(40)) + [99_999])], [], "token id 99999, outside the vocabulary ([0, 5000))"),
    (["some text"], [], "line 1 is text; pass --tokenizer"),
    (['{"ids": [1]}'], [], "needs 'token_ids' or 'text'"),
    (["[1.5, 2]"], [], "JSON list of integers"),
    ([json.dumps(list(range(40)))], ["--key-id", "k-missing"], "unknown key id"),
    ([""], [], "no sequences"),
])
def test_bad_input_exits_2(setup, capsys, lines, extra, words):
    tmp, cfg, *_ = setup
    inp = tmp / "bad.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, inp, "--config", cfg, *extra)
    assert code == 2 and words in err


def test_config_without_a_watermark_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("defenses:\n  - type: request_rules\n")
    (tmp_path / "in.jsonl").write_text("[1, 2, 3]\n")
    code, _, err = run(capsys, tmp_path / "in.jsonl", "--config", cfg)
    assert code == 2 and "configures no watermark" in err
