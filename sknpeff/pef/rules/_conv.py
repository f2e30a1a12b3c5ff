"""``nn.Conv1d`` and ``nn.Conv2d``: the weight gradient of an example is one product of
its output cotangents with its unfolded input patches."""

from __future__ import annotations

import math

from torch import nn
from torch.nn import functional as F

from ._contribution import Contribution
from ._linear import PER_CLASS_K, per_class_bias
from ._registry import LayerRule, register_rule

__all__ = ["ConvRule", "conv_patches"]


def conv_patches(mod, x):
    """Unfolded input patches ``(B, Cin * prod(kernel), L)`` of a Conv1d/Conv2d."""
    one_d = isinstance(mod, nn.Conv1d)
    if one_d:
        x = x.unsqueeze(2)
        ks, st, dl = (1, mod.kernel_size[0]), (1, mod.stride[0]), (1, mod.dilation[0])
    else:
        ks, st, dl = mod.kernel_size, mod.stride, mod.dilation
    if mod.padding_mode != "zeros":
        pad = mod._reversed_padding_repeated_twice
        if one_d:
            pad = tuple(pad) + (0, 0)
        x = F.pad(x, pad, mode=mod.padding_mode)
        padding = (0, 0)
    elif isinstance(mod.padding, str):
        if mod.padding == "valid":
            padding = (0, 0)
        else:  # same
            pads = []
            for k, d in zip(ks, dl, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
            padding = (0, 0)
    else:
        padding = (0, mod.padding[0]) if one_d else tuple(mod.padding)
    return F.unfold(x, ks, dilation=dl, padding=padding, stride=st)


class ConvRule(LayerRule):
    """Per-example gradients of ``nn.Conv1d`` / ``nn.Conv2d`` (any padding mode, groups,
    stride and dilation).

    Stacking the ``c`` cotangents costs a copy of ``c * O * L`` values per example, the
    product ``c * O * L * K`` multiply-adds: for ``K`` (input channels times kernel
    size) of :data:`~sknpeff.pef.rules._linear.PER_CLASS_K` and more the copy is
    negligible and one large ``bmm`` runs faster; below, class by class.
    """

    def per_class(self, module, x):
        return module.groups == 1 and (
            module.in_channels * math.prod(module.kernel_size) < PER_CLASS_K)

    def per_batch(self, module, x, g, wanted):
        return {"bias": per_class_bias(g, module.out_channels)} if "bias" in wanted else {}

    def contributions(self, module, x, g, wanted, batch_terms):
        out: dict[str, Contribution] = {}
        lst = g if isinstance(g, list) else None
        c, Bc = (len(lst), lst[0].shape[0]) if lst is not None else (g.shape[0], g.shape[1])
        Cout, G = module.out_channels, module.groups
        if "weight" in wanted:
            pt = conv_patches(module, x)  # (Bc, Cin*k, L)
            L = pt.shape[-1]
            if lst is not None:  # groups == 1
                out["weight"] = Contribution.per_class_product(
                    [t.reshape(Bc, Cout, L) for t in lst], pt.transpose(1, 2))
            else:
                pt = pt.reshape(Bc, 1, G, -1, L).transpose(-1, -2)  # (Bc, 1, G, L, K)
                left = g.reshape(c, Bc, G, Cout // G, L).transpose(0, 1)
                out["weight"] = Contribution.product(left, pt)
        if "bias" in wanted:
            if lst is None:
                bias = g.reshape(c, Bc, Cout, -1).sum(-1)
            else:
                bias = batch_terms.get("bias")
                if bias is None:
                    bias = per_class_bias(lst, Cout)
            out["bias"] = Contribution.dense(bias)
        return out


register_rule(nn.Conv1d, ConvRule())
register_rule(nn.Conv2d, ConvRule())
