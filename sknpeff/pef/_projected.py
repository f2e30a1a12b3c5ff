"""Projected PEF rows: per-parameter contributions straight into ``R a_ij``.

The row assembly of projected PEFs (``PEFTransformer(compression="projection")``). Each
parameter's contribution goes through its block of the random projection
(:class:`~sknpeff.pef.Projection`): a Kronecker block maps the factored forms of the
layer rules without forming the per-example gradient
(:meth:`~sknpeff.pef.rules.Contribution.project`); the parameters of the sparse block
(biases, norm scales: small) are written densely and mapped together. The PEF norm
``||F_i||_F`` comes from the exact ``c x c`` Gram matrices of the unprojected vectors
(:meth:`~sknpeff.pef.rules.Contribution.exact_gram`), never from the projected ones.
"""

from __future__ import annotations

import torch

from ._projection import Projection
from .rules import Contribution

__all__ = ["ProjectedRows"]


class ProjectedRows:
    """Assembles projected PEF rows of a chunk of examples.

    Parameters
    ----------
    projection : Projection
        The operator ``R``.
    sizes : sequence of int
        Size of every selected parameter (the layout's order).
    device : torch.device
    """

    def __init__(self, projection: Projection, sizes, device) -> None:
        self.projection = projection
        self.sizes = list(sizes)
        self.device = device

    def rows(self, contribs: dict[int, list[Contribution]], Bc: int, c: int, dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y, norms)``: ``Y[b, j] = R a_bj`` ``(Bc, c, d)`` and the exact Frobenius
        norms ``||sum_j a_bj a_bj^T||_F`` (float64) of the unprojected PEFs."""
        proj = self.projection
        dev = self.device
        Y = torch.zeros((Bc, c, proj.n_components), dtype=dtype, device=dev)
        S = torch.zeros((Bc, c, c), dtype=dtype, device=dev)
        sb = proj.sparse
        xs = None
        if sb is not None and sb.size:
            xs = torch.zeros((Bc, c, sb.size), dtype=dtype, device=dev)
        for pid, cl in contribs.items():
            if not cl:
                continue
            blk = None
            kb = proj.block_of.get(pid)
            if len(cl) > 1 or kb is None or cl[0].prefers_rows(kb.d_out, kb.d_in):
                # a parameter reached by several contributions (a module called twice),
                # one of the sparse block, or one whose gradient is cheaper to write
                # than to project factored: its dense (c, Bc, n) gradient
                blk = cl[0].materialize()
                for cb in cl[1:]:
                    blk = blk + cb.materialize()
                bt = blk.transpose(0, 1)
                S += torch.bmm(bt, bt.transpose(1, 2))
            else:
                S += cl[0].exact_gram()
            if kb is not None:
                p_out, p_in = proj.kronecker_factors(kb, dev, dtype)
                form = cl[0] if blk is None else Contribution.dense(blk)
                Y[:, :, kb.offset : kb.offset + kb.dim] = form.project(p_out, p_in)
            else:
                q = proj.sparse_offset[pid]
                xs[:, :, q : q + self.sizes[pid]] = blk.transpose(0, 1)
        if xs is not None:
            Y[:, :, sb.offset : sb.offset + sb.dim] = proj.sparse_apply(
                xs.view(Bc * c, -1)).view(Bc, c, -1)
        nrm = torch.sqrt((S.to(torch.float64) ** 2).sum((1, 2)))
        return Y, nrm
