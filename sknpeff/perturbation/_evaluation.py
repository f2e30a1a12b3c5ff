"""The model under a perturbation: parameters shifted and restored, log-probabilities,
KL divergences and the gradient sign of the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import scipy.special
import torch
from torch import nn

from ..layout import ParameterLayout
from ..pef._classes import resolve_output
from ..pef._inputs import as_logits, iter_batches, n_examples, to_device
from ..pef._position import PositionForward, attach_positions, check_position

__all__ = ["applied", "kl_divergence", "log_probs", "loss_grad_sign"]


@contextlib.contextmanager
def applied(params: Sequence[torch.Tensor], layout: ParameterLayout,
            delta: np.ndarray) -> Iterator[None]:
    """``params`` shifted by the flat ``delta`` (layout order) inside the block; restored
    bit for bit on exit, also when the block raises."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float64))
            for p, (o, s) in zip(params, zip(layout.offsets, layout.sizes, strict=True),
                                 strict=True):
                p.add_(t[o:o + s].reshape(p.shape).to(device=p.device, dtype=p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _batches(X: Any, batch_size: int, params: Sequence[torch.Tensor],
             position: Any = None) -> Iterator[Any]:
    p0 = params[0]
    # as PEFTransformer does: with a position, ragged token ids are padded per batch,
    # and an array position travels with its batch's slice
    batches = iter_batches(X, int(batch_size), pad_ids=position is not None)
    if isinstance(position, np.ndarray):
        n = n_examples(X)
        if n is not None and n != position.shape[0]:
            raise ValueError(
                f"position holds {position.shape[0]} positions but X has {n} examples: give "
                "one position per example of X (or a position column of dict batches).")
        batches = attach_positions(batches, position)
    for batch in batches:
        yield to_device(batch, p0.device, p0.dtype)


def log_probs(model: nn.Module, forward: Callable | None, X: Any, batch_size: int,
              params: Sequence[torch.Tensor], output: str = "auto",
              position: Any = None) -> np.ndarray:
    """Log-probabilities of the model's predictive distribution on ``X``, float64.

    Softmax outputs: the log-softmax of the logits, ``(n_examples, n_outputs)``. Sigmoid
    outputs (see :func:`~sknpeff.pef._classes.resolve_output`): for every logit ``z``,
    ``log(1 - s), log(s)`` with ``s = sigmoid(z)``, ``(n_examples, 2 n_outputs)``, so that
    row sums of ``p0 (log p0 - log p1)`` are sums of Bernoulli KL divergences and, for
    one logit, the argmax is the predicted class.

    ``position`` picks the explained position of per-position logits, as for
    :class:`~sknpeff.PEFTransformer` (an array holds one position per example of ``X``).
    """
    fwd = PositionForward(forward, check_position(position))
    out = []
    with torch.no_grad():
        for batch in _batches(X, batch_size, params, fwd.position):
            logits = as_logits(fwd(model, batch))
            out.append(logits.detach().to("cpu", torch.float64).numpy())
    if not out:
        return np.zeros((0, 0))
    z = np.concatenate(out, axis=0)
    if resolve_output(output, z.shape[1]) == "sigmoid":
        # log sigmoid(-z), log sigmoid(z), pairwise per logit
        return -np.logaddexp(0.0, np.stack([z, -z], axis=2)).reshape(z.shape[0], -1)
    # (torch's CPU log_softmax has a large per-call overhead on tiny float64 batches)
    return scipy.special.log_softmax(z, axis=1)


def kl_divergence(lp0: np.ndarray, lp1: np.ndarray) -> np.ndarray:
    """Row-wise ``KL(p0 || p1)`` from log-probabilities (float64, clipped at 0)."""
    p0 = np.exp(lp0)
    with np.errstate(invalid="ignore"):
        terms = np.where(p0 > 0, p0 * (lp0 - lp1), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


def loss_grad_sign(model: nn.Module, forward: Callable | None, X: Any, batch_size: int,
                   params: Sequence[torch.Tensor], labels: np.ndarray | None,
                   output: str = "auto", position: Any = None) -> np.ndarray:
    """Sign of the gradient of the summed cross-entropy over ``X`` (flat, float64), with
    ``labels`` or, when ``None``, the model's own predictions as targets (binary
    cross-entropy of every logit for sigmoid outputs); ``position`` as in
    :func:`log_probs`."""
    fwd = PositionForward(forward, check_position(position))
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    start = 0
    for batch in _batches(X, batch_size, params, fwd.position):
        logits = as_logits(fwd(model, batch))
        b = logits.shape[0]
        sigmoid = resolve_output(output, logits.shape[1]) == "sigmoid"
        if labels is None:
            y = (logits.detach() > 0).long() if sigmoid else logits.detach().argmax(dim=1)
        else:
            y = torch.as_tensor(np.asarray(labels[start:start + b]),
                                device=logits.device).long()
        start += b
        if sigmoid:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.double(), y.reshape(logits.shape).double(), reduction="sum")
        else:
            loss = torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum")
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(grads, gs, strict=True):
            if g is not None:
                acc += g.double()
    flat = torch.cat([g.reshape(-1) for g in grads]).cpu().numpy()
    return np.sign(flat)
