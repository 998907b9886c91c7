"""Distillation losses: properties of the soft cross entropy and the top-k KD loss (hypothesis)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.nn import functional as F

from experiments.losses import soft_cross_entropy, topk_kd_loss


@st.composite
def logit_matrix(draw, rows=(1, 5), cols=(2, 16)):
    shape = (draw(st.integers(*rows)), draw(st.integers(*cols)))
    return torch.tensor(draw(arrays(np.float64, shape, elements=st.floats(-6, 6))), dtype=torch.float32)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(logit_matrix(), st.data())
def test_soft_cross_entropy_equals_cross_entropy_on_one_hot_targets(logits, data):
    labels = torch.tensor([data.draw(st.integers(0, logits.shape[1] - 1)) for _ in range(logits.shape[0])])
    one_hot = F.one_hot(labels, logits.shape[1]).float()
    assert soft_cross_entropy(logits, one_hot).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)


@settings(deadline=None)  # timing varies on a shared 2-core machine
@given(logit_matrix(), logit_matrix())
def test_soft_cross_entropy_is_smallest_at_the_target(a, b):
    if a.shape != b.shape:
        b = torch.zeros_like(a)
    target = torch.softmax(a, dim=-1)
    at_target = soft_cross_entropy(a, target).item()
    assert soft_cross_entropy(b, target).item() >= at_target - 1e-5


@st.composite
def kd_case(draw):
    """A teacher distribution, the top-k it returns (some slots missing), and a student's logits."""
    m, v = draw(st.integers(1, 4)), draw(st.integers(3, 20))
    k = draw(st.integers(1, v))
    teacher = torch.tensor(draw(arrays(np.float64, (m, v), elements=st.floats(-5, 5))), dtype=torch.float32)
    student = torch.tensor(draw(arrays(np.float64, (m, v), elements=st.floats(-5, 5))), dtype=torch.float32)
    lp = F.log_softmax(teacher, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    missing = torch.tensor(draw(arrays(np.bool_, (m, k))))
    missing[:, 0] = False  # at least one returned alternative per row
    ids = torch.where(missing, torch.full_like(ids, -1), ids)
    vals = torch.where(missing, torch.full_like(vals, 123.0), vals)  # garbage under -1 must be ignored
    return teacher, student, ids, vals


@settings(max_examples=60, deadline=None)
@given(kd_case())
def test_topk_kd_is_nonnegative(case):
    _, student, ids, vals = case
    assert (topk_kd_loss(student, ids, vals, reduction="none") >= -1e-5).all()


@settings(max_examples=60, deadline=None)
@given(kd_case())
def test_topk_kd_is_zero_for_the_teacher_itself(case):
    """The teacher matches its own returned top-k and rest exactly."""
    teacher, _, ids, vals = case
    assert topk_kd_loss(teacher, ids, vals).item() == pytest.approx(0.0, abs=1e-4)


@settings(max_examples=50, deadline=None)
@given(kd_case(), st.randoms())
def test_topk_kd_ignores_the_order_of_alternatives(case, rnd):
    _, student, ids, vals = case
    perm = list(range(ids.shape[1]))
    rnd.shuffle(perm)
    a = topk_kd_loss(student, ids, vals)
    b = topk_kd_loss(student, ids[:, perm], vals[:, perm])
    assert a.item() == pytest.approx(b.item(), abs=1e-5)


@settings(max_examples=50, deadline=None)
@given(kd_case())
def test_topk_kd_with_every_token_returned_is_the_full_kl(case):
    teacher, student, _, _ = case
    v = teacher.shape[1]
    lp = F.log_softmax(teacher, dim=-1)
    ids = torch.arange(v).expand(teacher.shape[0], v)
    full = (lp.exp() * (lp - F.log_softmax(student, dim=-1))).sum(-1).mean()
    assert topk_kd_loss(student, ids, lp).item() == pytest.approx(full.item(), abs=1e-4)


def test_topk_kd_gradient_pulls_the_student_toward_the_returned_answer():
    torch.manual_seed(0)
    teacher = torch.randn(8, 30) * 2
    lp = F.log_softmax(teacher, dim=-1)
    vals, ids = lp.topk(5, dim=-1)
    student = torch.zeros(8, 30, requires_grad=True)
    opt = torch.optim.Adam([student], lr=0.3)
    first = None
    for _ in range(100):
        loss = topk_kd_loss(student, ids, vals)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    assert torch.equal(student.argmax(-1), teacher.argmax(-1))


def test_topk_kd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="row counts differ"):
        topk_kd_loss(torch.zeros(3, 5), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="expected logits"):
        topk_kd_loss(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 3))
    assert math.isfinite(topk_kd_loss(torch.zeros(1, 4), torch.tensor([[0]]), torch.tensor([[0.0]])).item())
