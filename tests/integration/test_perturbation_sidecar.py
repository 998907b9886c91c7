"""The adaptive attacks of the perturbation tests, through the real sidecar's Protect RPC."""

from __future__ import annotations

import numpy as np
import pytest
from support.perturb import VARIANTS, error, full_vocab_logprobs, temperature_difference, topk_batch
from support.sidecar import SidecarProcess, write_config

from defense.types import LogprobBatch, LogprobsMode, Prompt, RequestContext
from server_plugins.client import SidecarClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perturb")
    defenses = [{"type": "keyed_noise", "params": {"sigma": 0.5, "keep_argmax": False}}]
    proc = SidecarProcess(write_config(tmp, overrides={"defenses": defenses}))
    yield proc
    proc.stop()


def admitted(c: SidecarClient, prompt: str, rid: str):
    return c.admit(RequestContext(request_id=rid, client_id="c1", model="tiny", prompt=Prompt(text=prompt)))


def test_repeats_and_variants_get_the_same_answer(sidecar):
    z = np.random.default_rng(7).normal(size=(32, 120)) * 2.5
    clean = topk_batch(z, 20)
    with SidecarClient(sidecar.target, timeout_s=10) as c:
        answers = []
        for i, prompt in enumerate(VARIANTS):  # 16 whitespace/case variants, each admitted on its own
            adm = admitted(c, prompt, f"v{i}")
            out = c.protect(clean, request_id=f"v{i}", model="tiny", context_digest=adm.context_digest,
                            client_id="c1", profile=adm.profile)
            answers.append(out.batch.values.astype(np.float64))
        first = answers[0]
        assert error(first, clean) > 0.1
        for a in answers[1:]:
            np.testing.assert_array_equal(a, first)  # no variant gives a fresh draw to average
        assert error(np.mean(answers, axis=0), clean) == error(first, clean)


def test_temperature_differencing_through_protect(sidecar):
    z = np.random.default_rng(8).normal(size=(12, 60))
    with SidecarClient(sidecar.target, timeout_s=10) as c:
        adm = admitted(c, "Tell me a story.", "t0")
        answers = {}
        for mode in (LogprobsMode.PROCESSED, LogprobsMode.RAW):
            outs = []
            for t in (1.0, 2.0):
                lp = full_vocab_logprobs(z, t)
                ids = np.argsort(-lp, 1)
                b = LogprobBatch(values=np.take_along_axis(lp, ids, 1).astype(np.float32), token_ids=ids,
                                 temperature=t, logprobs_mode=mode)
                outs.append(c.protect(b, request_id="t0", model="tiny", context_digest=adm.context_digest,
                                      client_id="c1", profile=adm.profile).batch)
            est = temperature_difference(outs[0], outs[1], 1.0, 2.0)
            answers[mode] = float(np.abs(est - (z - z.mean(1, keepdims=True))).mean())
    # declared processed: noise entered as n / T, differencing gives logits + noise
    assert answers[LogprobsMode.PROCESSED] > 0.3
    # processed logprobs mislabeled raw get the noise after temperature: differencing strips it
    assert answers[LogprobsMode.RAW] < 2e-3
