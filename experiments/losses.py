"""Distillation losses as pure torch functions (property-tested in tests/unit/experiments).

A top-k logprob answer is a distribution over the K returned tokens plus one "rest" bucket holding the
mass the API withheld (1 - returned mass); the student is fit to it by forward KL on those K + 1 buckets,
which is what an attacker with OpenAI-style ``top_logprobs`` can compute exactly.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["soft_cross_entropy", "topk_kd_loss"]

_TINY = 1e-12  # floor for a probability inside a log: keeps gradients finite where the target is 0


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_c p_c log q_c; logits [N, C] (student), target [N, C] probabilities.

    Equals ``F.cross_entropy`` for one-hot targets and is minimized (at the target's entropy) when the
    student's softmax equals the target.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def topk_kd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL(teacher || student) on the returned top-k plus the unreturned rest.

    student_logits: [M, V] float; target_ids: [M, K] int64 with -1 for a missing alternative;
    target_logprobs: [M, K] float, the returned logprobs (values under -1 ids are ignored).
    Returns the mean over the M rows (``reduction="none"``: [M]). Zero exactly when the student puts the
    returned probability on each returned token and the rest on everything else.
    """
    if student_logits.ndim != 2 or target_ids.shape != target_logprobs.shape or target_ids.ndim != 2:
        raise ValueError(f"expected logits [M, V] and ids/logprobs [M, K], got {tuple(student_logits.shape)}, "
                         f"{tuple(target_ids.shape)}, {tuple(target_logprobs.shape)}")
    if target_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"row counts differ: {student_logits.shape[0]} logits rows, {target_ids.shape[0]} targets")
    present = target_ids >= 0  # [M, K]
    safe_ids = target_ids.clamp(min=0)
    m, v = student_logits.shape
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # [M, V]
    log_q_k = log_q.gather(1, safe_ids)  # [M, K]
    # the student's rest: logsumexp over the tokens not returned (exact, unlike log(1 - sum q_k)); missing
    # slots mark a scratch column V, so they can never unmark a returned token
    marks = torch.where(present, target_ids, torch.full_like(target_ids, v))
    returned = torch.zeros((m, v + 1), dtype=torch.bool, device=log_q.device).scatter(1, marks, True)[:, :v]
    log_q_rest = torch.logsumexp(log_q.masked_fill(returned, float("-inf")), dim=-1)  # [M]
    covers_all = returned.all(dim=-1)  # every token returned: the rest is empty on both sides

    p_k = torch.where(present, target_logprobs.float().exp(), torch.zeros_like(log_q_k))
    p_rest = (1.0 - p_k.sum(dim=-1)).clamp(min=0.0)
    p_rest = torch.where(covers_all, torch.zeros_like(p_rest), p_rest)
    log_p_k = torch.log(p_k.clamp(min=_TINY))
    kl_k = torch.where(p_k > 0, p_k * (log_p_k - log_q_k), torch.zeros_like(p_k)).sum(dim=-1)
    # a student that returns every token as "returned" has log_q_rest = -inf; p_rest is then 0 as well
    kl_rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=_TINY)) - log_q_rest.clamp(min=-1e4)),
                          torch.zeros_like(p_rest))
    loss = kl_k + kl_rest  # [M]
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
