"""``nn.Embedding``: the weight gradient of an example scatters its cotangents into the
rows of the tokens it looked up."""

from __future__ import annotations

import torch
from torch import nn

from ._contribution import Contribution
from ._registry import LayerRule, register_rule

__all__ = ["EmbeddingRule"]


class EmbeddingRule(LayerRule):
    """Per-example gradients of ``nn.Embedding`` (``padding_idx`` rows get none).

    ``max_norm`` (which renormalizes rows in place) and ``scale_grad_by_freq`` (which
    couples the examples of a batch) are left to the generic path. Embeddings of ids
    shared by the whole batch (position ids of shape ``(1, T)``) are expanded per
    example.
    """

    expand_shared_batch = True

    def supports(self, module):
        return module.max_norm is None and not module.scale_grad_by_freq

    def contributions(self, module, x, g, wanted, batch_terms):
        if "weight" not in wanted:
            return {}
        c, Bc = g.shape[0], g.shape[1]
        V, D = module.num_embeddings, module.embedding_dim
        idx = x.reshape(Bc, -1)
        T = idx.shape[1]
        gg = g.reshape(c, Bc * T, D)
        if module.padding_idx is not None:
            gg = gg * (idx.reshape(-1) != module.padding_idx).to(gg.dtype)[None, :, None]
        flat = (torch.arange(Bc, device=idx.device)[:, None] * V + idx).reshape(-1)
        w = torch.zeros((c, Bc * V, D), dtype=g.dtype, device=g.device)
        w.index_add_(1, flat, gg)
        return {"weight": Contribution.dense(w.reshape(c, Bc, V * D))}


register_rule(nn.Embedding, EmbeddingRule())
