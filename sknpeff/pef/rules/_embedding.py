"""``nn.Embedding``: the weight gradient of an example scatters its cotangents into the
rows of the tokens it looked up."""

from __future__ import annotations

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
        gg = g.reshape(c, Bc, T, D)
        if module.padding_idx is not None:
            gg = gg * (idx != module.padding_idx).to(gg.dtype)[None, :, :, None]
        # the scatter form: written row by row only where a consumer needs the block,
        # projected without writing it (Contribution.project)
        return {"weight": Contribution.scatter(gg, idx, V)}


register_rule(nn.Embedding, EmbeddingRule())
