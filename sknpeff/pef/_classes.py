"""The class axis: which output vectors represent each example's Fisher.

For a softmax classifier with probabilities ``p`` and logits ``z``, the Fisher of an
example is ``F = sum_j a_j a_j^T`` with ``a_j = sqrt(p_j) grad log p_j``. Since
``grad log p_j = J^T (e_j - p)`` (``J`` the logits' Jacobian), each ``a_j`` is one
backward pass of the logit cotangent ``sqrt(p_j) (e_j - p)``. Slot ``j`` holds the
``j``-th most probable class; the first ``n_slots`` classes are kept, and those below
``min_class_prob`` are dropped (their slots are zero).

For independent sigmoid outputs (a binary classifier with one logit, or a multi-label
head), each logit ``z_c`` is a Bernoulli variable with ``s_c = sigmoid(z_c)`` and
``F = sum_c s_c (1 - s_c) grad z_c grad z_c^T``: slot ``c`` is one backward pass of the
cotangent ``sqrt(s_c (1 - s_c)) e_c``. Slots go by decreasing weight ``s_c (1 - s_c)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["OUTPUTS", "class_cotangents", "predictions", "resolve_output"]

#: output distributions the logits can parametrize
OUTPUTS = ("softmax", "sigmoid")


def resolve_output(output: str, n_outputs: int) -> str:
    """``"softmax"`` or ``"sigmoid"``; ``"auto"``: sigmoid for a single logit (a binary
    classifier), softmax otherwise (a softmax over one logit has a zero Fisher)."""
    if output == "auto":
        return "sigmoid" if n_outputs == 1 else "softmax"
    return output


def predictions(logits: np.ndarray, output: str) -> np.ndarray:
    """Predicted class per example: ``argmax`` of the logits; for one sigmoid logit,
    ``1`` where it is positive (multi-label heads: the most probable label)."""
    if output == "sigmoid" and logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(axis=1).astype(np.int64)


def class_cotangents(logits: torch.Tensor, n_slots: int,
                     min_class_prob: float | None = None,
                     output: str = "softmax") -> tuple[torch.Tensor, int]:
    """Logit cotangents of the class slots of every example.

    Parameters
    ----------
    logits : torch.Tensor of shape (B, K)
        The model's logits.
    n_slots : int
        Class slots kept per example (the most probable classes first).
    min_class_prob : float, default=None
        Classes less probable than this get a zero slot (softmax only).
    output : {"softmax", "sigmoid"}, default="softmax"
        The distribution the logits parametrize (see the module docstring).

    Returns
    -------
    cotangents : torch.Tensor of shape (B, c, K)
        ``sqrt(p_j) (e_j - p)`` for the slot classes, in the logits' dtype (computed in
        float64); ``c`` is the largest number of slots any example keeps.
    c : int
        Number of slots (0 when every class of every example is dropped).
    """
    lg = logits.detach().to(torch.float64)
    if output == "sigmoid":
        return _bernoulli_cotangents(lg, n_slots, logits.dtype)
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
    # sqrt(p_j) (e_j - p) built in one (B, c, K) array: no one-hot of that size beside it
    # (K may be a vocabulary)
    root = torch.sqrt(p_sorted) * keep
    cot = root[..., None] * -probs[:, None, :]
    cot.scatter_add_(2, order[..., None], root[..., None])
    return cot.to(logits.dtype), c_eff


def _bernoulli_cotangents(lg: torch.Tensor, n_slots: int, dtype) -> tuple[torch.Tensor, int]:
    B, K = lg.shape
    c = min(n_slots, K)
    s = torch.sigmoid(lg)
    weight = s * (1.0 - s)
    w_sorted, order = torch.sort(weight, dim=1, descending=True, stable=True)
    w_sorted, order = w_sorted[:, :c], order[:, :c]
    cot = lg.new_zeros((B, c, K))
    cot.scatter_(2, order[..., None], torch.sqrt(w_sorted)[..., None])
    return cot.to(dtype), c if B else 0
