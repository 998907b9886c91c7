"""The end-to-end demo's pure helpers: reading OpenAI answers, the utility numbers, the report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defense.types import LogprobBatch
from server_plugins.demo import (
    Tally,
    completion_rows,
    format_report,
    rows_to_batch,
    token_id_of,
    token_index,
    utility,
)
from server_plugins.vllm.process import CHAT_TEMPLATE, _has_chat_template


def test_tally_counts_by_status():
    t = Tally()
    for s in (200, 200, 429, 500, 429, 500):
        t.add(s)
    assert (t.admitted, t.throttled, t.other) == (2, 2, {500: 2})


def test_token_ids_from_text_or_vllm_ids():
    index = token_index(["a", " b", "a", "\ufffd"])
    assert index == {"a": 0, " b": 1, "\ufffd": 3}  # the first id of two that decode alike
    assert token_id_of("token_id:42", index) == 42 and token_id_of(" b", index) == 1
    assert token_id_of("token_id:x", index) is None and token_id_of("zz", index) is None


def test_rows_to_batch_sorts_and_pads():
    index = {"a": 0, "b": 1, "c": 2}
    doc = {"choices": [{"logprobs": {"tokens": ["a", "b"],
                                     "top_logprobs": [{"b": -2.0, "a": -0.5, "c": -3.0}, {"b": -0.1}]}}]}
    tokens, rows = completion_rows(doc)
    assert tokens == ["a", "b"]
    batch = rows_to_batch(rows, index, 2)
    assert batch.token_ids.tolist() == [[0, 1], [1, -1]]
    assert batch.values[0].tolist() == [-0.5, -2.0] and batch.values[1, 0] == pytest.approx(-0.1)
    assert rows_to_batch([{"zz": -1.0}], index, 2) is None


def _batch(rows):
    ids = np.array([[t for t, _ in r] for r in rows], dtype=np.int64)
    return LogprobBatch(values=np.log(np.array([[p for _, p in r] for r in rows], dtype=np.float32)), token_ids=ids)


def test_utility_pools_positions_over_answers():
    ref = [_batch([[(1, 0.6), (2, 0.3)], [(3, 0.5), (4, 0.4)]]), _batch([[(5, 0.9), (6, 0.05)]])]
    same = utility(ref, ref)
    assert same == (1.0, pytest.approx(0.0, abs=1e-6))
    # the first answer's first row swaps its top two: one of three positions disagrees, its TV is 0.3
    got = [_batch([[(1, 0.3), (2, 0.6)], [(3, 0.5), (4, 0.4)]]), ref[1]]
    top1, tv = utility(got, ref)
    assert top1 == pytest.approx(2 / 3) and tv == pytest.approx(0.3 / 3, abs=1e-6)
    assert all(math.isnan(x) for x in utility([], []))


def test_report_says_what_each_client_got():
    legit, distill = Tally(admitted=8), Tally(admitted=12, throttled=28)
    text = format_report({"engine": "vLLM", "front": "Envoy", "legit": legit, "distill": distill, "legit_sent": 8,
                          "distill_sent": 40, "retry_after": "60", "throttle_reason": "over budget",
                          "budget": "logprob_values_per_day 3840/4000", "top1": 0.9, "tv": 0.12, "positions": 128,
                          "watermark": {"texts": 12, "tokens": 700, "log10_p": -31.24, "detected": True}})
    assert "8 admitted, 0 throttled" in text and "12 admitted, 28 throttled" in text
    assert "Retry-After 60 s" in text and "top-1 agreement 0.900, mean TV 0.120" in text
    assert "log10 p = -31.2 -> detected" in text and "the in-engine watermark" in text
    clean = format_report({"engine": "e", "front": "f", "legit": legit, "distill": distill, "legit_sent": 8,
                           "distill_sent": 40, "top1": 1.0, "tv": 0.04, "positions": 3, "watermark": None})
    assert "watermark: none configured" in clean and "in-engine watermark" not in clean


def test_chat_template_only_when_the_tokenizer_has_none(tmp_path):
    assert not _has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    assert _has_chat_template(tmp_path) and "add_generation_prompt" in CHAT_TEMPLATE
