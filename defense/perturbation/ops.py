"""Array math shared by the output perturbations, on numpy arrays or torch tensors (CPU or CUDA).

Everything works on the last axis ([..., K] alternatives or classes) and broadcasts over the leading
ones (positions, batch), so one call handles a whole response or a whole engine batch. Logprob values are
natural-log probabilities; a missing alternative is ``present == False`` and its value is ignored.

The one move every logit-space perturbation makes is ``shift_logprobs``: add a perturbation to the
logprobs, optionally keep the argmax, then renormalize so the returned alternatives keep the total mass
they had (top-k logprobs: OpenAI-style clients expect the top-k's sum to stay what the model gave) or sum
to one (full probability vectors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_torch", "logsumexp", "shift_logprobs", "where_present"]

# keeps the clean argmax strictly on top after a float32 round trip: float32 spacing at logprob -20 is
# 2e-6, so 1e-4 nats survives the cast while being far below anything a user can see (0.01% relative)
ARGMAX_MARGIN = 1e-4


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def logsumexp(x: Any, *, keepdims: bool = True) -> Any:
    """Over the last axis; an all -inf row gives -inf (not NaN)."""
    if is_torch(x):
        import torch

        return torch.logsumexp(x, dim=-1, keepdim=keepdims)
    # array methods, not np.max/np.sum: their dispatch costs more than the math on a [16, 5] response
    m = x.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(x - safe).sum(axis=-1, keepdims=True)) + safe
    return out if keepdims else out[..., 0]


def where_present(present: Any, x: Any, fill: float) -> Any:
    if is_torch(x):
        import torch

        return torch.where(present, x, torch.full_like(x, fill))
    return np.where(present, x, fill)


def _argmax_mask(lp: Any) -> Any:
    """[..., K] bool, True at the first maximum of each row."""
    if is_torch(lp):
        import torch

        idx = torch.argmax(lp, dim=-1, keepdim=True)
        return torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, idx, True)
    return np.arange(lp.shape[-1]) == lp.argmax(axis=-1)[..., None]


def shift_logprobs(
    values: Any,
    present: Any,
    delta: Any,
    *,
    keep_argmax: bool = True,
    normalize: bool = False,
) -> tuple[Any, Any]:
    """Return ``(new_values, shift)``: logprobs after adding ``delta``, renormalized.

    values, present, delta: [..., K]. ``normalize=False`` keeps each row's total mass (top-k logprobs);
    ``normalize=True`` makes each row sum to one (full probability vectors). With ``keep_argmax`` no
    alternative ends above the row's clean maximum. ``shift`` ([..., 1]) is what was subtracted from
    ``values + delta`` to renormalize; applying the same shift to a token outside the returned
    alternatives keeps it consistent with them. Missing slots come back as -inf.
    """
    torch_mode = is_torch(values)
    lp = where_present(present, values, -np.inf)
    target = 0.0 if normalize else logsumexp(lp)
    moved = where_present(present, lp + delta, -np.inf)
    if keep_argmax:
        top = _argmax_mask(lp)
        if torch_mode:
            import torch

            top_val = torch.where(top, moved, torch.full_like(moved, -np.inf)).amax(dim=-1, keepdim=True)
            moved = torch.where(top, moved, torch.minimum(moved, top_val - ARGMAX_MARGIN))
        else:
            top_val = np.where(top, moved, -np.inf).max(axis=-1, keepdims=True)
            moved = np.where(top, moved, np.minimum(moved, top_val - ARGMAX_MARGIN))
    shift = logsumexp(moved) - target
    if torch_mode:
        import torch

        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        out = torch.clamp(moved - shift, max=0.0)
    else:
        shift = np.where(np.isfinite(shift), shift, 0.0)
        out = np.minimum(moved - shift, 0.0)
    return out, shift
