"""OpenAI request bodies: what admission reads, what is refused, and the body the engine gets."""

from __future__ import annotations

import json

import pytest

from defense.types import NO_REWRITES, Api, Prompt, Rewrites
from server_plugins.openai.exchange import normalize_path
from server_plugins.openai.request import BadRequest, parse_request, rewrite_body

C, CHAT = Api.OPENAI_COMPLETIONS, Api.OPENAI_CHAT


def body(**kw) -> bytes:
    return json.dumps({"model": "tiny", **kw}).encode()


def test_completion_fields():
    r = parse_request(C, body(prompt="Hi there", max_tokens=7, n=2, temperature=0.5, seed=3, logprobs=5,
                              logit_bias={"1": 2, "3": -1}, echo=True, prompt_logprobs=0, stream=True,
                              stream_options={"include_usage": True}))
    assert r.prompt == Prompt(text="Hi there")
    assert (r.max_tokens, r.n, r.temperature, r.seed) == (7, 2, 0.5, 3)
    assert (r.logprobs, r.top_logprobs, r.logit_bias_entries, r.echo, r.stream, r.include_usage) == (
        True, 5, 2, True, True, True)
    assert r.prompt_logprobs  # vLLM's prompt_logprobs=0 still returns each prompt token's logprob
    ctx = r.context(request_id="r1", client_id="c1", tenant="t")
    assert (ctx.top_logprobs, ctx.logprobs, ctx.n, ctx.model) == (5, True, 2, "tiny")


def test_chat_fields_and_content_parts():
    r = parse_request(CHAT, body(messages=[{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                        {"type": "image_url", "image_url": {"url": "x"}}]}],
                                 logprobs=True, top_logprobs=20, max_completion_tokens=9, max_tokens=50))
    assert r.prompt.chat[0].content == "Be brief."
    assert r.prompt.chat[1].content.startswith("Hello\n{") and '"image_url"' in r.prompt.chat[1].content
    assert (r.logprobs, r.top_logprobs, r.max_tokens) == (True, 20, 9)


@pytest.mark.parametrize("raw, match", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "not a JSON number"),
    (b'\xff\xfe{"model"', "not valid JSON"),
    (body(prompt=""), None),  # an empty string prompt is a prompt
    (json.dumps({"prompt": "x"}).encode(), "model is required"),
    (body(prompt=["a", "b"]), "one prompt per request"),
    (body(prompt=[[1, 2], [3]]), "one prompt per request"),
    (body(prompt=[]), "prompt must be"),
    (body(prompt={"text": "x"}), "prompt must be"),
    (body(prompt="x", prompt_embeds="AAAA"), "prompt_embeds"),
    (body(prompt="x", logprobs="5"), "logprobs must be an integer"),
    (body(prompt="x", logprobs=True), "logprobs must be an integer"),
    (body(prompt="x", n=0), "n must be in"),
    (body(prompt="x", max_tokens=2**40), "max_tokens must be in"),
    (body(prompt="x", temperature=-1), "temperature must be"),
    (body(prompt="x", logit_bias=[1, 2]), "logit_bias must be"),
    (body(prompt="x", vllm_xargs="dg_sig=1"), "vllm_xargs must be"),
    (body(prompt="x", stream="yes"), "stream must be"),
])
def test_bad_bodies_are_refused_with_a_reason(raw, match):
    if match is None:
        assert parse_request(C, raw).prompt == Prompt(text="")
        return
    with pytest.raises(BadRequest, match=match):
        parse_request(C, raw)


def test_chat_needs_messages():
    with pytest.raises(BadRequest, match="messages"):
        parse_request(CHAT, body(messages=[]))
    with pytest.raises(BadRequest, match="role"):
        parse_request(CHAT, body(messages=[{"content": "x"}]))


def test_token_id_prompts():
    assert parse_request(C, body(prompt=[5, 6, 7])).prompt == Prompt(token_ids=(5, 6, 7))
    assert parse_request(C, body(prompt=[[5, 6]])).prompt == Prompt(token_ids=(5, 6))
    assert parse_request(C, body(prompt=["only"])).prompt == Prompt(text="only")


def rewritten(api, raw, rw=NO_REWRITES, *, xargs=None, client_xargs=(), default=256):
    return json.loads(rewrite_body(parse_request(api, raw), rw, xargs=xargs or {}, client_xargs=client_xargs,
                                   default_max_tokens=default))


def test_rewrites_apply_to_the_body():
    out = rewritten(C, body(prompt="x", logprobs=20, logit_bias={"1": 5}, echo=True, prompt_logprobs=3, n=4,
                            best_of=6, max_tokens=500),
                    Rewrites(top_logprobs=5, drop_logit_bias=True, drop_echo=True, drop_prompt_logprobs=True,
                             n=2, max_tokens=100))
    assert out["logprobs"] == 5 and out["n"] == 2 and out["best_of"] == 2 and out["max_tokens"] == 100
    assert not {"logit_bias", "echo", "prompt_logprobs"} & out.keys()


def test_all_logprobs_is_clamped_like_any_value_above_the_cap():
    assert rewritten(CHAT, body(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=-1),
                     Rewrites(top_logprobs=5))["top_logprobs"] == 5


def test_max_tokens_is_filled_so_the_reservation_bounds_the_answer():
    assert rewritten(C, body(prompt="x"), default=64)["max_tokens"] == 64
    chat = rewritten(CHAT, body(messages=[{"role": "user", "content": "x"}], max_completion_tokens=10),
                     Rewrites(max_tokens=4))
    assert chat["max_completion_tokens"] == 4 and "max_tokens" not in chat


def test_streams_ask_the_engine_for_usage():
    out = rewritten(C, body(prompt="x", stream=True, stream_options={"continuous_usage_stats": False}))
    assert out["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert "stream_options" not in rewritten(C, body(prompt="x"))


def test_client_xargs_are_stripped_and_ours_added():
    forged = {"dg_profile": "00", "dg_sig": "11", "dg_kid": "k", "dg_exp": "9999999999999", "dg_rid": "r",
              "force_token": 42, "mine": 1}
    out = rewritten(C, body(prompt="x", vllm_xargs=forged), xargs={"dg_sig": "aa", "dg_rid": "dg-1"},
                    client_xargs=("mine",))
    assert out["vllm_xargs"] == {"mine": 1, "dg_sig": "aa", "dg_rid": "dg-1"}
    assert "vllm_xargs" not in rewritten(C, body(prompt="x", vllm_xargs={"force_token": 1}))


@pytest.mark.parametrize("raw, want", [
    ("/v1/completions", "/v1/completions"),
    ("/v1/completions?x=1", "/v1/completions"),
    ("/v1/%63ompletions", "/v1/completions"),
    ("//v1//chat/./completions", "/v1/chat/completions"),
    ("/v1/models/../completions", "/v1/completions"),
    ("/v1/../../v1/completions", "/v1/completions"),
    ("", "/"),
    ("/", "/"),
])
def test_paths_are_matched_as_an_app_would_route_them(raw, want):
    assert normalize_path(raw) == want
