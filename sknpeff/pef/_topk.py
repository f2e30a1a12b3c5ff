"""Exact top-K selection of the entries of largest magnitude of each PEF row.

A threshold is estimated from a random subsample of each row, one pass finds the blocks
of ``BLOCK`` entries whose largest magnitude reaches it, and an exact ``topk`` runs among
the entries of those blocks only (rows where the estimate was too high fall back to a
full ``topk``). The block maxima are filled while the rows are assembled
(:class:`BlockMax`), and outer-product regions (Linear layers) may be left unwritten until
an entry is read (:class:`Deferred`): the values the filter reads are computed from the
two factors, the same rounded products bit for bit. On a GPU one ``topk`` per row is
faster and is used instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "BLOCK",
    "DEFER_MAX_FRAC",
    "BlockMax",
    "Deferred",
    "pad_cat",
    "padded",
    "rows_to_csr_parts",
    "select_topk",
    "wants_blocks",
]

BLOCK = 128


def _max_magnitude(t: torch.Tensor, dim: int, signed: bool) -> torch.Tensor:
    """``t.abs().amax(dim)`` without a temporary (``t.amax(dim)`` when not ``signed``).

    (A loop over cache-sized pieces is faster on an idle machine but degrades badly
    when other processes compete for the cores: many small parallel regions.)
    """
    if not signed:
        return torch.amax(t, dim=dim)
    return torch.maximum(torch.amax(t, dim=dim), torch.amin(t, dim=dim).neg_())


def wants_blocks(state: dict | None, device: torch.device | None = None) -> bool:
    """Whether :func:`select_topk` will use the block filter on its next call."""
    if device is not None and _topk_is_faster(device):
        return False
    return state is None or state.get("block_frac", 0.0) < 0.25 \
        or state.get("calls", 0) % 16 == 0


def _topk_is_faster(device: torch.device) -> bool:
    """Whether one ``torch.topk`` over whole rows beats the threshold filter there.

    On a GPU it does: 0.21 ms against 1.22 ms for 4096 of 2.7M values on an H100
    (``benchmarks/bench_pef.py --device cuda``), where the filter's many small kernels
    and its host synchronisations cost more than the read. On a CPU the filter wins 3x.
    """
    return device.type != "cpu"


class BlockMax:
    """Maximum magnitude of every ``BLOCK``-entry block of rows being assembled.

    The assemblers fill it parameter by parameter while the parameter's entries are still
    in cache (:meth:`scan`), or without reading them at all for outer-product gradients
    (:meth:`outer`), so that the selection needs no separate pass over the rows.
    """

    def __init__(self, R: int, n_pad: int, dtype, device, signed: bool,
                 plans: dict | None = None) -> None:
        self.bmag = torch.zeros((R, n_pad // BLOCK), dtype=dtype, device=device)
        self.signed = signed
        # index plans of :meth:`outer` per region, shareable between row chunks
        self._plans = {} if plans is None else plans

    def _reduce(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return _max_magnitude(t, dim, self.signed)

    def _edge(self, rows: torch.Tensor, lo: int, hi: int) -> None:
        # a block only partly in [lo, hi): combine with what other parameters put there
        if hi > lo:
            b = lo // BLOCK
            self.bmag[:, b] = torch.maximum(self.bmag[:, b], self._reduce(rows[:, lo:hi], 1))

    def _split(self, lo: int, hi: int) -> tuple[int, int]:
        return -(-lo // BLOCK), hi // BLOCK  # first and one-past-last whole block

    def scan(self, rows: torch.Tensor, lo: int, hi: int) -> None:
        """Record the blocks of columns ``[lo, hi)`` of ``rows`` (R, N_pad) by reading them."""
        b0, b1 = self._split(lo, hi)
        if b0 > b1:  # inside one block
            self._edge(rows, lo, hi)
            return
        self._edge(rows, lo, b0 * BLOCK)
        self._edge(rows, b1 * BLOCK, hi)
        if b1 > b0:
            whole = rows[:, b0 * BLOCK : b1 * BLOCK].unflatten(1, (b1 - b0, BLOCK))
            self.bmag[:, b0:b1] = self._reduce(whole, 2)

    def outer_reads(self, lo: int, Q: int, I: int) -> bool:
        """Whether :meth:`outer` reads the region's columns (all but its edges otherwise)."""
        b0, b1 = self._split(lo, lo + Q * I)
        return b1 <= b0 or I < BLOCK

    def outer(self, rows: torch.Tensor, lo: int, ga: torch.Tensor, xa: torch.Tensor) -> None:
        """Record columns ``[lo, lo + Q * I)`` holding ``ga[:, q] * xa[:, i]`` at ``q * I + i``.

        ``ga`` (R, Q) and ``xa`` (R, I) are non-negative. The maximum of a block is
        ``ga[q] * max(xa over the block's part of row q)`` (at most two rows when
        ``I >= BLOCK``), exactly the maximum of the stored products: rounding a product
        by a fixed factor is monotonic. Ranges come from a sliding-window, a suffix and a
        prefix maximum of ``xa``, so the cost is ``O(I * BLOCK + n_blocks)`` per row
        instead of a pass over ``Q * I`` entries. With ``I < BLOCK`` (a block spans many
        rows) or no whole block, the columns are read (:meth:`scan`).
        """
        Q, I = ga.shape[1], xa.shape[1]
        hi = lo + Q * I
        if self.outer_reads(lo, Q, I):
            self.scan(rows, lo, hi)
            return
        b0, b1 = self._split(lo, hi)
        self._edge(rows, lo, b0 * BLOCK)
        self._edge(rows, b1 * BLOCK, hi)
        key = (lo, Q, I, str(xa.device))
        plan = self._plans.get(key)
        if plan is None:
            local = torch.arange(b0, b1, device=xa.device) * BLOCK - lo
            q1 = torch.div(local, I, rounding_mode="floor")
            i1 = local - q1 * I
            fits = i1 + BLOCK <= I
            plan = (q1, i1, fits, (q1 + 1).clamp(max=Q - 1),
                    (i1 + BLOCK - I - 1).clamp(min=0), i1.clamp(max=I - BLOCK))
            self._plans[key] = plan
        q1, i1, fits, q2, e, i1w = plan
        win = F.max_pool1d(xa[:, None], BLOCK, stride=1)[:, 0]  # max over [i, i + B)
        suf = torch.flip(torch.cummax(torch.flip(xa, (1,)), 1).values, (1,))
        pre = torch.cummax(xa, 1).values
        first = ga.index_select(1, q1) * torch.where(fits, win.index_select(1, i1w),
                                                     suf.index_select(1, i1))
        second = torch.where(fits, torch.zeros_like(first),
                             ga.index_select(1, q2) * pre.index_select(1, e))
        self.bmag[:, b0:b1] = torch.maximum(first, second)


