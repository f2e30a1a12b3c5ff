"""The class axis: which output vectors represent each example's Fisher.

For a softmax classifier with probabilities ``p`` and logits ``z``, the Fisher of an
example is ``F = sum_j a_j a_j^T`` with ``a_j = sqrt(p_j) grad log p_j``. Since
``grad log p_j = J^T (e_j - p)`` (``J`` the logits' Jacobian), each ``a_j`` is one
backward pass of the logit cotangent ``sqrt(p_j) (e_j - p)``. Slot ``j`` holds the
``j``-th most probable class; the first ``n_slots`` classes are kept, and those below
``min_class_prob`` are dropped (their slots are zero).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["class_cotangents"]


def class_cotangents(logits: torch.Tensor, n_slots: int,
                     min_class_prob: float | None = None) -> tuple[torch.Tensor, int]:
    """Logit cotangents of the class slots of every example.

    Parameters
    ----------
    logits : torch.Tensor of shape (B, K)
        The model's logits.
    n_slots : int
        Class slots kept per example (the most probable classes first).
    min_class_prob : float, default=None
        Classes less probable than this get a zero slot.

    Returns
    -------
    cotangents : torch.Tensor of shape (B, c, K)
        ``sqrt(p_j) (e_j - p)`` for the slot classes, in the logits' dtype (computed in
        float64); ``c`` is the largest number of slots any example keeps.
    c : int
        Number of slots (0 when every class of every example is dropped).
    """
    lg = logits.detach().to(torch.float64)
    probs = torch.softmax(lg, dim=1)
    B, K = probs.shape
    c = min(n_slots, K)
    p_sorted, order = torch.sort(probs, dim=1, descending=True)
    p_sorted, order = p_sorted[:, :c], order[:, :c]
    keep = torch.ones_like(p_sorted, dtype=torch.bool)
    if min_class_prob is not None:
        keep &= p_sorted >= float(min_class_prob)
    n_kept = keep.sum(1)
    c_eff = int(n_kept.max()) if B else 0
    p_sorted, order, keep = p_sorted[:, :c_eff], order[:, :c_eff], keep[:, :c_eff]
    onehot = F.one_hot(order, K).to(torch.float64)
    cot = torch.sqrt(p_sorted)[..., None] * (onehot - probs[:, None, :])
    cot = cot * keep[..., None]
    return cot.to(logits.dtype), c_eff
