"""The forms a per-example, per-class parameter gradient takes: :class:`Contribution`."""

from __future__ import annotations

import torch

__all__ = ["Contribution"]


class Contribution:
    """A per-example, per-class gradient contribution to one parameter.

    What a layer rule returns for each of its parameters. Build one with the class
    methods :meth:`dense`, :meth:`outer`, :meth:`product`, :meth:`per_class_product` or
    :meth:`scatter`; the factored forms let the engine compute norms, block maxima, the
    exactness check and random projections (:meth:`project`) without writing the whole
    block.

    Five forms, all meaning a ``(c, Bc, numel)`` block:

    * ``block``: the block itself;
    * outer (``g`` ``(c, Bc, O)``, ``x`` ``(Bc, I)``): ``block[c, b] = outer(g[c, b], x[b])``;
    * product (``left`` ``(Bc, c, G, O, L)``, ``right`` ``(Bc, 1, G, L, K)``):
      ``block[c, b] = (left[b, c] @ right[b, 0])`` flattened (sequence Linear, conv);
    * per-class product (``lefts``, a list of ``c`` tensors ``(Bc, O, L)``, ``right``
      ``(Bc, L, K)``): ``block[j, b] = lefts[j][b] @ right[b]`` flattened. The backward
      passes give one cotangent tensor per class; stacking them for one large ``bmm``
      costs a copy as large as the layer's output times ``c`` (measured: 14 of 20 ms of a
      32-example first conv layer), so this form multiplies class by class instead;
    * scatter (``g`` ``(c, Bc, T, D)``, ``idx`` ``(Bc, T)``, ``n_rows``): ``block[j, b]``
      is the ``(n_rows, D)`` matrix whose row ``idx[b, t]`` receives ``g[j, b, t]`` for
      every ``t`` (an embedding lookup's gradient).
    """

    __slots__ = ("block", "g", "x", "_left", "lefts", "right", "idx", "n_rows")

    def __init__(self, block=None, g=None, x=None, left=None, right=None, lefts=None,
                 idx=None, n_rows=None):
        self.block, self.g, self.x, self.right = block, g, x, right
        self._left, self.lefts = left, lefts
        self.idx, self.n_rows = idx, n_rows

    @classmethod
    def dense(cls, block: torch.Tensor) -> Contribution:
        """The gradients themselves, ``block`` of shape ``(c, Bc, numel)``."""
        return cls(block=block)

    @classmethod
    def outer(cls, g: torch.Tensor, x: torch.Tensor) -> Contribution:
        """``block[j, b] = outer(g[j, b], x[b])``: ``g`` ``(c, Bc, O)``, ``x`` ``(Bc, I)``."""
        return cls(g=g, x=x)

    @classmethod
    def product(cls, left: torch.Tensor, right: torch.Tensor) -> Contribution:
        """``block[j, b] = left[b, j] @ right[b, 0]`` per group, flattened.

        ``left`` ``(Bc, c, G, O, L)``, ``right`` ``(Bc, 1, G, L, K)``.
        """
        return cls(left=left, right=right)

    @classmethod
    def per_class_product(cls, lefts: list[torch.Tensor], right: torch.Tensor
                          ) -> Contribution:
        """``block[j, b] = lefts[j][b] @ right[b]`` flattened: ``lefts`` a list of ``c``
        tensors ``(Bc, O, L)``, ``right`` ``(Bc, L, K)``."""
        return cls(lefts=lefts, right=right)

    @classmethod
    def scatter(cls, g: torch.Tensor, idx: torch.Tensor, n_rows: int) -> Contribution:
        """``block[j, b] = sum_t outer(e_{idx[b, t]}, g[j, b, t])`` flattened: ``g``
        ``(c, Bc, T, D)``, ``idx`` ``(Bc, T)`` integer rows below ``n_rows``."""
        return cls(g=g, idx=idx, n_rows=int(n_rows))

    @property
    def is_outer(self) -> bool:
        return self.g is not None and self.idx is None

    @property
    def is_scatter(self) -> bool:
        return self.idx is not None

    @property
    def is_product(self) -> bool:
        return self._left is not None or self.lefts is not None

    @property
    def left(self) -> torch.Tensor | None:
        """The product form's ``left`` (stacked from ``lefts`` on first use)."""
        if self._left is None and self.lefts is not None:
            self._left = torch.stack(self.lefts, dim=1)[:, :, None]
            self.right = self.right[:, None, None]
            self.lefts = None
        return self._left

    def materialize(self) -> torch.Tensor:
        """The ``(c, Bc, numel)`` block."""
        if self.block is not None:
            return self.block
        if self.idx is not None:
            return self._scattered(self.g)
        if self.g is not None:
            c, Bc, O = self.g.shape
            return (self.g[:, :, :, None] * self.x[None, :, None, :]).reshape(c, Bc, -1)
        prod = self._product()  # (Bc, c, G, O, K)
        return prod.reshape(prod.shape[0], prod.shape[1], -1).transpose(0, 1)

    def _scattered(self, g: torch.Tensor) -> torch.Tensor:
        # (c, Bc, n_rows * D): every example's rows gathered by one index_add
        c, Bc, T, D = g.shape
        flat = (torch.arange(Bc, device=g.device)[:, None] * self.n_rows + self.idx).reshape(-1)
        w = torch.zeros((c, Bc * self.n_rows, D), dtype=g.dtype, device=g.device)
        w.index_add_(1, flat, g.reshape(c, Bc * T, D))
        return w.reshape(c, Bc, self.n_rows * D)

    def _product_raw(self) -> torch.Tensor:
        # one bmm over (example, group) with the classes folded into the rows
        Bc, c, G, O, L = self.left.shape
        K = self.right.shape[-1]
        lhs = self.left.permute(0, 2, 1, 3, 4).reshape(Bc * G, c * O, L)
        rhs = self.right[:, 0].reshape(Bc * G, L, K)
        return torch.bmm(lhs, rhs)  # (Bc*G, c*O, K)

    def _product(self) -> torch.Tensor:
        Bc, c, G, O, L = self.left.shape
        return self._product_raw().view(Bc, G, c, O, -1).permute(0, 2, 1, 3, 4)

    def write(self, dest: torch.Tensor) -> None:
        """Store the block into ``dest`` of shape ``(Bc, c, numel)`` (a strided view)."""
        Bc, c = dest.shape[0], dest.shape[1]
        if self.idx is not None:
            dest.copy_(self.materialize().transpose(0, 1))
        elif self.g is not None:
            gb = self.g.transpose(0, 1)
            torch.mul(gb[:, :, :, None], self.x[:, None, None, :],
                      out=dest.view(Bc, c, gb.shape[2], self.x.shape[1]))
        elif self.lefts is not None:
            (O, L), K = self.lefts[0].shape[1:], self.right.shape[2]
            if O <= 32 and L >= 16 * O:
                # few outputs, long reduction (a first conv layer): P^T G_j^T (K x O) and
                # a transposed copy beat G_j P (O x K) on 2 threads (1.5 vs 2.6 ms per 11
                # examples of a 32-channel 32x32 conv, where G_j P runs slower on 2
                # threads than on 1) and tie on 1; with more outputs they lose on 1 thread
                rt = self.right.transpose(1, 2)
                for j, lj in enumerate(self.lefts):
                    dest[:, j].view(Bc, O, K).copy_(
                        torch.bmm(rt, lj.transpose(1, 2)).transpose(1, 2))
            else:
                for j, lj in enumerate(self.lefts):  # bmm writes into the strided view
                    torch.bmm(lj, self.right, out=dest[:, j].view(Bc, O, K))
        elif self._left is not None:
            G, O, K = self._left.shape[2], self._left.shape[3], self.right.shape[4]
            if G == 1 and dest.stride(1) == O * K and dest.stride(2) == 1:
                # (c, O*K) contiguous per example: the bmm writes in place
                lhs = self._left.reshape(Bc, c * O, -1)
                torch.bmm(lhs, self.right[:, 0, 0], out=dest.view(Bc, c * O, K))
            else:
                dest.view(Bc, c, G, O, K).copy_(self._product())
        else:
            dest.copy_(self.block.transpose(0, 1))

    def _ungrouped_dims(self) -> tuple[int, int, int, int] | None:
        """``(c, O, L, K)`` of an ungrouped product form, else None."""
        if self.lefts is not None:
            return len(self.lefts), *self.lefts[0].shape[1:], self.right.shape[2]
        if self._left is not None and self._left.shape[2] == 1:
            _, c, _, O, L = self._left.shape
            return c, O, L, self.right.shape[4]
        return None

    def gram_is_cheap(self) -> bool:
        """Whether :meth:`gram` beats reading the written ``(c, O*K)`` rows.

        Reading runs at cache bandwidth, :meth:`gram` at matrix-multiply speed; the
        factor 32 between them was measured on CPU (e.g. a 128-channel 8x8 convolution
        with 576 inputs per output: 0.11 vs 0.34 ms per example).
        """
        dims = self._ungrouped_dims()
        if dims is None:
            return False
        c, O, L, K = dims
        flops = L * L * K + c * O * L * L + c * c * O * L
        return flops < 32 * c * O * K

    def gram(self) -> torch.Tensor:
        """``(Bc, c, c)`` Gram matrices of the rows of an ungrouped product form, without
        reading them: ``<G_j P, G_k P> = <G_j (P P^T), G_k>``, an ``L x L`` product
        instead of the ``O x K`` rows."""
        if self.lefts is not None:
            G, P = torch.stack(self.lefts, dim=1), self.right
        else:
            G, P = self._left[:, :, 0], self.right[:, 0, 0]
        Bc, c, O, L = G.shape
        M = torch.bmm(P, P.transpose(1, 2))  # (Bc, L, L)
        Gt = G.transpose(2, 3)
        if Gt.is_contiguous():
            # G a transposed view (a sequence Linear's (L, O) cotangents): M G_j^T =
            # (G_j M)^T (M symmetric) in that layout, without copying G (measured: the
            # copy was 0.3 of 4.4 s per 32 examples of a 4-layer BERT, one thread)
            Ht = torch.matmul(M[:, None], Gt).view(Bc, c, L * O)
            return torch.bmm(Ht, Gt.view(Bc, c, L * O).transpose(1, 2))
        G = G.reshape(Bc, c * O, L)
        H = torch.bmm(G, M).view(Bc, c, O * L)
        return torch.bmm(H, G.reshape(Bc, c, O * L).transpose(1, 2))

    def write_sq_sum(self, dest: torch.Tensor) -> None:
        """Store ``sum_j block[j] ** 2`` into ``dest`` of shape ``(Bc, numel)`` (product forms)."""
        if self.lefts is not None:
            Bc, O, K = dest.shape[0], self.lefts[0].shape[1], self.right.shape[2]
            d = dest.view(Bc, O, K)
            for j, lj in enumerate(self.lefts):
                p = torch.bmm(lj, self.right)
                if j == 0:
                    torch.mul(p, p, out=d)
                else:
                    d.addcmul_(p, p)
            return
        Bc, c, G, O, L = self.left.shape
        prod = self._product_raw()  # (Bc*G, c*O, K), fresh and contiguous
        prod.mul_(prod)
        torch.sum(prod.view(Bc, G, c, O, -1), dim=2, out=dest.view(Bc, G, O, prod.shape[-1]))

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        """``sum_{j,b} w[j, b] block[j, b]`` (flat, ``numel``) for weights ``w`` ``(c, Bc)``."""
        if self.idx is not None:
            h = torch.einsum("cbtd,cb->btd", self.g, w)
            out = torch.zeros((self.n_rows, h.shape[-1]), dtype=h.dtype, device=h.device)
            out.index_add_(0, self.idx.reshape(-1), h.reshape(-1, h.shape[-1]))
            return out.reshape(-1)
        if self.g is not None:
            h = torch.einsum("cbo,cb->bo", self.g, w)
            return (h.T @ self.x).reshape(-1)
        if self.is_product:
            Bc, c, G, O, L = self.left.shape
            h = torch.einsum("bcgol,cb->gobl", self.left, w).reshape(G, O, Bc * L)
            r = self.right[:, 0].permute(1, 0, 2, 3).reshape(G, Bc * L, -1)
            return torch.bmm(h, r).reshape(-1)
        return torch.einsum("cbn,cb->n", self.block, w)

    # -- projected PEFs -----------------------------------------------------------------------
    def exact_gram(self) -> torch.Tensor:
        """``(Bc, c, c)`` Gram matrices of the block's rows by the cheapest exact route,
        without writing them anywhere lasting (for the exact PEF norms of projected
        PEFs, whose rows are never assembled)."""
        if self.idx is not None:
            # <sum_t e_{i_t} g_jt, sum_u e_{i_u} g_ku> = sum_{t,u} [i_t = i_u] <g_jt, g_ku>
            g = self.g.transpose(0, 1)  # (Bc, c, T, D)
            same = (self.idx[:, :, None] == self.idx[:, None, :]).to(g.dtype)  # (Bc, T, T)
            h = torch.matmul(same[:, None], g)  # (Bc, c, T, D)
            Bc, c = g.shape[0], g.shape[1]
            return torch.bmm(g.reshape(Bc, c, -1), h.reshape(Bc, c, -1).transpose(1, 2))
        if self.is_outer:
            gb = self.g.transpose(0, 1)
            return torch.bmm(gb, gb.transpose(1, 2)) * (self.x * self.x).sum(1)[:, None, None]
        dims = self._ungrouped_dims()
        if dims is not None:
            c, O, L, K = dims
            via_gram = L * L * K + c * O * L * L + c * c * O * L
            via_rows = c * O * L * K + c * c * O * K
            if via_gram < via_rows:
                return self.gram()
            if self.lefts is not None:
                rows = torch.stack([torch.bmm(lj, self.right) for lj in self.lefts], 1)
                rows = rows.reshape(rows.shape[0], c, -1)
                return torch.bmm(rows, rows.transpose(1, 2))
        if self.is_product:
            Bc, c, G = self.left.shape[:3]
            prod = self._product_raw().view(Bc * G, c, -1)
            return torch.bmm(prod, prod.transpose(1, 2)).view(Bc, G, c, c).sum(1)
        bt = self.block.transpose(0, 1)
        return torch.bmm(bt, bt.transpose(1, 2))

    def prefers_rows(self, d_out: int, d_in: int) -> bool:
        """Whether to write the block (then take a dense Gram and projection) rather
        than :meth:`exact_gram` plus the factored :meth:`project`.

        True for grouped products, whose Gram is taken from the written rows anyway.
        Ungrouped products stay factored: a multiply-add count favours writing a first
        conv layer's gradient (32 channels out, 27 in, 1024 positions), but that write
        is memory-bound and measured no faster on CPU (22.9 vs 23.3, 20.2 vs 18.3 ex/s
        for the benchmark CNN, interleaved).
        """
        return self.is_product and self._ungrouped_dims() is None

    def project(self, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        """``(Bc, c, d_out * d_in)``: every block row, seen as an ``(O, I)`` matrix ``W``
        (the parameter's ``(shape[0], rest)``), mapped to ``P_out W P_in^T`` (row-major)
        without forming ``W`` in the factored forms.

        Parameters
        ----------
        p_out : torch.Tensor of shape (d_out, O)
        p_in : torch.Tensor of shape (d_in, I)
        """
        d_out, O = p_out.shape
        d_in, I = p_in.shape
        if self.idx is not None:
            # sum_t P_out[:, i_t] (P_in g_jt)^T
            q = torch.matmul(self.g, p_in.T)  # (c, Bc, T, d_in)
            cols = p_out.T[self.idx]  # (Bc, T, d_out)
            y = torch.matmul(cols.transpose(1, 2)[None], q)  # (c, Bc, d_out, d_in)
            return y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 1)
        if self.is_outer:
            gp = torch.matmul(self.g, p_out.T)  # (c, Bc, d_out)
            xp = self.x @ p_in.T  # (Bc, d_in)
            y = gp.transpose(0, 1)[:, :, :, None] * xp[:, None, None, :]
            return y.reshape(y.shape[0], y.shape[1], -1)
        if self.lefts is not None:
            rp = torch.matmul(self.right, p_in.T)  # (Bc, L, d_in)
            ys = [torch.matmul(torch.matmul(p_out, lj), rp) for lj in self.lefts]
            return torch.stack(ys, 1).reshape(rp.shape[0], len(ys), -1)
        if self._left is not None:
            Bc, c, G, Og, L = self._left.shape
            pg = p_out.view(d_out, G, Og).transpose(0, 1)  # (G, d_out, Og)
            lp = torch.matmul(pg, self._left)  # (Bc, c, G, d_out, L)
            rp = torch.matmul(self.right, p_in.T)  # (Bc, 1, G, L, d_in)
            y = torch.matmul(lp, rp).sum(2)  # (Bc, c, d_out, d_in)
            return y.reshape(Bc, c, -1)
        c, Bc = self.block.shape[0], self.block.shape[1]
        w = self.block.reshape(c * Bc, O, I)
        y = torch.matmul(torch.matmul(p_out, w), p_in.T)
        return y.reshape(c, Bc, -1).transpose(0, 1)
