"""The generic per-example gradient path, for parameters no layer rule covers.

``torch.func``: ``vmap`` over examples of a ``vjp`` of the whole model, ``vmap`` over the
class slots' cotangents. Where ``vmap`` cannot batch the model, a loop over examples
with one batched ``autograd.grad`` each. Exact either way, slower than the layer rules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..utils import user_stacklevel
from ._inputs import ForwardWrapper, as_logits, example_rows, holds_text, tree_map

__all__ = ["generic_grads"]


def _first_sentence(msg: str, limit: int = 240) -> str:
    """The first sentence of an error message, cut at a word (never mid-word)."""
    msg = " ".join(msg.split())
    end = msg.find(". ")
    if 0 <= end < limit:
        return msg[: end + 1]
    return msg if len(msg) <= limit else msg[:limit].rsplit(" ", 1)[0] + " ..."


def generic_grads(model: nn.Module, forward: Callable, names: Sequence[str],
                  params: Sequence[torch.Tensor], pids: Sequence[int], batch,
                  cot: torch.Tensor, *, allow_train_mode: bool,
                  warn_loop: bool = True) -> tuple[dict[int, torch.Tensor], bool]:
    """Per-example, per-slot gradients ``{pid: (B, c, numel)}`` of parameters ``pids``.

    Parameters
    ----------
    model : torch.nn.Module
        The model; ``forward(model, batch)`` gives its logits.
    forward : callable
    names, params : sequences
        Names (as in ``model.named_parameters()``) and tensors of every selected
        parameter, indexed by parameter id.
    pids : sequence of int
        The ids to compute.
    batch : tensor, dict, ...
        The batch, on the model's device.
    cot : torch.Tensor of shape (B, c, n_outputs)
        Logit cotangents of the class slots.
    allow_train_mode : bool
        Let ``vmap`` draw different randomness per example (dropout in training mode).
    warn_loop : bool, default=True
        Warn when falling back to the loop over examples.

    Returns
    -------
    grads : dict
    used_loop : bool
        Whether ``vmap`` failed and the loop over examples ran.
    """
    if not pids:
        return {}, False
    wrapper = ForwardWrapper(model, forward)
    pd = {"model." + names[i]: params[i].detach() for i in pids}

    def one(xb, cb):
        def f(pdict):
            xb1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, xb)
            return torch.func.functional_call(wrapper, pdict, (xb1,))[0]

        _, vjp_fn = torch.func.vjp(f, pd)
        return torch.func.vmap(vjp_fn)(cb)[0]

    if holds_text(batch):
        # vmap would hand every example the whole list of strings: the loop splits them
        reason = "a batch of strings"
    else:
        in_dims = tree_map(lambda v: 0 if isinstance(v, torch.Tensor) else None, batch)
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                res = torch.func.vmap(
                    one, in_dims=(in_dims, 0),
                    randomness="different" if allow_train_mode else "error",
                )(batch, cot)
            return {i: res["model." + names[i]].reshape(cot.shape[0], cot.shape[1], -1)
                    for i in pids}, False
        except Exception as exc:  # noqa: BLE001 - any vmap failure: exact slow path
            reason = f"{type(exc).__name__}: {_first_sentence(str(exc))}"
    if warn_loop:
        warnings.warn(
            f"torch.func.vmap could not batch the generic per-example gradient path "
            f"({reason}); falling back to a loop over examples (exact but slow).",
            stacklevel=user_stacklevel(),
        )
    B, c = cot.shape[0], cot.shape[1]
    out = {i: [] for i in pids}
    plist = [params[i] for i in pids]
    for b in range(B):
        xb = example_rows(batch, b, b + 1)
        with torch.enable_grad():
            lg = as_logits(forward(model, xb))
            gs = torch.autograd.grad(
                lg, plist, grad_outputs=cot[b][:, None, :], is_grads_batched=True,
                allow_unused=True,
            )
        for i, gi in zip(pids, gs, strict=True):
            if gi is None:
                gi = torch.zeros((c,) + tuple(params[i].shape), dtype=cot.dtype,
                                 device=cot.device)
            out[i].append(gi.reshape(c, -1))
    return {i: torch.stack(v) for i, v in out.items()}, True
