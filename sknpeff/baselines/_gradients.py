"""Per-example gradients of one log-probability, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..layout import select_parameters
from ..pef._inputs import (
    ForwardWrapper,
    as_logits,
    check_logits,
    default_forward,
    example_rows,
    holds_text,
    iter_batches,
    to_device,
    tree_map,
)

__all__ = ["iter_log_prob_gradients", "log_prob"]


def log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(label | x)`` per row of ``logits``: softmax over the outputs, or, for a
    model with one logit ``z``, a Bernoulli variable (``log sigmoid(z)`` for label 1,
    ``log sigmoid(-z)`` for label 0)."""
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        return torch.nn.functional.logsigmoid(torch.where(labels == 1, z, -z))
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _labels_of(logits: torch.Tensor, y, b0: int, n_outputs: int) -> torch.Tensor:
    """The predicted labels (``y`` is None) or ``y[b0 : b0 + batch]``, checked."""
    b = logits.shape[0]
    if y is None:
        if n_outputs == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)
    lab = torch.as_tensor(np.asarray(y[b0 : b0 + b]), device=logits.device).long()
    if lab.shape != (b,):
        raise ValueError(f"y must hold one label per example; got {len(y)} labels.")
    hi = 2 if n_outputs == 1 else n_outputs
    if bool(((lab < 0) | (lab >= hi)).any()):
        raise ValueError(f"y must hold labels in [0, {hi - 1}] (the model's outputs).")
    return lab


def iter_log_prob_gradients(
    model: nn.Module, X, y=None, *, params=None,
    forward: Callable | None = None, batch_size: int = 32,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """For each batch of ``X``, the ``(batch, n_params)`` gradients of ``log p(label | x)``.

    The label is the predicted class (``y=None``) or ``y``. Parameters are those selected
    by ``params`` (as in :class:`~sknpeff.pef.PEFTransformer`), flattened in the order of
    :class:`~sknpeff.layout.ParameterLayout`. Gradients are computed with
    ``torch.func.vmap`` over the examples of a batch; batches that ``vmap`` cannot split
    (lists of strings, models with data-dependent control flow) go one example at a time.
    The model is not modified.
    """
    chosen = select_parameters(model, params)
    names = [n for n, _ in chosen]
    fwd = forward if forward is not None else default_forward
    p0 = chosen[0][1]
    device = p0.device if device is None else device
    wrapper = ForwardWrapper(model, fwd)
    detached = {"model." + n: p.detach() for n, p in chosen}

    def one(p, example, label):
        batch = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t,
                         example)
        logits = as_logits(functional_call(wrapper, p, (batch,)))
        return log_prob(logits, label.unsqueeze(0))[0]

    per_example_grad = vmap(grad(one), in_dims=(None, 0, 0))
    use_vmap = True
    b0 = 0
    for batch in iter_batches(X, batch_size):
        batch = to_device(batch, device, p0.dtype)
        with torch.no_grad():
            logits = as_logits(fwd(model, batch))
        check_logits(logits)
        labels = _labels_of(logits, y, b0, int(logits.shape[1]))
        b = int(logits.shape[0])
        g = None
        if use_vmap and not holds_text(batch):
            try:
                gd = per_example_grad(detached, batch, labels)
                g = torch.cat([gd["model." + n].reshape(b, -1) for n in names], dim=1)
            except (RuntimeError, ValueError, NotImplementedError):
                use_vmap = False  # the loop below computes the same, slower
        if g is None:
            rows = []
            plist = [p for _, p in chosen]
            for i in range(b):
                with torch.enable_grad():
                    lg = as_logits(fwd(model, example_rows(batch, i, i + 1)))
                    lp = log_prob(lg, labels[i : i + 1])[0]
                    gs = torch.autograd.grad(lp, plist, allow_unused=True)
                rows.append(torch.cat([
                    (gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                    for gi, p in zip(gs, plist, strict=True)]))
            g = torch.stack(rows)
        b0 += b
        yield g.detach()
