"""``nn.Linear``: the weight gradient of an example is ``outer(grad_output, input)``,
summed over positions for sequence inputs."""

from __future__ import annotations

import torch
from torch import nn

from ._contribution import Contribution
from ._registry import LayerRule, register_rule

__all__ = ["LinearRule", "PER_CLASS_K", "per_class_bias"]

#: inputs per output below which per-class products beat one stacked product (the copy
#: that stacks the cotangents costs more than it saves; measured on 2 cores)
PER_CLASS_K = 64


def per_class_bias(lst: list, n_channels: int | None = None):
    """``(c, Bc, C)`` bias gradients from per-class cotangents ``(Bc, ...)``.

    Sequence Linear (``n_channels=None``): the cotangents' last axis is the feature
    axis. Convolutions: their second axis, ``n_channels`` channels.
    """
    Bc = lst[0].shape[0]
    if n_channels is None:
        return torch.stack([t.reshape(Bc, -1, t.shape[-1]).sum(1) for t in lst])
    return torch.stack([t.reshape(Bc, n_channels, -1).sum(-1) for t in lst])


class LinearRule(LayerRule):
    """Per-example gradients of ``nn.Linear``.

    One position: the outer product form (never written unless read). Sequences: a
    product ``grad_output^T @ input`` per example, stacked over classes, or class by
    class when the layer has few inputs per output (:data:`PER_CLASS_K`).
    """

    def per_class(self, module, x):
        return x.dim() > 2 and x[0].numel() > x.shape[-1] and x.shape[-1] < PER_CLASS_K

    def per_batch(self, module, x, g, wanted):
        return {"bias": per_class_bias(g)} if "bias" in wanted else {}

    def contributions(self, module, x, g, wanted, batch_terms):
        out: dict[str, Contribution] = {}
        I = x.shape[-1]
        if isinstance(g, list):
            Bc = g[0].shape[0]
            x3 = x.reshape(Bc, -1, I)
            O = g[0].shape[-1]
            gl = [t.reshape(Bc, -1, O) for t in g]  # (Bc, T, O) per class
            if "weight" in wanted:
                out["weight"] = Contribution.per_class_product(
                    [t.transpose(1, 2) for t in gl], x3)
            if "bias" in wanted:
                bias = batch_terms.get("bias")
                out["bias"] = Contribution.dense(per_class_bias(g) if bias is None else bias)
            return out
        c, Bc, O = g.shape[0], g.shape[1], g.shape[-1]
        x3 = x.reshape(Bc, -1, I)
        g4 = g.reshape(c, Bc, -1, O)
        if "weight" in wanted:
            if x3.shape[1] == 1:
                out["weight"] = Contribution.outer(g4[:, :, 0, :], x3[:, 0, :])
            else:
                left = g4.permute(1, 0, 3, 2)[:, :, None]  # (Bc, c, 1, O, T)
                out["weight"] = Contribution.product(left, x3[:, None, None])
        if "bias" in wanted:
            out["bias"] = Contribution.dense(g4.sum(2))
        return out


register_rule(nn.Linear, LinearRule())
