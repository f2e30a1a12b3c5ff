"""Hugging Face ``Conv1D`` (GPT-2's attention and MLP projections): ``y = x @ W + b``
with ``W`` of shape ``(in, out)``, a transposed ``nn.Linear``.

Found by duck typing (the class named ``Conv1D`` of a ``transformers`` module, with
``nf``, ``weight`` of shape ``(in, nf)`` and ``bias``), so sknpeff needs no import of
``transformers``. The rule is checked exactly on the first batch like every rule.
"""

from __future__ import annotations

import torch
from torch import nn

from ._contribution import Contribution
from ._registry import LayerRule

__all__ = ["HFConv1DRule", "duck_typed_rule"]


class HFConv1DRule(LayerRule):
    """Per-example gradients of a ``transformers`` ``Conv1D``: the weight's is
    ``x^T @ grad_output`` summed over positions, laid out ``(in, out)``."""

    def contributions(self, module, x, g, wanted, batch_terms):
        out: dict[str, Contribution] = {}
        c, Bc, O = g.shape[0], g.shape[1], g.shape[-1]
        x3 = x.reshape(Bc, -1, x.shape[-1])
        g4 = g.reshape(c, Bc, -1, O)
        if "weight" in wanted:
            # (c, Bc, I, O): the layout of the (in, out) weight
            w = torch.einsum("bti,cbto->cbio", x3, g4)
            out["weight"] = Contribution.dense(w.reshape(c, Bc, -1))
        if "bias" in wanted:
            out["bias"] = Contribution.dense(g4.sum(2))
        return out


_CONV1D = HFConv1DRule()


def duck_typed_rule(module: nn.Module) -> LayerRule | None:
    """The rule of a known third-party layer recognized without importing its
    package (``transformers``' ``Conv1D``), or ``None``."""
    cls = type(module)
    if (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and module.weight.shape[1] == getattr(module, "nf", -1)
            and all(n in ("weight", "bias") for n, _ in module.named_parameters(recurse=False))):
        return _CONV1D
    return None
