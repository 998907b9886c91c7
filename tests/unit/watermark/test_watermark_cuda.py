"""A sampler step on a GPU does what it does on the host: the same green lists and the same Gumbel choices,
eager and fused (inductor's GPU kernels). Skipped where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

from defense.base import Deps
from defense.types import RequestContext
from defense.watermark import GreenListParams, GreenListWatermark, GumbelParams, GumbelWatermark

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

B, V, PREFIX = 16, 32000, 6


def _batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, V, generator=g) * 3
    prefixes = torch.randint(0, V, (B, PREFIX), generator=g).tolist()
    ctxs = [RequestContext(request_id=f"r{i}", client_id=f"c{i % 3}", temperature=0.7 if i % 5 else 0.0)
            for i in range(B)]
    return logits, prefixes, ctxs


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("hashing", ["lefthash", "selfhash"])
def test_green_list_step_on_cuda_equals_the_host_step(ring, fused, hashing):
    logits, prefixes, ctxs = _batch()
    params = GreenListParams(gamma=0.25, delta=2.0, context=2, hashing=hashing)
    host = GreenListWatermark(params, deps=Deps(keys=ring)).process_logits(logits, prefixes, ctxs)
    params = GreenListParams(gamma=0.25, delta=2.0, context=2, hashing=hashing, fused=fused)
    gpu = GreenListWatermark(params, deps=Deps(keys=ring)).process_logits(logits.cuda(), prefixes, ctxs)
    assert gpu.device.type == "cuda"
    assert torch.equal((host - logits) > 1, (gpu.cpu() - logits) > 1)  # the same green tokens on every row
    assert torch.allclose(host, gpu.cpu())


@pytest.mark.parametrize("fused", [False, True])
def test_gumbel_step_on_cuda_chooses_what_the_host_chooses(ring, fused):
    logits, prefixes, ctxs = _batch()
    host = GumbelWatermark(GumbelParams(context=2), deps=Deps(keys=ring)).process_logits(logits, prefixes, ctxs)
    d = GumbelWatermark(GumbelParams(context=2, fused=fused), deps=Deps(keys=ring))
    gpu = d.process_logits(logits.cuda(), prefixes, ctxs)
    assert torch.equal(host.argmax(1), gpu.argmax(1).cpu())
    greedy = torch.tensor([c.temperature == 0 for c in ctxs])
    assert torch.equal(gpu.cpu()[greedy], logits[greedy])  # greedy rows are left as they came
