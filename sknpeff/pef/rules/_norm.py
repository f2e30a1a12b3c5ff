"""``nn.LayerNorm`` and ``nn.BatchNorm1d/2d/3d`` (eval mode): the weight gradient of an
example is its cotangent times the normalized input, summed over the normalized
positions; the bias gradient, the cotangent summed."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ._contribution import Contribution
from ._registry import LayerRule, register_rule

__all__ = ["BatchNormRule", "LayerNormRule"]


class LayerNormRule(LayerRule):
    """Per-example gradients of ``nn.LayerNorm``'s elementwise affine parameters."""

    def contributions(self, module, x, g, wanted, batch_terms):
        out: dict[str, Contribution] = {}
        c, Bc = g.shape[0], g.shape[1]
        ns = tuple(module.normalized_shape)
        n = math.prod(ns)
        gg = g.reshape(c, Bc, -1, n)
        if "weight" in wanted:
            xh = F.layer_norm(x, ns, eps=module.eps).reshape(Bc, -1, n)
            out["weight"] = Contribution.dense((gg * xh[None]).sum(2))
        if "bias" in wanted:
            out["bias"] = Contribution.dense(gg.sum(2))
        return out


class BatchNormRule(LayerRule):
    """Per-example gradients of batch norm's affine parameters in eval mode (running
    statistics; training mode couples the examples and is refused before this runs)."""

    def contributions(self, module, x, g, wanted, batch_terms):
        out: dict[str, Contribution] = {}
        c, Bc = g.shape[0], g.shape[1]
        C = module.num_features
        gg = g.reshape(c, Bc, C, -1)
        if "weight" in wanted:
            shape = (1, C) + (1,) * (x.dim() - 2)
            xh = (x - module.running_mean.reshape(shape)) * torch.rsqrt(
                module.running_var.reshape(shape) + module.eps
            )
            out["weight"] = Contribution.dense((gg * xh.reshape(Bc, C, -1)[None]).sum(-1))
        if "bias" in wanted:
            out["bias"] = Contribution.dense(gg.sum(-1))
        return out


register_rule(nn.LayerNorm, LayerNormRule())
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, BatchNormRule())
