"""Row assembly: per-parameter contributions into the PEF rows of a chunk of examples.

Rows are assembled in reusable buffers, parameter by parameter, while each block is in
cache: its Gram matrix (low rank) or squared sum (diagonal) and its block maxima for the
selection are taken at once. Outer-product blocks may be left unwritten
(:class:`~sknpeff.pef._topk.Deferred`) when the selection will not read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._topk import BlockMax, Deferred, padded
from .rules import Contribution

__all__ = ["RowAssembler"]


class RowAssembler:
    """Assembles PEF rows of the selected parameters in reusable buffers.

    Parameters
    ----------
    offsets, sizes : sequences of int
        Flat offset and size of every selected parameter (the layout's order).
    device : torch.device
        Where the rows live.
    """

    def __init__(self, offsets: Sequence[int], sizes: Sequence[int], device) -> None:
        self.offsets = list(offsets)
        self.sizes = list(sizes)
        self.m = int(sum(self.sizes))
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, numel: int, dtype) -> torch.Tensor:
        """A reusable flat work buffer (avoids re-faulting large fresh allocations)."""
        b = self.buffers.get(name)
        if b is None or b.numel() < numel or b.dtype != dtype:
            b = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = b
        return b[:numel]

    def low_rank(self, contribs: dict[int, list[Contribution]], Bc: int, c: int, dtype,
                 bm: BlockMax | None = None, dfr: Deferred | None = None):
        """Rows of the a_ij in the *internal* parameter-major layout, and the PEF norms.

        Internally, parameter ``p``'s ``(c, n_p)`` block of every row is contiguous at
        column ``c * offset_p`` (so per-layer products write in place and Gram matrices
        read contiguous blocks); :meth:`low_rank_col_map` turns selected internal columns into
        the slot-major output columns ``j * n_params + offset_p + r``. ``bm``, when given,
        receives the block maxima of the rows; ``dfr``, when given (with ``bm``), the
        outer-product blocks whose maxima ``bm`` gets without reading them, unwritten.
        """
        Np = padded(c * self.m)
        Abuf = self.buffer("A", Bc * Np, dtype).view(Bc, Np)
        if dfr is not None:
            dfr.rows = Abuf
        Abuf[:, c * self.m :].zero_()
        S = torch.zeros((Bc, c, c), dtype=dtype, device=self.device)
        for pid in range(len(self.offsets)):
            o, n = self.offsets[pid], self.sizes[pid]
            blk = Abuf[:, c * o : c * (o + n)].view(Bc, c, n)
            cl = contribs.get(pid)
            if not cl:
                blk.zero_()
                continue
            if len(cl) == 1 and cl[0].is_outer:
                gb = cl[0].g.transpose(0, 1)
                x = cl[0].x
                if dfr is not None and not bm.outer_reads(c * o, c * gb.shape[2], x.shape[1]):
                    dfr.add(c * o, gb.reshape(Bc, -1), x)
                else:
                    cl[0].write(blk)
                S += torch.bmm(gb, gb.transpose(1, 2)) * (x * x).sum(1)[:, None, None]
                if bm is not None:
                    bm.outer(Abuf, c * o, gb.abs().reshape(Bc, -1), x.abs())
                continue
            cl[0].write(blk)
            if len(cl) == 1 and cl[0].is_product and cl[0].gram_is_cheap():
                S += cl[0].gram()
            else:
                for cb in cl[1:]:
                    blk.add_(cb.materialize().transpose(0, 1))
                S += torch.bmm(blk, blk.transpose(1, 2))
            if bm is not None:
                bm.scan(Abuf, c * o, c * (o + n))
        nrm = torch.sqrt((S.to(torch.float64) ** 2).sum((1, 2)))
        return Abuf, nrm

    def low_rank_col_map(self, c: int):
        """Map from internal low-rank columns (see :meth:`low_rank`) to output columns."""
        dev = self.device
        off = torch.tensor(self.offsets, dtype=torch.long, device=dev)
        size = torch.tensor(self.sizes, dtype=torch.long, device=dev)
        ends = c * (off + size)
        m = self.m

        def col_map(sel: torch.Tensor) -> torch.Tensor:
            u = sel.clamp(min=0).reshape(-1)
            p = torch.searchsorted(ends, u, right=True)
            o, n = off.index_select(0, p), size.index_select(0, p)
            local = u - c * o
            j = torch.div(local, n, rounding_mode="floor")
            ext = (j * m + o + (local - j * n)).reshape(sel.shape)
            return torch.where(sel < 0, sel, ext)

        return col_map

    def diagonal(self, contribs: dict[int, list[Contribution]], Bc: int, dtype,
                 bm: BlockMax | None = None, dfr: Deferred | None = None):
        """Rows ``f_i = sum_j a_ij ** 2`` and their L2 norms (arguments as :meth:`low_rank`)."""
        Np = padded(self.m)
        fbuf = self.buffer("A", Bc * Np, dtype).view(Bc, Np)
        if dfr is not None:
            dfr.rows = fbuf
        fbuf[:, self.m :].zero_()
        f = fbuf[:, : self.m]
        for pid in range(len(self.offsets)):
            o, n = self.offsets[pid], self.sizes[pid]
            sl = f[:, o : o + n]
            cl = contribs.get(pid)
            if not cl:
                sl.zero_()
                continue
            if len(cl) == 1 and cl[0].is_outer:
                g, x = cl[0].g, cl[0].x
                g2 = (g * g).sum(0)  # (Bc, O)
                x2 = x * x
                if dfr is not None and not bm.outer_reads(o, g2.shape[1], x.shape[1]):
                    dfr.add(o, g2, x2)
                else:
                    torch.mul(g2[:, :, None], x2[:, None, :],
                              out=sl.view(Bc, g2.shape[1], x.shape[1]))
                if bm is not None:
                    bm.outer(fbuf, o, g2, x2)
                continue
            if len(cl) == 1 and cl[0].is_product:
                cl[0].write_sq_sum(sl)
            else:
                blk = cl[0].materialize()
                for cb in cl[1:]:
                    blk = blk + cb.materialize()
                blk = blk * blk
                torch.sum(blk, dim=0, out=sl)
            if bm is not None:
                bm.scan(fbuf, o, o + n)
        if not dfr:
            return fbuf, torch.linalg.vector_norm(f, dim=1).to(torch.float64)
        # deferred regions hold no values yet: sum(u_q v_i)^2 = sum(u^2) sum(v^2)
        sq = torch.zeros(Bc, dtype=torch.float64, device=self.device)
        done = 0
        for lo, hi, u, v in sorted(dfr.regions, key=lambda r: r[0]):
            if lo > done:
                sq += torch.linalg.vector_norm(f[:, done:lo], dim=1).to(torch.float64) ** 2
            sq += (u.to(torch.float64) ** 2).sum(1) * (v.to(torch.float64) ** 2).sum(1)
            done = hi
        if done < self.m:
            sq += torch.linalg.vector_norm(f[:, done:], dim=1).to(torch.float64) ** 2
        return fbuf, torch.sqrt(sq)


# ---------------------------------------------------------------------------------------------
# the estimator
