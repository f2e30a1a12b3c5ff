"""The class axis: which output vectors represent each example's Fisher.

For a softmax classifier with probabilities ``p`` and logits ``z``, the Fisher of an
example is ``F = sum_j a_j a_j^T`` with ``a_j = sqrt(p_j) grad log p_j``. Since
``grad log p_j = J^T (e_j - p)`` (``J`` the logits' Jacobian), ``F = J^T M J`` with
``M = diag(p) - p p^T``, and every slot is one backward pass of a logit cotangent ``v``
(the slot's vector is ``J^T v``). ``class_axis`` picks the cotangents:

* ``"top"``: ``v_j = sqrt(p_j) (e_j - p)`` for the ``n_slots`` most probable classes
  (slot ``j`` holds the ``j``-th most probable class); those below ``min_class_prob``
  are dropped (their slots are zero). Exact on what it keeps.
* ``"eigen"``: with ``M = sum_k lambda_k u_k u_k^T`` (``lambda_k`` decreasing; ``M``
  has rank at most ``C - 1`` since ``M 1 = 0``), ``v_k = sqrt(lambda_k) u_k`` for the
  ``n_slots`` largest ``lambda_k``: the optimal rank-``n_slots`` truncation of ``M``, and
  ``F`` exactly with ``C - 1`` slots (one for a binary softmax).
* ``"sample"``: ``n_slots`` draws ``y_t ~ p``, ``v_t = (e_{y_t} - p) / sqrt(n_slots)``:
  an unbiased estimate of ``F``.
* ``"project"``: ``n_slots`` Gaussian combinations of the classes,
  ``v_t = sum_j w_tj sqrt(p_j) (e_j - p) / sqrt(n_slots)`` with ``w_tj ~ N(0, 1)``:
  unbiased too.

For independent sigmoid outputs (a binary classifier with one logit, or a multi-label
head), each logit ``z_c`` is a Bernoulli variable with ``s_c = sigmoid(z_c)`` and
``F = sum_c s_c (1 - s_c) grad z_c grad z_c^T`` (``M`` is diagonal). ``"top"`` and
``"eigen"`` both give slot ``c`` the cotangent ``sqrt(s_c (1 - s_c)) e_c``, by decreasing
weight ``s_c (1 - s_c)``; ``"sample"`` draws every label ``y_c ~ Bernoulli(s_c)``,
``v_t = (y - s) / sqrt(n_slots)``; ``"project"`` uses
``v_t = w_t * sqrt(s (1 - s)) / sqrt(n_slots)``.

The random draws of example ``i`` (its position in the data) come from a generator
seeded with ``(seed, i)``: the same whatever the batch size or the number of jobs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..utils import InvalidParameterError

__all__ = ["CLASS_AXES", "OUTPUTS", "class_cotangents", "example_generators", "n_class_slots",
           "predictions", "resolve_output", "softmax_hessian"]

#: output distributions the logits can parametrize
OUTPUTS = ("softmax", "sigmoid")
#: ways to pick the class slots (see the module docstring)
CLASS_AXES = ("top", "eigen", "sample", "project")
#: eigenvalues of M below this fraction of the largest one are rounding noise (dropped)
EIGEN_RTOL = 1e-12
#: entries of the (chunk, C, C) matrices eigendecomposed at once
EIGEN_CHUNK = 2**24
#: most outputs "eigen" accepts: a C x C eigendecomposition per example (512 MB at 8192)
EIGEN_MAX_OUTPUTS = 8192


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


def n_class_slots(class_axis: str, n_classes: int | None, n_outputs: int, output: str) -> int:
    """Number of class slots per example for these options (checked).

    Parameters
    ----------
    class_axis : {"top", "eigen", "sample", "project"}
        How the slots are picked (see the module docstring).
    n_classes : int or None
        The number of slots asked for; ``None``: every class (``"top"``), the rank of
        ``M`` (``"eigen"``: ``C - 1`` for a softmax over ``C`` outputs).
    n_outputs : int
        Number of logits of the model.
    output : {"softmax", "sigmoid"}
        The output distribution.

    Returns
    -------
    n_slots : int
    """
    # the largest number of nonzero slots: M's rank (C - 1 for a softmax)
    rank = max(1, n_outputs - 1) if output == "softmax" else n_outputs
    if class_axis in ("sample", "project"):
        if n_classes is None:
            raise InvalidParameterError(
                f"class_axis={class_axis!r} needs n_classes, the number of "
                f"{'draws' if class_axis == 'sample' else 'projections'} per example (one "
                "backward pass each); got None.")
        return int(n_classes)
    if n_classes is not None and n_classes > n_outputs:
        raise ValueError(
            f"n_classes={n_classes} is larger than the model's number of outputs "
            f"({n_outputs}).")
    if class_axis == "eigen":
        if n_outputs > EIGEN_MAX_OUTPUTS:
            raise ValueError(
                f"class_axis='eigen' eigendecomposes a {n_outputs} x {n_outputs} matrix per "
                f"example (at most {EIGEN_MAX_OUTPUTS} outputs); for this many classes use "
                "class_axis='top', 'sample' or 'project'.")
        if n_classes is not None and n_classes > rank:
            raise ValueError(
                f"n_classes={n_classes} is larger than the rank of the output Fisher "
                f"({rank}: C - 1 for a softmax over C={n_outputs} outputs); with "
                "class_axis='eigen', n_classes=None keeps every eigenvector (the exact "
                "Fisher).")
        return rank if n_classes is None else int(n_classes)
    return n_outputs if n_classes is None else int(n_classes)


def class_cotangents(logits: torch.Tensor, n_slots: int,
                     min_class_prob: float | None = None,
                     output: str = "softmax", class_axis: str = "top",
                     seed: int | None = None, start: int = 0) -> tuple[torch.Tensor, int]:
    """Logit cotangents of the class slots of every example.

    Parameters
    ----------
    logits : torch.Tensor of shape (B, K)
        The model's logits.
    n_slots : int
        Class slots per example.
    min_class_prob : float, default=None
        Classes less probable than this get a zero slot (softmax, ``"top"`` only).
    output : {"softmax", "sigmoid"}, default="softmax"
        The distribution the logits parametrize (see the module docstring).
    class_axis : {"top", "eigen", "sample", "project"}, default="top"
        How the slots are picked (see the module docstring).
    seed : int, default=None
        Seed of the random draws (``"sample"``, ``"project"``; required there).
    start : int, default=0
        Index of the batch's first example in the data: example ``b`` of the batch
        draws from a generator seeded with ``(seed, start + b)``.

    Returns
    -------
    cotangents : torch.Tensor of shape (B, c, K)
        One logit cotangent per slot, in the logits' dtype (computed in float64).
    c : int
        Number of slots computed (at most ``n_slots``; fewer when every example's
        last slots are zero; 0 when all are).
    """
    lg = logits.detach().to(torch.float64)
    if class_axis in ("sample", "project"):
        if seed is None:
            raise ValueError(f"class_axis={class_axis!r} needs a seed.")
        cot = _random_cotangents(lg, n_slots, output, class_axis, seed, start)
        return cot.to(logits.dtype), n_slots if lg.shape[0] else 0
    if output == "sigmoid":  # M is diagonal: "eigen" is "top"
        return _bernoulli_cotangents(lg, n_slots, logits.dtype)
    if class_axis == "eigen":
        return _eigen_cotangents(lg, n_slots, logits.dtype)
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


def softmax_hessian(lg: torch.Tensor) -> torch.Tensor:
    """``M = diag(p) - p p^T`` of float64 logits ``(B, K)``, shape ``(B, K, K)``.

    The diagonal ``p_j (1 - p_j)`` is computed as ``-p_j expm1(log p_j)``: accurate for
    ``p_j`` near 1, where ``p_j - p_j ** 2`` cancels.
    """
    logp = torch.log_softmax(lg, dim=1)
    p = logp.exp()
    M = -p[:, :, None] * p[:, None, :]
    M.diagonal(dim1=1, dim2=2).copy_(-p * torch.expm1(logp))
    return M


def _eigen_cotangents(lg: torch.Tensor, n_slots: int, dtype) -> tuple[torch.Tensor, int]:
    B, K = lg.shape
    c = min(n_slots, max(1, K - 1))
    lams, vecs = [], []
    step = max(1, EIGEN_CHUNK // max(1, K * K))  # bounds the (chunk, K, K) matrices
    for b0 in range(0, B, step):
        lam, U = torch.linalg.eigh(softmax_hessian(lg[b0:b0 + step]))  # ascending
        lams.append(lam.flip(1)[:, :c])
        vecs.append(U.flip(2)[:, :, :c])
    if not B:
        return torch.zeros(0, c, K, dtype=dtype), 0
    lam, U = torch.cat(lams), torch.cat(vecs)  # (B, c), (B, K, c)
    # a fixed sign (largest entry positive): the same vectors whatever the batch
    big = U.abs().argmax(dim=1, keepdim=True)
    U = U * torch.where(U.gather(1, big) < 0, -1.0, 1.0)
    keep = (lam > 0) & (lam > EIGEN_RTOL * lam[:, :1])
    c_eff = int(keep.sum(1).max())
    scale = torch.sqrt(lam.clamp(min=0)) * keep
    cot = (U * scale[:, None, :]).transpose(1, 2)[:, :c_eff]
    return cot.contiguous().to(dtype), c_eff


def example_generators(seed: int, start: int, n: int) -> list[np.random.Generator]:
    """One generator per example, seeded with ``(seed, start + b)`` for ``b < n``."""
    return [np.random.default_rng([int(seed), start + b]) for b in range(n)]


def _random_cotangents(lg: torch.Tensor, n_slots: int, output: str, class_axis: str,
                       seed: int, start: int) -> torch.Tensor:
    B, K = lg.shape
    s = n_slots
    gens = example_generators(seed, start, B)
    # drawn on the host (the same numbers on every device), used where the logits are
    if class_axis == "project":
        w = torch.from_numpy(np.stack([g.standard_normal((s, K)) for g in gens])
                             if B else np.zeros((0, s, K))).to(lg.device)
    else:
        shape = (s, K) if output == "sigmoid" else (s,)
        u = torch.from_numpy(np.stack([g.random(shape) for g in gens])
                             if B else np.zeros((0, *shape))).to(lg.device)
    if output == "sigmoid":
        prob = torch.sigmoid(lg)
        if class_axis == "project":
            cot = w * torch.sqrt(prob * (1.0 - prob))[:, None, :]
        else:  # every label drawn: y_c ~ Bernoulli(s_c)
            cot = (u < prob[:, None, :]).to(torch.float64) - prob[:, None, :]
        return cot / np.sqrt(s)
    p = torch.softmax(lg, dim=1)
    if class_axis == "project":
        # sum_j w_tj sqrt(p_j) (e_j - p) = w_t * sqrt(p) - (w_t . sqrt(p)) p
        sq = torch.sqrt(p)
        cot = w * sq[:, None, :] - (w @ sq[:, :, None]) * p[:, None, :]
    else:
        cdf = torch.cumsum(p, dim=1)
        y = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=K - 1)
        # e_y - p without a one-hot of the same size
        cot = (-p[:, None, :]).expand(-1, y.shape[1], -1).clone()
        cot.scatter_add_(2, y[..., None], torch.ones_like(y[..., None], dtype=cot.dtype))
    return cot / np.sqrt(s)