#: leave outer-product regions unwritten only when the previous call's filter read less
#: than this share of the blocks (more read: writing them at once is faster)
DEFER_MAX_FRAC = 0.15


class Deferred:
    """Outer-product regions of assembled rows, left unwritten until an entry is read.

    Columns ``[lo, lo + Q * I)`` of row ``r`` stand for ``u[r, q] * v[r, i]`` at column
    ``lo + q * I + i``. Writing them is a pass over ``Q * I`` entries per row (58% of the
    benchmark CNN's low-rank rows, nearly all of an MLP's), while the block filter of
    :func:`select_topk` reads only the subsample, the candidate blocks and the picked
    entries: those are computed here on demand. Each is one rounded product of the same
    two numbers the write would have multiplied, so the values are bit for bit the
    written ones. The region's partial edge blocks are written at once (the block maxima
    read them).
    """

    def __init__(self, rows: torch.Tensor | None = None) -> None:
        self.rows = rows  # (R, N_pad); the assemblers set it
        self.regions: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self._ext: dict[int, torch.Tensor] = {}  # see patch_blocks

    def __bool__(self) -> bool:
        return bool(self.regions)

    def add(self, lo: int, u: torch.Tensor, v: torch.Tensor) -> None:
        """Defer columns ``[lo, lo + Q * I)`` = ``u[:, q] * v[:, i]``; write their edges.

        Needs ``I >= BLOCK`` (a block then spans at most two values of ``q``)."""
        u, v = u.contiguous(), v.contiguous()
        I = v.shape[1]
        hi = lo + u.shape[1] * I
        w0, w1 = -(-lo // BLOCK) * BLOCK, hi // BLOCK * BLOCK  # whole blocks
        for a, b in ((lo, min(w0, hi)), (max(w1, w0), hi)):
            if b > a:
                local = torch.arange(a - lo, b - lo, device=u.device)
                self.rows[:, a:b] = u[:, local // I] * v[:, local % I]
        self.regions.append((lo, hi, u, v))

    def patch(self, out: torch.Tensor, cols: torch.Tensor) -> None:
        """Put the deferred values into ``out`` ``(R, w)``, read from columns ``cols`` of
        every row: ``cols`` is ``(R, w)``, or ``(1, w)`` for columns shared by all rows."""
        shared = cols.shape[0] == 1 and out.shape[0] > 1
        flat_cols = cols[0] if shared else cols.reshape(-1)
        for lo, hi, u, v in self.regions:
            hit = torch.nonzero((flat_cols >= lo) & (flat_cols < hi)).squeeze(1)
            if hit.numel() == 0:
                continue
            local = flat_cols.index_select(0, hit) - lo
            I = v.shape[1]
            q = torch.div(local, I, rounding_mode="floor")
            if shared:  # each column located once, read in every row
                out[:, hit] = u.index_select(1, q) * v.index_select(1, local - q * I)
            else:
                r = torch.div(hit, out.shape[1], rounding_mode="floor")
                out.view(-1).index_copy_(0, hit, u.view(-1).index_select(0, r * u.shape[1] + q)
                                         * v.view(-1).index_select(0, r * I + local - q * I))

    def patch_blocks(self, out: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor
                     ) -> None:
        """Put the deferred values into ``out`` ``(n, BLOCK)``, read from blocks
        ``blocks`` (block numbers within the row) of rows ``rows``. Edge blocks of a
        region were written by :meth:`add`; a whole block is a window of ``v`` times
        ``u[q]``, or ``u[q + 1]`` past the end of the outer product's row ``q``."""
        start = blocks * BLOCK
        for k, (lo, hi, u, v) in enumerate(self.regions):
            hit = torch.nonzero((start >= lo) & (start + BLOCK <= hi)).squeeze(1)
            if hit.numel() == 0:
                continue
            Q, I = u.shape[1], v.shape[1]
            r = rows[hit]
            local = start[hit] - lo
            q = torch.div(local, I, rounding_mode="floor")
            i = local - q * I
            # each row of v with its first columns repeated at the end: any window of a
            # row of the outer product is a window of it; windows of the flat tensor by
            # index_select of rows of a strided view (3x faster than indexing by row and
            # start)
            if k not in self._ext:
                self._ext[k] = torch.cat([v, v[:, : BLOCK - 1]], 1).reshape(-1)
            win = self._ext[k].unfold(0, BLOCK, 1).index_select(0, r * (I + BLOCK - 1) + i)
            vals = win * u.view(-1).index_select(0, r * Q + q)[:, None]
            cross = torch.nonzero(i > I - BLOCK).squeeze(1)  # blocks crossing a row
            if cross.numel():
                rc, qc, ic = r[cross], q[cross], i[cross]
                past = torch.arange(BLOCK, device=r.device) >= (I - ic)[:, None]
                u2 = u.view(-1).index_select(0, rc * Q + torch.clamp(qc + 1, max=Q - 1))
                vals[cross] = torch.where(past, win[cross] * u2[:, None], vals[cross])
            out[hit] = vals

    def materialize(self) -> None:
        """Write every deferred region into the rows (for passes that read them all)."""
        R = self.rows.shape[0]
        for lo, hi, u, v in self.regions:
            torch.mul(u[:, :, None], v[:, None, :],
                      out=self.rows[:, lo:hi].view(R, u.shape[1], v.shape[1]))
        self.regions, self._ext = [], {}


def select_topk(
    values: torch.Tensor, k: int, *, signed: bool, n_valid: int | None = None,
    generator: torch.Generator | None = None, state: dict | None = None,
    block_max: torch.Tensor | None = None, method: str = "auto",
    deferred: Deferred | None = None,
) -> torch.Tensor:
    """Column indices of the ``k`` entries of largest magnitude of each row of ``values``.

    Parameters
    ----------
    values : tensor of shape (R, N_pad)
        Rows to select from; when ``N_pad`` is a multiple of ``BLOCK`` and the columns
        from ``n_valid`` on are zero, no copy is made.
    k : int
    signed : bool
        ``False`` when all values are known to be non-negative (skips ``amin``).
    n_valid : int, default=None
        Number of meaningful columns (default: all).
    generator : torch.Generator, default=None
        For the random subsample (affects speed only, never the result).
    state : dict, default=None
        Carried between calls on similar rows: remembers whether the block filter was
        selective, to skip it when it is not (re-probed every 16 calls).
    block_max : tensor of shape (R, N_pad // BLOCK), default=None
        Maximum magnitudes of the blocks, when the caller computed them more cheaply than
        a pass over ``values``; used only by the block filter.
    method : {"auto", "filter", "topk"}, default="auto"
        ``"filter"``: the threshold filter below; ``"topk"``: one ``torch.topk`` of the
        magnitudes; ``"auto"``: ``"topk"`` on a GPU, ``"filter"`` on a CPU.
    deferred : Deferred, default=None
        Regions of ``values`` not written yet (their block maxima must be in
        ``block_max``); entries are computed where read, or written before a full pass.

    Returns
    -------
    sel : int64 tensor of shape (R, w), w <= k
        Column indices, padded with ``-1``; exact zeros are never selected. Equal to a
        row-wise ``torch.topk`` of ``|values|`` up to the order of ties.

    Notes
    -----
    A threshold ``t`` is estimated per row from a random subsample (about 64 sampled
    entries above it, i.e. ~2k expected entries). One pass computes the maximum magnitude
    of every block of ``BLOCK`` consecutive entries; only blocks whose maximum reaches
    ``t`` are gathered, and an exact ``topk`` runs among their entries ``>= t``. Every
    entry ``>= t`` lies in such a block, so when a row has at least ``k`` of them the
    result is exact; rows with fewer (the estimate was too high) fall back to a full
    ``topk``. When most blocks reach ``t`` (``k / N`` large, no structure) the block pass
    is skipped and the entries ``>= t`` are found directly.
    """
    R, Np = values.shape
    N = Np if n_valid is None else int(n_valid)
    device = values.device
    tiny = torch.finfo(values.dtype).tiny * torch.finfo(values.dtype).eps  # subnormal
    if R == 0 or N == 0:
        return torch.full((R, 0), -1, dtype=torch.long, device=device)
    if deferred is not None and block_max is None:
        raise ValueError("deferred regions need their block maxima (block_max)")
    if method == "topk" or (method == "auto" and _topk_is_faster(device)):
        if deferred:
            deferred.materialize()
        mag = values[:, :N].abs() if signed else values[:, :N]
        vals, idx = torch.topk(mag, min(k, N), dim=1, sorted=False)
        return _lowest_index_ties(idx.masked_fill(vals <= 0, -1), vals, mag)
    if method not in ("auto", "filter"):
        raise ValueError(f"method must be 'auto', 'filter' or 'topk', got {method!r}")
    if Np % BLOCK:
        if deferred:
            deferred.materialize()
        pad = torch.zeros((R, BLOCK - Np % BLOCK), dtype=values.dtype, device=device)
        values = torch.cat([values, pad], dim=1)
        Np = values.shape[1]
    s = 0
    if k >= N:
        t = torch.full((R,), tiny, dtype=values.dtype, device=device)
    else:
        s = int(math.ceil(32.0 * N / k))
        r = int(math.ceil(s * 2.0 * k / N))
        if s * 2 >= N or r >= s:  # k close to N: a subsample cannot estimate t
            if deferred:
                deferred.materialize()
            mag = values[:, :N].abs()
            vals, idx = torch.topk(mag, k, dim=1, sorted=False)
            return _lowest_index_ties(idx.masked_fill(vals <= 0, -1), vals, mag)
        # sorted: the gather then walks each row forward (the order does not matter)
        sub_idx = torch.randint(0, N, (s,), generator=generator, device="cpu").sort().values
        sub_idx = sub_idx.to(device)
        sub = values.index_select(1, sub_idx)
        if deferred:
            deferred.patch(sub, sub_idx[None, :])
        if signed:
            sub = sub.abs()
        t = torch.topk(sub, r, dim=1, sorted=False).values.min(dim=1).values
        t = torch.clamp(t, min=tiny)
    nb = Np // BLOCK
    use_blocks = wants_blocks(state)
    if deferred and not use_blocks:
        deferred.materialize()
    if state is not None:
        state["calls"] = state.get("calls", 0) + 1
    if use_blocks:
        # the max |value| of every block (one pass unless given); gather only blocks
        # reaching t
        blocks = values.reshape(R * nb, BLOCK)
        bmag = _max_magnitude(blocks, 1, signed) if block_max is None else block_max
        bflat = torch.nonzero((bmag.reshape(R, nb) >= t[:, None]).view(-1)).squeeze(1)
        if state is not None:
            state["block_frac"] = bflat.numel() / max(1, R * nb)
        cand = blocks.index_select(0, bflat)  # (n_blocks, BLOCK)
        brow = torch.div(bflat, nb, rounding_mode="floor")
        if deferred:
            deferred.patch_blocks(cand, brow, bflat - brow * nb)
        if signed:
            cand = cand.abs()
        hit = cand >= t.index_select(0, brow)[:, None]
        flat = torch.nonzero(hit.view(-1)).squeeze(1)
        e_blk = torch.div(flat, BLOCK, rounding_mode="floor")
        rows = brow.index_select(0, e_blk)
        cols = (bflat.index_select(0, e_blk) - rows * nb) * BLOCK + (flat - e_blk * BLOCK)
        evals = cand.view(-1).index_select(0, flat)
    else:
        # blocks are not selective on these rows (e.g. k / N large): compare entries
        mag = values.abs() if signed else values
        flat = torch.nonzero((mag >= t[:, None]).view(-1)).squeeze(1)
        rows = torch.div(flat, Np, rounding_mode="floor")
        cols = flat - rows * Np
        evals = mag.view(-1)[flat]
    counts = torch.bincount(rows, minlength=R)
    maxc = int(counts.max()) if rows.numel() else 0
    width = min(k, maxc)
    out = torch.full((R, max(width, 1)), -1, dtype=torch.long, device=device)
    if maxc > 0:
        # entries come out sorted by row: position of each entry within its row
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(rows.numel(), device=device) - starts.index_select(0, rows)
        at = rows * maxc + pos
        cvals = torch.full((R, maxc), -1.0, dtype=values.dtype, device=device)
        cvals.view(-1).index_copy_(0, at, evals)
        cidx = torch.full((R, maxc), -1, dtype=torch.long, device=device)
        cidx.view(-1).index_copy_(0, at, cols)
        if width < maxc:
            tv, tp = torch.topk(cvals, width, dim=1, sorted=False)
            out[:, :width] = _lowest_index_ties(cidx.gather(1, tp).masked_fill(tv < 0, -1),
                                                tv, cvals, cidx)
        else:
            out[:, :width] = cidx
    if s:
        bad = (counts < k) & (t > tiny)
        if bool(bad.any()):
            if deferred:
                deferred.materialize()
            rows_bad = torch.nonzero(bad).squeeze(1)
            mag = values[rows_bad, :N].abs()
            vals, idx = torch.topk(mag, k, dim=1, sorted=False)
            if out.shape[1] < k:
                fill = torch.full((R, k - out.shape[1]), -1, dtype=torch.long, device=device)
                out = torch.cat([out, fill], dim=1)
            out[rows_bad] = _lowest_index_ties(idx.masked_fill(vals <= 0, -1), vals, mag)
    return out


def _lowest_index_ties(sel: torch.Tensor, sel_vals: torch.Tensor, pool: torch.Tensor,
                       pool_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``sel`` with ties at each row's smallest selected magnitude broken by index.

    ``torch.topk`` breaks ties arbitrarily, and which entries reach the filter depends on
    a random subsample: among entries equal to the ``k``-th largest magnitude, the ones
    with the lowest column indices are kept instead, so the selection depends only on
    the row. ``sel`` ``(R, w)`` holds selected columns (``-1`` padding) and ``sel_vals``
    their magnitudes; ``pool`` ``(R, P)`` holds magnitudes of every entry that may tie
    (all entries at least the threshold; padding negative), at columns ``pool_idx``
    (default: ``0..P-1``). Rows without such ties, nearly all, are left as they are.
    """
    valid = sel >= 0
    if sel.numel() == 0 or not bool(valid.any()):
        return sel
    inf = torch.full_like(sel_vals, float("inf"))
    kth = torch.where(valid, sel_vals, inf).min(dim=1).values  # (R,)
    n_sel = valid.sum(1)
    n_ge = (pool >= kth[:, None]).sum(1)
    fix = torch.nonzero((n_ge > n_sel) & (n_sel > 0)).squeeze(1).tolist()
    if not fix:
        return sel
    sel = sel.clone()
    for r in fix:
        row, t = pool[r], kth[r]
        cols = torch.arange(row.shape[0], device=row.device) if pool_idx is None \
            else pool_idx[r]
        above = cols[row > t]
        tied = cols[row == t].sort().values[: int(n_sel[r]) - above.numel()]
        keep = torch.cat([above, tied])
        sel[r] = -1
        sel[r, : keep.numel()] = keep
    return sel


def rows_to_csr_parts(vals: torch.Tensor, sel: torch.Tensor, scale: torch.Tensor,
                       out_dtype, col_map=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted CSR pieces (counts, indices, data) of selected entries.

    ``sel`` (R, w) holds selected (internal) column indices padded with ``-1`` and
    ``vals`` their values; ``col_map`` maps them to output columns.
    """
    R = sel.shape[0]
    if sel.numel() == 0:
        return (np.zeros(R, dtype=np.int64), np.zeros(0, dtype=np.int64),
                np.zeros(0, dtype=out_dtype))
    key = sel if col_map is None else col_map(sel)
    big = torch.iinfo(torch.int64).max
    key = torch.where(key < 0, torch.full_like(key, big), key)
    if key.device.type == "cpu":
        # NumPy's vectorized argsort: 1.3 ms against torch.sort's 5.1 ms for 32 x 4096
        # int64 keys on one thread (measured with torch 2.13, NumPy 2.4)
        order = torch.from_numpy(np.argsort(key.numpy(), axis=1))
        key = key.gather(1, order)
    else:
        key, order = torch.sort(key, dim=1)
    vals = vals.gather(1, order).to(torch.float64) * scale[:, None]
    valid = key != big
    counts = valid.sum(dim=1)
    idx = key[valid]
    data = vals[valid]
    return (counts.cpu().numpy().astype(np.int64), idx.cpu().numpy().astype(np.int64),
            data.cpu().numpy().astype(out_dtype))


def pad_cat(parts: list[torch.Tensor], fill) -> torch.Tensor:
    """Row-wise concatenation of ``(R_i, w_i)`` tensors, padded to the widest."""
    w = max(p.shape[1] for p in parts)
    return torch.cat([p if p.shape[1] == w else F.pad(p, (0, w - p.shape[1]), value=fill)
                      for p in parts])


# ---------------------------------------------------------------------------------------------
def padded(n: int) -> int:
    """``n`` rounded up to a whole number of blocks."""
    return -(-n // BLOCK) * BLOCK


# ---------------------------------------------------------------------------------------------
