"""Per-example Fishers (PEFs) of a PyTorch classifier, as sparse matrices.

:class:`PEFTransformer` turns examples into the D-PEF or LRM-PEF rows described in
DESIGN.md ("Data layouts"):

* low rank: row ``i`` is the flattened ``(n_classes_, n_params_)`` matrix whose slot
  ``j`` is ``a_ij = sqrt(p_j) * grad log p_j`` for the ``j``-th most probable class
  (slots of dropped classes are empty);
* diagonal: row ``i`` is ``f_i = sum_j a_ij ** 2``.

How it is fast
--------------
One forward pass of a batch records the input of every supported layer (Linear,
Conv1d/2d, LayerNorm, Embedding, BatchNorm in eval mode). The ``c`` class-slot
cotangents ``sqrt(p_j) (e_j - p)`` at the logits are back-propagated to the *outputs*
of those layers only (one backward of the batch per class on CPU, which measured faster
there; one ``torch.autograd.grad(..., is_grads_batched=True)`` on GPUs), and the
per-example, per-class parameter gradients follow from closed-form per-layer rules
(Linear: ``outer(grad_output, input)``, summed over positions for sequences; Conv: one
``bmm`` of the output cotangents with the unfolded patches; LayerNorm/BatchNorm:
cotangent times normalized input; Embedding: scatter-add). The diagonal kind and the
Gram matrices of Linear layers use the factored form directly. Parameters of any other
layer (e.g. ``MultiheadAttention``) go through a generic ``torch.func`` path (``vmap``
over examples of ``vjp`` of the whole model, ``vmap`` over classes; a loop over
examples if ``vmap`` cannot batch the model).

On the first batch of every call the per-layer results are checked exactly: for random
positive weights over (class, example), their weighted sum must equal one ordinary
backward pass to the parameters. A parameter that fails (used outside its module's
``forward``, a module whose first axis is not the batch axis, an input modified in
place) is moved to the generic path, so results are exact either way.

Rows are assembled in reusable buffers of a bounded number of entries (a few examples
at a time), so memory depends on ``batch_size`` and the model, never on the number of
examples. Top-K selection is exact without a full ``topk`` of each row: a threshold is
estimated from a random subsample, one pass finds the blocks of 128 entries whose
largest magnitude reaches it, an exact ``topk`` runs among the entries of those blocks
(rows where the estimate was too high fall back to a full ``topk``). The maxima of the
blocks of outer-product gradients (Linear layers) come from their two factors, and when
the filter reads few blocks those gradients are not written at all: the entries it
reads (subsample, candidate blocks, picked entries) are computed from the factors, the
same products bit for bit. On a GPU one ``topk`` per row is faster and is used instead.

With ``n_jobs > 1`` on a CPU, batches run concurrently in worker threads, each with its
own engine (buffers, hooks that record only their own thread's forward pass) and an
equal share of torch's intra-op threads: many of the per-batch ops (index plans, the
selection, small products) use two cores poorly, two batches at once use them fully. A
batch that turns out to need the generic path (which swaps the model's parameters)
hands itself and the later batches back to the calling thread.
"""

from __future__ import annotations

import itertools
import math
import numbers
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.nn import functional as F

from .layout import ParameterLayout, select_parameters

__all__ = ["PEFTransformer", "PEFResult"]

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class PEFResult:
    """Output of :meth:`PEFTransformer.compute`.

    Attributes
    ----------
    pefs : scipy.sparse.csr_matrix
        The PEFs, ``(n_examples, n_params)`` (diagonal) or
        ``(n_examples, n_classes * n_params)`` (low rank).
    norms : ndarray of shape (n_examples,)
        Frobenius norm of each PEF before normalization and sparsification.
    logits : ndarray of shape (n_examples, n_outputs)
        The model's logits.
    predictions : ndarray of shape (n_examples,)
        ``argmax`` of the logits.
    metadata : dict
        ``kind``, ``n_classes`` and ``layout`` (a :class:`~sknpeff.layout.ParameterLayout`)
        of the columns, and for stores loaded from disk the extra saved metadata.
    """

    pefs: sp.csr_matrix
    norms: np.ndarray
    logits: np.ndarray | None
    predictions: np.ndarray | None
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.pefs.shape[0]


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------
def _tree_map(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_tree_map(fn, v) for v in tree)
    if isinstance(tree, list):
        return [_tree_map(fn, v) for v in tree]
    return fn(tree)


def _tree_leaves(tree) -> list:
    out: list = []
    _tree_map(lambda v: out.append(v), tree)
    return out


def _is_dataset(X) -> bool:
    return isinstance(X, torch.utils.data.Dataset)


def _n_examples(X) -> int | None:
    if isinstance(X, (torch.Tensor, np.ndarray)):
        if X.ndim == 0:
            raise ValueError("X must be batched along its first axis; got a 0-d array.")
        return int(X.shape[0])
    if isinstance(X, Mapping):
        lens = {int(v.shape[0]) for v in X.values() if hasattr(v, "shape") and len(v.shape)}
        if len(lens) != 1:
            raise ValueError(
                "a dict X must hold arrays batched along the first axis, all of the same "
                f"length; got lengths {sorted(lens)}."
            )
        return lens.pop()
    if _is_dataset(X):
        try:
            return len(X)
        except TypeError:
            return None
    if isinstance(X, (list, tuple)):
        return len(X)
    raise ValueError(
        "X must be a tensor/array batched along the first axis, a dict of such arrays, "
        f"a list of per-example items (e.g. dicts of tensors), or a torch Dataset; got "
        f"{type(X).__name__}."
    )


def _as_tensor(v):
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def _collate(items: Sequence):
    return torch.utils.data.default_collate([_tree_map(_as_tensor, it) for it in items])


def _iter_batches(X, batch_size: int) -> Iterator[Any]:
    if isinstance(X, (torch.Tensor, np.ndarray)):
        for s in range(0, X.shape[0], batch_size):
            yield _as_tensor(X[s : s + batch_size])
    elif isinstance(X, Mapping):
        n = _n_examples(X)
        for s in range(0, n, batch_size):
            yield {
                k: (_as_tensor(v[s : s + batch_size]) if hasattr(v, "shape") and len(v.shape)
                    else v)
                for k, v in X.items()
            }
    elif _is_dataset(X):
        loader = torch.utils.data.DataLoader(
            X, batch_size=batch_size, shuffle=False, collate_fn=_collate
        )
        yield from loader
    else:
        X = list(X)
        if X and not isinstance(X[0], (Mapping, torch.Tensor, np.ndarray, tuple, list)):
            arr = np.asarray(X)
            yield from _iter_batches(arr, batch_size)
            return
        for s in range(0, len(X), batch_size):
            yield _collate(X[s : s + batch_size])


def _to_device(batch, device, float_dtype):
    """Tensors of ``batch`` on ``device``; floating ones cast to the model's dtype."""

    def conv(v):
        v = _as_tensor(v)
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.dtype != float_dtype:
                v = v.to(float_dtype)
            return v.to(device, non_blocking=True)
        return v

    return _tree_map(conv, batch)


def _default_forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        # (inputs, targets) pairs as returned by most labelled Datasets.
        return model(batch[0])
    return model(batch)


def _as_logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        "the model (or forward) must return a logits tensor of shape (batch, n_classes) "
        f"(or an object with a .logits attribute); got {type(out).__name__}."
    )


class _ForwardWrapper(nn.Module):
    """Module whose forward is ``forward(model, batch)``; lets torch.func reparametrize."""

    def __init__(self, model, forward):
        super().__init__()
        self.model = model
        self._fwd = forward

    def forward(self, batch):
        return _as_logits(self._fwd(self.model, batch))


# ---------------------------------------------------------------------------------------------
# exact top-K selection
# ---------------------------------------------------------------------------------------------
_BLOCK = 128


def _max_magnitude(t: torch.Tensor, dim: int, signed: bool) -> torch.Tensor:
    """``t.abs().amax(dim)`` without a temporary (``t.amax(dim)`` when not ``signed``).

    (A loop over cache-sized pieces is faster on an idle machine but degrades badly
    when other processes compete for the cores: many small parallel regions.)
    """
    if not signed:
        return torch.amax(t, dim=dim)
    return torch.maximum(torch.amax(t, dim=dim), torch.amin(t, dim=dim).neg_())


def _wants_blocks(state: dict | None, device: torch.device | None = None) -> bool:
    """Whether :func:`_select_topk` will use the block filter on its next call."""
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


class _BlockMax:
    """Maximum magnitude of every ``_BLOCK``-entry block of rows being assembled.

    The assemblers fill it parameter by parameter while the parameter's entries are still
    in cache (:meth:`scan`), or without reading them at all for outer-product gradients
    (:meth:`outer`), so that the selection needs no separate pass over the rows.
    """

    def __init__(self, R: int, n_pad: int, dtype, device, signed: bool,
                 plans: dict | None = None) -> None:
        self.bmag = torch.zeros((R, n_pad // _BLOCK), dtype=dtype, device=device)
        self.signed = signed
        # index plans of :meth:`outer` per region, shareable between row chunks
        self._plans = {} if plans is None else plans

    def _reduce(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return _max_magnitude(t, dim, self.signed)

    def _edge(self, rows: torch.Tensor, lo: int, hi: int) -> None:
        # a block only partly in [lo, hi): combine with what other parameters put there
        if hi > lo:
            b = lo // _BLOCK
            self.bmag[:, b] = torch.maximum(self.bmag[:, b], self._reduce(rows[:, lo:hi], 1))

    def _split(self, lo: int, hi: int) -> tuple[int, int]:
        return -(-lo // _BLOCK), hi // _BLOCK  # first and one-past-last whole block

    def scan(self, rows: torch.Tensor, lo: int, hi: int) -> None:
        """Record the blocks of columns ``[lo, hi)`` of ``rows`` (R, N_pad) by reading them."""
        b0, b1 = self._split(lo, hi)
        if b0 > b1:  # inside one block
            self._edge(rows, lo, hi)
            return
        self._edge(rows, lo, b0 * _BLOCK)
        self._edge(rows, b1 * _BLOCK, hi)
        if b1 > b0:
            whole = rows[:, b0 * _BLOCK : b1 * _BLOCK].unflatten(1, (b1 - b0, _BLOCK))
            self.bmag[:, b0:b1] = self._reduce(whole, 2)

    def outer_reads(self, lo: int, Q: int, I: int) -> bool:
        """Whether :meth:`outer` reads the region's columns (all but its edges otherwise)."""
        b0, b1 = self._split(lo, lo + Q * I)
        return b1 <= b0 or I < _BLOCK

    def outer(self, rows: torch.Tensor, lo: int, ga: torch.Tensor, xa: torch.Tensor) -> None:
        """Record columns ``[lo, lo + Q * I)`` holding ``ga[:, q] * xa[:, i]`` at ``q * I + i``.

        ``ga`` (R, Q) and ``xa`` (R, I) are non-negative. The maximum of a block is
        ``ga[q] * max(xa over the block's part of row q)`` (at most two rows when
        ``I >= _BLOCK``), exactly the maximum of the stored products: rounding a product
        by a fixed factor is monotonic. Ranges come from a sliding-window, a suffix and a
        prefix maximum of ``xa``, so the cost is ``O(I * _BLOCK + n_blocks)`` per row
        instead of a pass over ``Q * I`` entries. With ``I < _BLOCK`` (a block spans many
        rows) or no whole block, the columns are read (:meth:`scan`).
        """
        Q, I = ga.shape[1], xa.shape[1]
        hi = lo + Q * I
        if self.outer_reads(lo, Q, I):
            self.scan(rows, lo, hi)
            return
        b0, b1 = self._split(lo, hi)
        self._edge(rows, lo, b0 * _BLOCK)
        self._edge(rows, b1 * _BLOCK, hi)
        key = (lo, Q, I, str(xa.device))
        plan = self._plans.get(key)
        if plan is None:
            local = torch.arange(b0, b1, device=xa.device) * _BLOCK - lo
            q1 = torch.div(local, I, rounding_mode="floor")
            i1 = local - q1 * I
            fits = i1 + _BLOCK <= I
            plan = (q1, i1, fits, (q1 + 1).clamp(max=Q - 1),
                    (i1 + _BLOCK - I - 1).clamp(min=0), i1.clamp(max=I - _BLOCK))
            self._plans[key] = plan
        q1, i1, fits, q2, e, i1w = plan
        win = F.max_pool1d(xa[:, None], _BLOCK, stride=1)[:, 0]  # max over [i, i + B)
        suf = torch.flip(torch.cummax(torch.flip(xa, (1,)), 1).values, (1,))
        pre = torch.cummax(xa, 1).values
        first = ga.index_select(1, q1) * torch.where(fits, win.index_select(1, i1w),
                                                     suf.index_select(1, i1))
        second = torch.where(fits, torch.zeros_like(first),
                             ga.index_select(1, q2) * pre.index_select(1, e))
        self.bmag[:, b0:b1] = torch.maximum(first, second)


_DEFER_MAX_FRAC = 0.15


class _Deferred:
    """Outer-product regions of assembled rows, left unwritten until an entry is read.

    Columns ``[lo, lo + Q * I)`` of row ``r`` stand for ``u[r, q] * v[r, i]`` at column
    ``lo + q * I + i``. Writing them is a pass over ``Q * I`` entries per row (58% of the
    benchmark CNN's low-rank rows, nearly all of an MLP's), while the block filter of
    :func:`_select_topk` reads only the subsample, the candidate blocks and the picked
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

        Needs ``I >= _BLOCK`` (a block then spans at most two values of ``q``)."""
        u, v = u.contiguous(), v.contiguous()
        I = v.shape[1]
        hi = lo + u.shape[1] * I
        w0, w1 = -(-lo // _BLOCK) * _BLOCK, hi // _BLOCK * _BLOCK  # whole blocks
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
        """Put the deferred values into ``out`` ``(n, _BLOCK)``, read from blocks
        ``blocks`` (block numbers within the row) of rows ``rows``. Edge blocks of a
        region were written by :meth:`add`; a whole block is a window of ``v`` times
        ``u[q]``, or ``u[q + 1]`` past the end of the outer product's row ``q``."""
        start = blocks * _BLOCK
        for k, (lo, hi, u, v) in enumerate(self.regions):
            hit = torch.nonzero((start >= lo) & (start + _BLOCK <= hi)).squeeze(1)
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
                self._ext[k] = torch.cat([v, v[:, : _BLOCK - 1]], 1).reshape(-1)
            win = self._ext[k].unfold(0, _BLOCK, 1).index_select(0, r * (I + _BLOCK - 1) + i)
            vals = win * u.view(-1).index_select(0, r * Q + q)[:, None]
            cross = torch.nonzero(i > I - _BLOCK).squeeze(1)  # blocks crossing a row
            if cross.numel():
                rc, qc, ic = r[cross], q[cross], i[cross]
                past = torch.arange(_BLOCK, device=r.device) >= (I - ic)[:, None]
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


def _select_topk(
    values: torch.Tensor, k: int, *, signed: bool, n_valid: int | None = None,
    generator: torch.Generator | None = None, state: dict | None = None,
    block_max: torch.Tensor | None = None, method: str = "auto",
    deferred: _Deferred | None = None,
) -> torch.Tensor:
    """Column indices of the ``k`` entries of largest magnitude of each row of ``values``.

    Parameters
    ----------
    values : tensor of shape (R, N_pad)
        Rows to select from; when ``N_pad`` is a multiple of ``_BLOCK`` and the columns
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
    block_max : tensor of shape (R, N_pad // _BLOCK), default=None
        Maximum magnitudes of the blocks, when the caller computed them more cheaply than
        a pass over ``values``; used only by the block filter.
    method : {"auto", "filter", "topk"}, default="auto"
        ``"filter"``: the threshold filter below; ``"topk"``: one ``torch.topk`` of the
        magnitudes; ``"auto"``: ``"topk"`` on a GPU, ``"filter"`` on a CPU.
    deferred : _Deferred, default=None
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
    of every block of ``_BLOCK`` consecutive entries; only blocks whose maximum reaches
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
        return idx.masked_fill(vals <= 0, -1)
    if method not in ("auto", "filter"):
        raise ValueError(f"method must be 'auto', 'filter' or 'topk', got {method!r}")
    if Np % _BLOCK:
        if deferred:
            deferred.materialize()
        pad = torch.zeros((R, _BLOCK - Np % _BLOCK), dtype=values.dtype, device=device)
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
            return idx.masked_fill(vals <= 0, -1)
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
    nb = Np // _BLOCK
    use_blocks = _wants_blocks(state)
    if deferred and not use_blocks:
        deferred.materialize()
    if state is not None:
        state["calls"] = state.get("calls", 0) + 1
    if use_blocks:
        # the max |value| of every block (one pass unless given); gather only blocks
        # reaching t
        blocks = values.reshape(R * nb, _BLOCK)
        bmag = _max_magnitude(blocks, 1, signed) if block_max is None else block_max
        bflat = torch.nonzero((bmag.reshape(R, nb) >= t[:, None]).view(-1)).squeeze(1)
        if state is not None:
            state["block_frac"] = bflat.numel() / max(1, R * nb)
        cand = blocks.index_select(0, bflat)  # (n_blocks, _BLOCK)
        brow = torch.div(bflat, nb, rounding_mode="floor")
        if deferred:
            deferred.patch_blocks(cand, brow, bflat - brow * nb)
        if signed:
            cand = cand.abs()
        hit = cand >= t.index_select(0, brow)[:, None]
        flat = torch.nonzero(hit.view(-1)).squeeze(1)
        e_blk = torch.div(flat, _BLOCK, rounding_mode="floor")
        rows = brow.index_select(0, e_blk)
        cols = (bflat.index_select(0, e_blk) - rows * nb) * _BLOCK + (flat - e_blk * _BLOCK)
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
            out[:, :width] = cidx.gather(1, tp).masked_fill(tv < 0, -1)
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
            out[rows_bad] = idx.masked_fill(vals <= 0, -1)
    return out


def _rows_to_csr_parts(vals: torch.Tensor, sel: torch.Tensor, scale: torch.Tensor,
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


def _pad_cat(parts: list[torch.Tensor], fill) -> torch.Tensor:
    """Row-wise concatenation of ``(R_i, w_i)`` tensors, padded to the widest."""
    w = max(p.shape[1] for p in parts)
    return torch.cat([p if p.shape[1] == w else F.pad(p, (0, w - p.shape[1]), value=fill)
                      for p in parts])


# ---------------------------------------------------------------------------------------------
# per-layer per-example gradient rules
# ---------------------------------------------------------------------------------------------
def _plain(module, base) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def _supported(module) -> bool:
    if _plain(module, nn.Linear) or _plain(module, nn.Conv2d) or _plain(module, nn.Conv1d):
        return True
    if _plain(module, nn.LayerNorm):
        return True
    if _plain(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d
    ):
        return True
    return False


class _Contrib:
    """A per-example, per-class gradient contribution to one parameter.

    Four forms, all meaning a ``(c, Bc, numel)`` block:

    * ``block``: the block itself;
    * outer (``g`` ``(c, Bc, O)``, ``x`` ``(Bc, I)``): ``block[c, b] = outer(g[c, b], x[b])``;
    * product (``left`` ``(Bc, c, G, O, L)``, ``right`` ``(Bc, 1, G, L, K)``):
      ``block[c, b] = (left[b, c] @ right[b, 0])`` flattened (sequence Linear, conv);
    * per-class product (``lefts``, a list of ``c`` tensors ``(Bc, O, L)``, ``right``
      ``(Bc, L, K)``): ``block[j, b] = lefts[j][b] @ right[b]`` flattened. The backward
      passes give one cotangent tensor per class; stacking them for one large ``bmm``
      costs a copy as large as the layer's output times ``c`` (measured: 14 of 20 ms of a
      32-example first conv layer), so this form multiplies class by class instead.
    """

    __slots__ = ("block", "g", "x", "_left", "lefts", "right")

    def __init__(self, block=None, g=None, x=None, left=None, right=None, lefts=None):
        self.block, self.g, self.x, self.right = block, g, x, right
        self._left, self.lefts = left, lefts

    @property
    def is_outer(self) -> bool:
        return self.g is not None

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
        if self.g is not None:
            c, Bc, O = self.g.shape
            return (self.g[:, :, :, None] * self.x[None, :, None, :]).reshape(c, Bc, -1)
        prod = self._product()  # (Bc, c, G, O, K)
        return prod.reshape(prod.shape[0], prod.shape[1], -1).transpose(0, 1)

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
        if self.g is not None:
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
        if self.g is not None:
            h = torch.einsum("cbo,cb->bo", self.g, w)
            return (h.T @ self.x).reshape(-1)
        if self.is_product:
            Bc, c, G, O, L = self.left.shape
            h = torch.einsum("bcgol,cb->gobl", self.left, w).reshape(G, O, Bc * L)
            r = self.right[:, 0].permute(1, 0, 2, 3).reshape(G, Bc * L, -1)
            return torch.bmm(h, r).reshape(-1)
        return torch.einsum("cbn,cb->n", self.block, w)


def _conv_patches(mod, x):
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


def _uses_per_class(mod, x: torch.Tensor) -> bool:
    """Whether ``mod``'s weight gradient takes the per-class product form.

    Stacking the ``c`` cotangents costs a copy of ``c * O * L`` values per example, the
    product ``c * O * L * K`` multiply-adds: for ``K`` (inputs per output: channels times
    kernel size, or features) of 64 and more the copy is negligible and one large
    ``bmm`` per row chunk runs faster (measured on 2 cores); below, class by class.
    """
    if isinstance(mod, nn.Linear):  # a sequence Linear
        return x.dim() > 2 and x[0].numel() > x.shape[-1] and x.shape[-1] < _PER_CLASS_K
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1:
        return mod.in_channels * math.prod(mod.kernel_size) < _PER_CLASS_K
    return False


_PER_CLASS_K = 64


def _per_class_bias(mod, lst: list) -> torch.Tensor:
    """``(c, Bc, C)`` bias gradients of a conv or sequence Linear from per-class cotangents."""
    Bc = lst[0].shape[0]
    if isinstance(mod, nn.Linear):
        return torch.stack([t.reshape(Bc, -1, t.shape[-1]).sum(1) for t in lst])
    return torch.stack([t.reshape(Bc, mod.out_channels, -1).sum(-1) for t in lst])


def _module_contribs(mod, x, g, pid_of: dict, bias: torch.Tensor | None = None
                     ) -> list[tuple[int, _Contrib]]:
    """Per-example, per-class gradient contributions of ``mod``'s selected parameters.

    ``x`` is the module input ``(Bc, ...)``, ``g`` the output cotangents: a ``(c, Bc, ...)``
    tensor, or a list of ``c`` tensors ``(Bc, ...)`` (one per class, as the backward passes
    give them). Weights of convolutions and sequence Linears use the list as it is (the
    per-class product form); every other rule gets it stacked. ``bias``, when given, is the
    bias gradient of those two (:func:`_per_class_bias`, computed once for the whole
    batch: per row chunk it would be ``c`` small reductions each).
    """
    lst = g if isinstance(g, list) else None
    if lst is not None:
        c, Bc = len(lst), lst[0].shape[0]
        if not _uses_per_class(mod, x):
            # (Bc, c, ...) contiguous, seen as (c, Bc, ...): the layout the rules want
            g = torch.stack(lst, dim=1).transpose(0, 1)
            lst = None
    else:
        c, Bc = g.shape[0], g.shape[1]
    out: list[tuple[int, _Contrib]] = []
    w_id = pid_of.get(id(mod.weight)) if getattr(mod, "weight", None) is not None else None
    b_id = pid_of.get(id(mod.bias)) if getattr(mod, "bias", None) is not None else None
    if isinstance(mod, nn.Linear):
        I = x.shape[-1]
        x3 = x.reshape(Bc, -1, I)
        if lst is not None:
            O = lst[0].shape[-1]
            gl = [t.reshape(Bc, -1, O) for t in lst]  # (Bc, T, O) per class
            if w_id is not None:
                out.append((w_id, _Contrib(lefts=[t.transpose(1, 2) for t in gl], right=x3)))
            if b_id is not None:
                out.append((b_id, _Contrib(
                    block=_per_class_bias(mod, lst) if bias is None else bias)))
            return out
        O = g.shape[-1]
        g4 = g.reshape(c, Bc, -1, O)
        if w_id is not None:
            if x3.shape[1] == 1:
                out.append((w_id, _Contrib(g=g4[:, :, 0, :], x=x3[:, 0, :])))
            else:
                left = g4.permute(1, 0, 3, 2)[:, :, None]  # (Bc, c, 1, O, T)
                out.append((w_id, _Contrib(left=left, right=x3[:, None, None])))
        if b_id is not None:
            out.append((b_id, _Contrib(block=g4.sum(2))))
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        Cout, G = mod.out_channels, mod.groups
        if w_id is not None:
            pt = _conv_patches(mod, x)  # (Bc, Cin*k, L)
            L = pt.shape[-1]
            if lst is not None:  # groups == 1
                out.append((w_id, _Contrib(lefts=[t.reshape(Bc, Cout, L) for t in lst],
                                           right=pt.transpose(1, 2))))
            else:
                pt = pt.reshape(Bc, 1, G, -1, L).transpose(-1, -2)  # (Bc, 1, G, L, K)
                left = g.reshape(c, Bc, G, Cout // G, L).transpose(0, 1)
                out.append((w_id, _Contrib(left=left, right=pt)))
        if b_id is not None:
            if lst is None:
                bias = g.reshape(c, Bc, Cout, -1).sum(-1)
            elif bias is None:
                bias = _per_class_bias(mod, lst)
            out.append((b_id, _Contrib(block=bias)))
    elif isinstance(mod, nn.LayerNorm):
        ns = tuple(mod.normalized_shape)
        n = math.prod(ns)
        gg = g.reshape(c, Bc, -1, n)
        if w_id is not None:
            xh = F.layer_norm(x, ns, eps=mod.eps).reshape(Bc, -1, n)
            out.append((w_id, _Contrib(block=(gg * xh[None]).sum(2))))
        if b_id is not None:
            out.append((b_id, _Contrib(block=gg.sum(2))))
    elif isinstance(mod, nn.Embedding):
        if w_id is not None:
            V, D = mod.num_embeddings, mod.embedding_dim
            idx = x.reshape(Bc, -1)
            T = idx.shape[1]
            gg = g.reshape(c, Bc * T, D)
            if mod.padding_idx is not None:
                gg = gg * (idx.reshape(-1) != mod.padding_idx).to(gg.dtype)[None, :, None]
            flat = (torch.arange(Bc, device=idx.device)[:, None] * V + idx).reshape(-1)
            w = torch.zeros((c, Bc * V, D), dtype=g.dtype, device=g.device)
            w.index_add_(1, flat, gg)
            out.append((w_id, _Contrib(block=w.reshape(c, Bc, V * D))))
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        C = mod.num_features
        gg = g.reshape(c, Bc, C, -1)
        if w_id is not None:
            shape = (1, C) + (1,) * (x.dim() - 2)
            xh = (x - mod.running_mean.reshape(shape)) * torch.rsqrt(
                mod.running_var.reshape(shape) + mod.eps
            )
            out.append((w_id, _Contrib(block=(gg * xh.reshape(Bc, C, -1)[None]).sum(-1))))
        if b_id is not None:
            out.append((b_id, _Contrib(block=gg.sum(-1))))
    else:  # pragma: no cover - guarded by _supported
        raise TypeError(type(mod))
    return out


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


# ---------------------------------------------------------------------------------------------
# the engine (one per compute call; holds hooks and the parameter plan)
# ---------------------------------------------------------------------------------------------
_END = object()  # end of an iterator


class _NeedsOneThread(Exception):
    """A batch run on a worker thread needs parameters moved to the generic path."""


class _Record:
    __slots__ = ("module", "x", "out", "version")

    def __init__(self, module, x, out):
        self.module, self.x, self.out = module, x, out
        self.version = x._version


class _Engine:
    def __init__(self, est: PEFTransformer, layout: ParameterLayout, n_slots: int):
        self.est = est
        self.model = est.model
        self.forward = est.forward if est.forward is not None else _default_forward
        self.layout = layout
        self.n_slots = n_slots
        self.kind = est.kind
        self.k = int(est.n_values)
        self.out_dtype = np.dtype(est.dtype)
        chosen = select_parameters(self.model, est.params)
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self.pid_of = {id(p): i for i, p in enumerate(self.params)}
        self.offsets = list(layout.offsets)
        self.sizes = list(layout.sizes)
        self.m = layout.n_params
        self.device = self.params[0].device
        self.generator = torch.Generator(device="cpu").manual_seed(0)
        self.chunk_elements = getattr(est, "_chunk_elements", 2**25)
        # leave outer-product blocks unwritten where the block filter allows (_Deferred)
        self.defer = getattr(est, "_defer_outer", True)
        self._plan()
        self.records: list[_Record] = []
        self.buffers: dict[str, torch.Tensor] = {}
        self.select_state: dict = {}
        self.block_plans: dict = {}  # index plans of _BlockMax.outer, per region
        self.bias_sums: dict[int, torch.Tensor] = {}  # per batch, see _chunk_contribs
        self.no_expand: set[int] = set()
        self.expanded: set[int] = set()
        self.batch_hint: int | None = None
        # the thread whose forward pass the hooks record (None: none); engines of other
        # worker threads hook the same modules
        self.recording_thread: int | None = None
        self.handles: list = []
        # whether engines of other threads run batches of the same model concurrently
        self.shared = False
        self.verified = False
        self.loop_warned = False

    # -- plan ----------------------------------------------------------------------------------
    def _plan(self):
        owners: dict[int, list] = {}
        blocked_prefixes = []
        for name, mod in self.model.named_modules(remove_duplicate=False):
            direct = list(mod.named_parameters(recurse=False))
            if direct and not _supported(mod):
                blocked_prefixes.append(name + "." if name else "")
            for _, p in direct:
                owners.setdefault(id(p), []).append((name, mod))
        self.hooked_modules = {}
        fallback = set()
        for pid, p in enumerate(self.params):
            mods = owners.get(id(p), [])
            ok = bool(mods)
            for name, mod in mods:
                if not _supported(mod) or any(
                    (name + ".").startswith(bp) and name + "." != bp for bp in blocked_prefixes
                ):
                    ok = False
            if ok:
                for _, mod in mods:
                    self.hooked_modules[id(mod)] = mod
            else:
                fallback.add(pid)
        self.fallback = fallback
        self._refresh_hooked()

    def _refresh_hooked(self):
        # modules whose every selected parameter went to the generic path need no hook
        keep = {}
        for key, mod in self.hooked_modules.items():
            ps = [p for p in mod.parameters(recurse=False) if id(p) in self.pid_of]
            if any(self.pid_of[id(p)] not in self.fallback for p in ps):
                keep[key] = mod
        self.hooked_modules = keep

    def move_to_fallback(self, pids):
        self.fallback |= set(pids)
        self._refresh_hooked()
        self.remove_hooks()
        self.add_hooks()

    # -- hooks -------------------------------------------------------------------------------
    def _hook(self, module, args, output):
        if (self.recording_thread != threading.get_ident() or not args
                or not isinstance(args[0], torch.Tensor)):
            return None
        if not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        B = self.batch_hint
        if (isinstance(module, nn.Embedding) and B and B > 1 and output.dim() >= 1
                and output.shape[0] == 1 and x.dim() >= 1 and x.shape[0] == 1
                and id(module) not in self.no_expand):
            # an embedding of ids shared by the batch (e.g. position ids of shape (1, T)),
            # broadcast later: give every example its own copy so that its gradient stays
            # per example. Checked by _verify; undone if the model rejects it.
            self.expanded.add(id(module))
            x = x.expand(B, *x.shape[1:])
            output = output.expand(B, *output.shape[1:]).clone()
        self.records.append(_Record(module, x, output))
        return output.clone()

    def add_hooks(self):
        for mod in self.hooked_modules.values():
            self.handles.append(mod.register_forward_hook(self._hook))

    def remove_hooks(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- helpers -------------------------------------------------------------------------------
    def _buf(self, name: str, numel: int, dtype) -> torch.Tensor:
        """A reusable flat work buffer (avoids re-faulting large fresh allocations)."""
        b = self.buffers.get(name)
        if b is None or b.numel() < numel or b.dtype != dtype:
            b = torch.empty(numel, dtype=dtype, device=self.device)
            self.buffers[name] = b
        return b[:numel]

    def to_device(self, batch):
        return _to_device(batch, self.device, self.params[0].dtype)

    def cotangents(self, logits: torch.Tensor):
        """Slot cotangents ``(B, c, K)`` at the logits and per-example kept-slot counts."""
        est = self.est
        lg = logits.detach().to(torch.float64)
        probs = torch.softmax(lg, dim=1)
        B, K = probs.shape
        c = min(self.n_slots, K)
        p_sorted, order = torch.sort(probs, dim=1, descending=True)
        p_sorted, order = p_sorted[:, :c], order[:, :c]
        keep = torch.ones_like(p_sorted, dtype=torch.bool)
        if est.min_class_prob is not None:
            keep &= p_sorted >= float(est.min_class_prob)
        n_kept = keep.sum(1)
        c_eff = int(n_kept.max()) if B else 0
        p_sorted, order, keep = p_sorted[:, :c_eff], order[:, :c_eff], keep[:, :c_eff]
        onehot = F.one_hot(order, K).to(torch.float64)
        cot = torch.sqrt(p_sorted)[..., None] * (onehot - probs[:, None, :])
        cot = cot * keep[..., None]
        return cot.to(logits.dtype), c_eff

    # -- per-example gradients -----------------------------------------------------------------
    def _fallback_grads(self, batch, cot) -> dict[int, torch.Tensor]:
        """``{pid: (B, c, numel)}`` for the parameters on the generic path."""
        pids = sorted(self.fallback)
        if not pids:
            return {}
        wrapper = _ForwardWrapper(self.model, self.forward)
        pd = {"model." + self.names[i]: self.params[i].detach() for i in pids}

        def one(xb, cb):
            def f(pdict):
                xb1 = _tree_map(
                    lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, xb
                )
                return torch.func.functional_call(wrapper, pdict, (xb1,))[0]

            _, vjp_fn = torch.func.vjp(f, pd)
            return torch.func.vmap(vjp_fn)(cb)[0]

        in_dims = _tree_map(lambda v: 0 if isinstance(v, torch.Tensor) else None, batch)
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                res = torch.func.vmap(
                    one, in_dims=(in_dims, 0),
                    randomness="different" if self.est.allow_train_mode else "error",
                )(batch, cot)
            return {i: res["model." + self.names[i]].reshape(cot.shape[0], cot.shape[1], -1)
                    for i in pids}
        except Exception as exc:  # noqa: BLE001 - any vmap failure: exact slow path
            if not self.loop_warned:
                warnings.warn(
                    "torch.func.vmap could not batch the generic per-example gradient path "
                    f"({type(exc).__name__}: {str(exc)[:200]}); falling back to a loop over "
                    "examples (exact but slow).",
                    stacklevel=4,
                )
                self.loop_warned = True
        B, c = cot.shape[0], cot.shape[1]
        out = {i: [] for i in pids}
        plist = [self.params[i] for i in pids]
        for b in range(B):
            xb = _tree_map(
                lambda t, b=b: t[b : b + 1] if isinstance(t, torch.Tensor) else t, batch
            )
            with torch.enable_grad():
                lg = _as_logits(self.forward(self.model, xb))
                gs = torch.autograd.grad(
                    lg, plist, grad_outputs=cot[b][:, None, :], is_grads_batched=True,
                    allow_unused=True,
                )
            for i, gi in zip(pids, gs, strict=True):
                if gi is None:
                    gi = torch.zeros((c,) + tuple(self.params[i].shape),
                                     dtype=cot.dtype, device=cot.device)
                out[i].append(gi.reshape(c, -1))
        return {i: torch.stack(v) for i, v in out.items()}

    def _backward(self, logits, inputs, cot_cb, stack: bool = True):
        """Gradients of ``<cot_cb[j], logits>`` w.r.t. ``inputs``, stacked over ``j``."""
        mode = getattr(self.est, "_backward_mode", "auto")
        if mode == "auto":
            # measured: on CPU c backward passes of the batch beat one vmap-ed backward
            # (vmap over the backward graph adds copies); on GPUs the batched one wins.
            mode = "loop" if self.device.type == "cpu" else "batched"
        if mode == "batched":
            try:
                return list(torch.autograd.grad(
                    logits, inputs, grad_outputs=cot_cb, is_grads_batched=True,
                    allow_unused=True, retain_graph=True,
                ))
            except RuntimeError:
                pass
        per = [torch.autograd.grad(logits, inputs, grad_outputs=cot_cb[j],
                                   allow_unused=True, retain_graph=True)
               for j in range(cot_cb.shape[0])]
        if not stack:
            return [None if per[0][t] is None else [pj[t] for pj in per]
                    for t in range(len(inputs))]
        return [None if per[0][t] is None else torch.stack([pj[t] for pj in per])
                for t in range(len(inputs))]

    def _layer_grads(self, logits, cot_cb):
        """Per-class cotangents at every recorded layer output.

        Each entry is a ``(c, B, ...)`` tensor or a list of ``c`` tensors ``(B, ...)``
        (stacked per row chunk, in the layout the per-layer rules want).
        """
        self.bias_sums: dict[int, torch.Tensor] = {}
        outs = [r.out for r in self.records]
        if not outs:
            return []
        return self._backward(logits, outs, cot_cb, stack=False)

    def _chunk_contribs(self, gouts, fb, b0, b1) -> dict[int, list[_Contrib]]:
        contribs: dict[int, list[_Contrib]] = {}
        for i, (rec, g) in enumerate(zip(self.records, gouts, strict=True)):
            if g is None:
                continue
            bias = None
            if isinstance(g, list):
                gc = [t[b0:b1] for t in g]
                mod = rec.module
                if (_uses_per_class(mod, rec.x) and getattr(mod, "bias", None) is not None
                        and self.pid_of.get(id(mod.bias)) is not None):
                    if i not in self.bias_sums:  # once per batch
                        self.bias_sums[i] = _per_class_bias(mod, g)
                    bias = self.bias_sums[i][:, b0:b1]
            else:
                gc = g[:, b0:b1]
            for pid, cb in _module_contribs(rec.module, rec.x[b0:b1], gc, self.pid_of,
                                            bias):
                if pid in self.fallback:
                    continue
                contribs.setdefault(pid, []).append(cb)
        for pid, t in fb.items():
            contribs[pid] = [_Contrib(block=t[b0:b1].transpose(0, 1))]
        return contribs

    def _params_of(self, module) -> list[int]:
        return [self.pid_of[id(p)] for p in module.parameters(recurse=False)
                if id(p) in self.pid_of and self.pid_of[id(p)] not in self.fallback]

    def _check_records(self, B) -> list[int]:
        """Hooked parameters whose module saw no batch axis of size ``B`` first."""
        bad = []
        for rec in self.records:
            if rec.x.dim() == 0 or rec.x.shape[0] != B or rec.out.shape[0] != B:
                bad.extend(self._params_of(rec.module))
        return sorted(set(bad))

    def _verify(self, logits, gouts, cot_cb, B) -> list[int]:
        """Hooked parameters whose per-example gradients fail an exact check.

        With random positive weights ``w`` over (class slot, example), ``sum_jb w_jb a_bj``
        computed from the per-layer rules must equal the gradient of
        ``sum_jb w_jb <cot_bj, logits_b>`` obtained by one ordinary backward pass to the
        parameters. This catches parameters
        used outside their module's ``forward`` and modules whose first input axis is
        not the batch axis.
        """
        hooked = sorted(set(range(len(self.params))) - self.fallback)
        if not hooked:
            return []
        gen = torch.Generator(device="cpu").manual_seed(12345)
        c = cot_cb.shape[0]
        w = (0.5 + torch.rand(c, B, generator=gen, dtype=torch.float64)).to(
            device=cot_cb.device, dtype=cot_cb.dtype)
        # a single backward pass of one random mix of all (class, example) cotangents
        true = torch.autograd.grad(logits, [self.params[i] for i in hooked],
                                   grad_outputs=(cot_cb * w[:, :, None]).sum(0),
                                   allow_unused=True, retain_graph=True)
        tol = 1e-3 if self.params[0].dtype in (torch.float32, torch.float16,
                                               torch.bfloat16) else 1e-8
        sums: dict[int, torch.Tensor] = {}
        step = max(1, min(B, self.chunk_elements // max(1, self.m * 4)))
        with torch.no_grad():
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                contribs = self._chunk_contribs(gouts, {}, b0, b1)
                for pid, cl in contribs.items():
                    for cb in cl:
                        s = cb.weighted_sum(w[:, b0:b1])
                        sums[pid] = s if pid not in sums else sums[pid] + s
        bad = []
        pairs = []
        for pid, t in zip(hooked, true, strict=True):
            t = (torch.zeros(self.sizes[pid], dtype=cot_cb.dtype, device=cot_cb.device)
                 if t is None else t.detach().reshape(-1))
            got = sums.get(pid)
            got = torch.zeros_like(t) if got is None else got.reshape(-1)
            pairs.append((pid, t, got))
        # gradients that vanish in exact arithmetic (e.g. attention key biases) are
        # rounding noise: compare them against the scale of the whole gradient too
        overall = max(float(t.abs().max()) for _, t, _ in pairs)
        for pid, t, got in pairs:
            scale = float(t.abs().max()) + float(got.abs().max()) + 1e-3 * overall
            if float((got - t).abs().max()) > tol * scale + 1e-30:
                bad.append(pid)
        for rec in self.records:
            if rec.x._version != rec.version:
                bad.extend(self._params_of(rec.module))
        return sorted(set(bad))

    # -- one batch -----------------------------------------------------------------------------
    def run_batch(self, batch):
        """Return (counts, indices, data, norms, logits) for one batch."""
        est = self.est
        batch = self.to_device(batch)
        while True:
            self.records = []
            self.recording_thread = threading.get_ident()
            self.expanded = set()
            leaves = [v for v in _tree_leaves(batch) if isinstance(v, torch.Tensor) and v.dim()]
            self.batch_hint = int(leaves[0].shape[0]) if leaves else None
            try:
                with torch.enable_grad():
                    logits = _as_logits(self.forward(self.model, batch))
            except Exception:
                if not self.expanded:
                    raise
                self.no_expand |= self.expanded
                continue
            finally:
                self.recording_thread = None
            if logits.dim() != 2:
                raise ValueError(
                    "the model (or forward) must return logits of shape (batch, n_classes); "
                    f"got shape {tuple(logits.shape)}."
                )
            B = logits.shape[0]
            cot, c_eff = self.cotangents(logits)
            if c_eff == 0:
                gouts, fb = [], {}
                break
            cot_cb = cot.transpose(0, 1).contiguous()
            bad = self._check_records(B)
            gouts = [] if bad else self._layer_grads(logits, cot_cb)
            if not bad and not self.verified:
                bad = self._verify(logits, gouts, cot_cb, B)
                self.verified = True
            if bad and self.shared:
                # moving parameters to the generic path re-hooks modules and swaps their
                # parameters, which other threads' forward passes would see: nothing is
                # changed here, the caller goes on with one thread
                raise _NeedsOneThread(bad)
            if bad:
                warnings.warn(
                    "per-layer rules do not apply to parameters "
                    f"{[self.names[i] for i in bad][:5]} (used outside their module's "
                    "forward, without a leading batch axis, or modified in place); computing "
                    "them with the generic torch.func path (exact, slower).",
                    stacklevel=3,
                )
                self.move_to_fallback(bad)
                continue
            fb = self._fallback_grads(batch, cot.detach())
            break
        logits_np = logits.detach().to(torch.float64).cpu().numpy()
        if c_eff == 0:
            return (np.zeros(B, np.int64), np.zeros(0, np.int64), np.zeros(0, self.out_dtype),
                    np.zeros(B), logits_np)
        width = c_eff * self.m if self.kind == "low_rank" else self.m
        step = max(1, min(B, self.chunk_elements // max(1, width)))
        step = -(-B // -(-B // step))  # equal chunks
        sels, picked, scales, norms = [], [], [], []
        lowrank = self.kind == "low_rank"
        n_valid = c_eff * self.m if lowrank else self.m
        col_map = self._lrm_col_map(c_eff) if lowrank else None
        with torch.no_grad():
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                contribs = self._chunk_contribs(gouts, fb, b0, b1)
                bm = dfr = None
                if _wants_blocks(self.select_state, self.device):
                    bm = _BlockMax(b1 - b0, _padded(n_valid), logits.dtype, self.device,
                                   signed=lowrank, plans=self.block_plans)
                    # computing entries where read beats writing them only when the
                    # filter reads few blocks (measured: 5-6% of them for the benchmark
                    # models' low-rank rows: faster; 28-44% for their diagonal rows: not)
                    frac = self.select_state.get("block_frac", 1.0)
                    dfr = _Deferred() if self.defer and frac < _DEFER_MAX_FRAC else None
                if lowrank:
                    vals, nrm = self._assemble_lrm(contribs, b1 - b0, c_eff, logits.dtype, bm,
                                                   dfr)
                    scale = torch.where(nrm > 0, 1.0 / torch.sqrt(nrm.clamp(min=_EPS)),
                                        torch.zeros_like(nrm))
                else:
                    vals, nrm = self._assemble_diag(contribs, b1 - b0, logits.dtype, bm, dfr)
                    scale = torch.where(nrm > 0, 1.0 / nrm.clamp(min=_EPS),
                                        torch.zeros_like(nrm))
                if not est.normalize:
                    scale = torch.ones_like(nrm)
                sel = _select_topk(vals, self.k, signed=lowrank, n_valid=n_valid,
                                   generator=self.generator, state=self.select_state,
                                   block_max=None if bm is None else bm.bmag, deferred=dfr)
                if est.min_norm is not None:  # below the floor: an empty row
                    sel[nrm < float(est.min_norm)] = -1
                # the values leave the reused buffer now; sorting and conversion to CSR
                # run once per batch
                sels.append(sel)
                cols = sel.clamp(min=0)
                picked.append(vals.gather(1, cols))
                if dfr:
                    dfr.patch(picked[-1], cols)
                scales.append(scale)
                norms.append(nrm)
        counts, idx, data = _rows_to_csr_parts(_pad_cat(picked, 0), _pad_cat(sels, -1),
                                               torch.cat(scales), self.out_dtype, col_map)
        return counts, idx, data, torch.cat(norms).cpu().numpy(), logits_np

    def _assemble_lrm(self, contribs, Bc, c, dtype, bm: _BlockMax | None = None,
                      dfr: _Deferred | None = None):
        """Rows of the a_ij in the *internal* parameter-major layout, and the PEF norms.

        Internally, parameter ``p``'s ``(c, n_p)`` block of every row is contiguous at
        column ``c * offset_p`` (so per-layer products write in place and Gram matrices
        read contiguous blocks); :meth:`_lrm_col_map` turns selected internal columns into
        the slot-major output columns ``j * n_params + offset_p + r``. ``bm``, when given,
        receives the block maxima of the rows; ``dfr``, when given (with ``bm``), the
        outer-product blocks whose maxima ``bm`` gets without reading them, unwritten.
        """
        Np = _padded(c * self.m)
        Abuf = self._buf("A", Bc * Np, dtype).view(Bc, Np)
        if dfr is not None:
            dfr.rows = Abuf
        Abuf[:, c * self.m :].zero_()
        S = torch.zeros((Bc, c, c), dtype=dtype, device=self.device)
        for pid in range(len(self.params)):
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

    def _lrm_col_map(self, c: int):
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

    def _assemble_diag(self, contribs, Bc, dtype, bm: _BlockMax | None = None,
                       dfr: _Deferred | None = None):
        Np = _padded(self.m)
        fbuf = self._buf("A", Bc * Np, dtype).view(Bc, Np)
        if dfr is not None:
            dfr.rows = fbuf
        fbuf[:, self.m :].zero_()
        f = fbuf[:, : self.m]
        for pid in range(len(self.params)):
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
# ---------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total, verbose, desc):
        self.bar = None
        self.verbose = verbose
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()
        if verbose:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="ex")
            except ImportError:  # pragma: no cover
                self.bar = None

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.verbose:
            el = time.perf_counter() - self.t0
            print(f"PEFs: {self.done}/{self.total or '?'} examples, {el:.1f} s", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class PEFTransformer(TransformerMixin, BaseEstimator):
    """Per-example Fisher (PEF) matrices of a PyTorch classifier, sparse.

    Turns examples into diagonal (D-PEF) or low-rank (LRM-PEF) per-example Fishers,
    normalized and sparsified to their ``n_values`` largest entries, ready for
    ``DiagonalNPEFF`` / ``LowRankNPEFF`` in a :class:`~sklearn.pipeline.Pipeline`.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier in eval mode returning logits ``(batch, n_outputs)`` (or an object
        with a ``.logits`` attribute). It is never modified.
    kind : {"diagonal", "low_rank"}, default="diagonal"
        ``"diagonal"``: row ``i`` is ``f_i = sum_j a_ij ** 2`` (width ``n_params_``).
        ``"low_rank"``: row ``i`` is the flattened ``(n_classes_, n_params_)`` matrix of the
        ``a_ij = sqrt(p_j) grad log p_j``, class slots by descending probability.
    n_values : int, default=65536
        Number of entries of largest magnitude kept per row.
    n_classes : int, default=None
        Keep only the ``n_classes`` most probable classes (number of class slots).
        ``None``: all outputs of the model.
    min_class_prob : float, default=None
        Drop classes whose probability is below this threshold (their slots stay empty).
    normalize : bool, default=True
        Divide each PEF by its Frobenius norm (low rank: the ``a_ij`` by its square root)
        before sparsification.
    min_norm : float, default=None
        PEFs whose Frobenius norm is below this value are stored as empty rows (their
        norms are still returned, and the count is reported in a warning). A model
        near-certain of an example has an almost-zero Fisher for it, whose normalized
        entries are mostly rounding noise; pick the floor from the ``norms`` of a first
        :meth:`compute` (e.g. a small fraction of their median). ``None``: keep every
        nonzero PEF.
    params : list of str or callable, default=None
        Parameters to include: names, or a predicate ``(name, param) -> bool``.
        ``None``: every parameter with ``requires_grad=True``.
    forward : callable, default=None
        ``forward(model, batch) -> logits`` for models with another signature. Default:
        ``model(batch)``, ``model(**batch)`` for dicts, ``model(batch[0])`` for
        ``(inputs, targets)`` tuples. The output may also be an object with a ``.logits``
        attribute (transformers). A binary model with one sigmoid logit ``z`` must
        return ``torch.cat([torch.zeros_like(z), z], 1)`` (a single softmax logit has a
        zero Fisher).
    batch_size : int, default=32
        Examples per forward/backward pass; bounds the memory used.
    n_jobs : int, default=None
        Batches computed at once on a CPU, each in its own thread with an equal share of
        torch's intra-op threads (restored afterwards). ``None``: 1; ``-1``: one per
        intra-op thread (``torch.get_num_threads()``). On 2 cores, against one job
        with 2 intra-op threads (``benchmarks/bench_pef.py``, three runs), two jobs
        computed low-rank PEFs 11-16% faster for a small CNN and 24-28% for an MLP,
        but diagonal PEFs 3-5% (CNN) and 3-10% (MLP) slower: measure on your model.
        Memory grows to ``n_jobs`` batches' buffers.
        Results and their order do not depend on it. It has no effect on a GPU, or
        when a parameter needs the generic ``torch.func`` path (which swaps the model's
        parameters while it runs): a batch found to need it on a worker thread is run
        again, with every later batch, on the calling thread. With ``n_jobs > 1`` a
        custom ``forward`` must be thread-safe.
    device : str or torch.device, default=None
        Where to compute; must be the device of the model's parameters (``None``: that
        device). Inputs are moved there.
    dtype : {"float32", "float64"}, default="float32"
        dtype of the returned PEF values. Gradients are computed in the model's dtype.
    allow_train_mode : bool, default=False
        Accept a model in training mode (dropout makes the PEFs random). Batch norm in
        training mode is always refused: it couples the examples of a batch.
    verbose : int, default=0
        Show a progress bar (tqdm when installed) when positive.

    Attributes
    ----------
    layout_ : ParameterLayout
        Flat order of the selected parameters (the column order).
    n_params_ : int
        Number of selected parameter entries.
    n_outputs_ : int
        Number of logits of the model.
    n_classes_ : int
        Number of class slots (low rank).
    n_features_out_ : int
        Width of the PEF rows.

    Examples
    --------
    >>> import torch
    >>> from sknpeff.pef import PEFTransformer
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3)).eval()
    >>> X = torch.randn(10, 4)
    >>> pef = PEFTransformer(model, kind="low_rank", n_values=16).fit(X)
    >>> res = pef.compute(X)
    >>> res.pefs.shape, res.norms.shape
    ((10, 201), (10,))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str = "diagonal",
        n_values: int = 65536,
        n_classes: int | None = None,
        min_class_prob: float | None = None,
        normalize: bool = True,
        min_norm: float | None = None,
        params: Sequence[str] | Callable[[str, nn.Parameter], bool] | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 32,
        n_jobs: int | None = None,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        allow_train_mode: bool = False,
        verbose: int = 0,
    ):
        self.model = model
        self.kind = kind
        self.n_values = n_values
        self.n_classes = n_classes
        self.min_class_prob = min_class_prob
        self.normalize = normalize
        self.min_norm = min_norm
        self.params = params
        self.forward = forward
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.device = device
        self.dtype = dtype
        self.allow_train_mode = allow_train_mode
        self.verbose = verbose

    # -- validation ----------------------------------------------------------------------------
    def _validate(self):
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(self.model).__name__}.")
        if self.kind not in ("diagonal", "low_rank"):
            raise ValueError(f"kind must be 'diagonal' or 'low_rank'; got {self.kind!r}.")
        if (not isinstance(self.n_values, numbers.Integral) or isinstance(self.n_values, bool)
                or self.n_values < 1):
            raise ValueError(f"n_values must be an integer >= 1; got {self.n_values!r}.")
        if self.n_classes is not None and (
            not isinstance(self.n_classes, numbers.Integral) or isinstance(self.n_classes, bool)
            or self.n_classes < 1
        ):
            raise ValueError(f"n_classes must be None or an integer >= 1; got {self.n_classes!r}.")
        if self.min_class_prob is not None and not (
            isinstance(self.min_class_prob, numbers.Real) and 0.0 <= self.min_class_prob <= 1.0
        ):
            raise ValueError(
                f"min_class_prob must be None or a float in [0, 1]; got {self.min_class_prob!r}."
            )
        if self.min_norm is not None and not (
            isinstance(self.min_norm, numbers.Real) and not isinstance(self.min_norm, bool)
            and math.isfinite(self.min_norm) and self.min_norm >= 0
        ):
            raise ValueError(
                f"min_norm must be None or a finite float >= 0; got {self.min_norm!r}."
            )
        if (not isinstance(self.batch_size, numbers.Integral) or isinstance(self.batch_size, bool)
                or self.batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1; got {self.batch_size!r}.")
        if self.n_jobs is not None and (
            not isinstance(self.n_jobs, numbers.Integral) or isinstance(self.n_jobs, bool)
            or not (self.n_jobs == -1 or self.n_jobs >= 1)
        ):
            raise ValueError(f"n_jobs must be None, -1 or an integer >= 1; got {self.n_jobs!r}.")
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}.") from exc
        if dt not in (np.float32, np.float64):
            raise ValueError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}.")
        if self.forward is not None and not callable(self.forward):
            raise ValueError("forward must be None or a callable forward(model, batch).")
        if not isinstance(self.verbose, numbers.Integral):
            raise ValueError(f"verbose must be an integer; got {self.verbose!r}.")
        training = [n or type(m).__name__ for n, m in self.model.named_modules() if m.training]
        bn_train = [n for n, m in self.model.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and (m.training or m.running_mean is None)]
        if bn_train:
            raise ValueError(
                "batch norm layers in training mode (or without running statistics) couple "
                f"the examples of a batch, so per-example Fishers are undefined: {bn_train[:3]}."
                " Call model.eval() first."
            )
        if training and not self.allow_train_mode:
            raise ValueError(
                "the model is in training mode (dropout, batch-norm statistics), which makes "
                f"PEFs random (modules in training mode: {training[:3]}). Call model.eval(), or "
                "pass allow_train_mode=True to proceed anyway."
            )
        params = list(self.model.parameters())
        if not params:
            raise ValueError("model has no parameters.")
        if self.device is not None:
            dev = torch.device(self.device)
            pdev = params[0].device
            if dev.type != pdev.type or (dev.index is not None and dev.index != pdev.index):
                raise ValueError(
                    f"device={self.device!r} but the model's parameters live on {pdev}; move "
                    "the model there (model.to(device)) or leave device=None."
                )

    def _first_batch(self, X):
        n = _n_examples(X)
        if n == 0:
            raise ValueError("X holds no example.")
        return next(iter(_iter_batches(X, min(self.batch_size, 2))))

    def _engine_key(self) -> tuple:
        # what the per-layer plan and its one-batch check depend on
        return (id(self.model), id(self.forward), repr(self.params), self.kind,
                self.n_classes_, self.layout_)

    def _engine(self, learned: tuple | None = None):
        """A new engine; ``learned`` (from :meth:`_learned`) spares it the first-batch
        check. By default, what an earlier call on the same model learned is used."""
        eng = _Engine(self, self.layout_, self.n_classes_)
        if learned is None:
            memo = getattr(self, "_engine_memo", None)
            if memo is not None and memo[0] == self._engine_key():
                learned = memo[1]
        if learned is not None:
            # reuse what a verified engine learned (which parameters need the generic
            # path, the one-batch check, the selection's statistics)
            fallback, no_expand, select_state = learned
            eng.fallback |= fallback
            eng._refresh_hooked()
            eng.no_expand = set(no_expand)
            eng.select_state = dict(select_state)
            eng.verified = True
        return eng

    @staticmethod
    def _learned(eng: _Engine) -> tuple:
        return set(eng.fallback), set(eng.no_expand), dict(eng.select_state)

    def _remember(self, eng: _Engine) -> None:
        if eng.verified:
            self._engine_memo = (self._engine_key(), self._learned(eng))

    def _n_jobs_for(self, eng: _Engine) -> int:
        """Concurrent batches for this engine: 1 on a GPU or with generic-path
        parameters (``torch.func.functional_call`` swaps the model's parameters)."""
        if self.n_jobs is None or eng.device.type != "cpu" or eng.fallback:
            return 1
        return torch.get_num_threads() if self.n_jobs == -1 else int(self.n_jobs)

    def _run_batches(self, eng: _Engine, batches: Iterable) -> Iterator[tuple]:
        """``eng.run_batch`` of every batch, in order, on ``n_jobs`` threads when asked
        for; an engine that has not verified the per-layer rules yet does so on the
        first batch alone (the check may move parameters to the generic path)."""
        it = iter(batches)
        if not eng.verified:
            first = next(it, None)
            if first is None:
                return
            yield eng.run_batch(first)
        n_jobs = self._n_jobs_for(eng)
        if n_jobs == 1:
            for batch in it:
                yield eng.run_batch(batch)
            return
        yield from self._run_threaded(eng, it, n_jobs)

    def _run_threaded(self, eng: _Engine, it: Iterator, n_jobs: int) -> Iterator[tuple]:
        learned = self._learned(eng)
        engines = [eng] + [self._engine(learned) for _ in range(n_jobs - 1)]
        free: queue.SimpleQueue = queue.SimpleQueue()
        for e in engines:
            free.put(e)

        def task(batch):
            e = free.get()  # at most n_jobs tasks run: one engine is always free
            try:
                return e.run_batch(batch)
            finally:
                free.put(e)

        n_threads = torch.get_num_threads()
        pending: deque = deque()  # (future, batch), in order
        redo: list = []
        pool = ThreadPoolExecutor(n_jobs, thread_name_prefix="sknpeff-pef")
        try:
            for e in engines:
                e.shared = True
            for e in engines[1:]:
                e.add_hooks()
            torch.set_num_threads(max(1, n_threads // n_jobs))
            exhausted = False
            while True:
                # bounded look-ahead (bounded memory): at most 2 * n_jobs batches pending
                while not exhausted and len(pending) < 2 * n_jobs:
                    batch = next(it, _END)
                    exhausted = batch is _END
                    if not exhausted:
                        pending.append((pool.submit(task, batch), batch))
                if not pending:
                    break
                fut, batch = pending.popleft()
                try:
                    res = fut.result()
                except _NeedsOneThread:
                    # a later batch needs the generic path: this one and every later one
                    # are run again on this thread, whose engine moves the parameters
                    redo = [batch, *(b for _, b in pending)]
                    break
                yield res
        finally:
            # on an error, an interrupt or an early close: drop what has not started,
            # let the running batches end, then undo everything
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(n_threads)
            for e in engines:
                e.shared = False
            for e in engines[1:]:
                e.remove_hooks()
        for batch in itertools.chain(redo, it):
            yield eng.run_batch(batch)

    # -- sklearn API ---------------------------------------------------------------------------
    def fit(self, X, y=None):
        """Record the parameter layout and the number of classes.

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset
            Examples batched along the first axis (one small batch is run through the
            model to read its number of outputs).
        y : ignored

        Returns
        -------
        self : PEFTransformer
        """
        self._validate()
        self._engine_memo = None
        layout = ParameterLayout.from_model(self.model, self.params)
        batch = self._first_batch(X)
        p0 = next(self.model.parameters())
        with torch.no_grad():
            fwd = self.forward if self.forward is not None else _default_forward
            logits = _as_logits(fwd(self.model, _to_device(batch, p0.device, p0.dtype)))
        if logits.dim() != 2:
            raise ValueError(
                "the model (or forward) must return logits of shape (batch, n_classes); got "
                f"shape {tuple(logits.shape)}."
            )
        n_out = int(logits.shape[1])
        if self.n_classes is not None and self.n_classes > n_out:
            raise ValueError(
                f"n_classes={self.n_classes} is larger than the model's number of outputs "
                f"({n_out})."
            )
        self.layout_ = layout
        self.n_params_ = layout.n_params
        self.n_outputs_ = n_out
        self.n_classes_ = n_out if self.n_classes is None else int(self.n_classes)
        self.n_features_out_ = (
            self.n_classes_ * self.n_params_ if self.kind == "low_rank" else self.n_params_
        )
        if isinstance(X, (np.ndarray, torch.Tensor)) and X.ndim == 2:
            self.n_features_in_ = int(X.shape[1])
        return self

    def partial_fit(self, X, y=None):
        """Like :meth:`fit` on the first call; later calls only check consistency.

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset
        y : ignored

        Returns
        -------
        self : PEFTransformer
        """
        if not hasattr(self, "layout_"):
            return self.fit(X, y)
        self._validate()
        if ParameterLayout.from_model(self.model, self.params) != self.layout_:
            raise ValueError("the model's parameter layout changed since the first fit.")
        return self

    def iter_compute(self, X) -> Iterator[PEFResult]:
        """Compute PEFs batch by batch (one :class:`PEFResult` per batch of ``X``).

        Memory stays bounded by ``batch_size`` whatever the number of examples; pair
        it with :class:`sknpeff.io.PEFWriter` to stream PEFs to disk.
        """
        check_is_fitted(self, "layout_")
        self._validate()
        if ParameterLayout.from_model(self.model, self.params) != self.layout_:
            raise ValueError("the model's parameter layout changed since fit.")
        n = _n_examples(X)
        eng = self._engine()
        selected = eng.params
        saved_rg = [p.requires_grad for p in selected]
        progress = _Progress(n, self.verbose, f"PEFs ({self.kind})")
        n_zero = n_floored = 0
        floor = self.min_norm
        results = self._run_batches(eng, _iter_batches(X, self.batch_size))
        try:
            for p in selected:
                p.requires_grad_(True)
            eng.add_hooks()
            for counts, idx, data, norms, logits in results:
                B = counts.shape[0]
                indptr = np.zeros(B + 1, dtype=np.int64)
                np.cumsum(counts, out=indptr[1:])
                n_zero += int((norms <= 0).sum())
                if floor is not None:
                    n_floored += int(((norms > 0) & (norms < floor)).sum())
                pefs = _make_csr(data, idx, indptr, (B, self.n_features_out_))
                yield PEFResult(
                    pefs=pefs,
                    norms=norms.astype(np.float64),
                    logits=logits.astype(self.dtype),
                    predictions=logits.argmax(axis=1).astype(np.int64),
                    metadata=self._metadata(),
                )
                progress.update(B)
        finally:
            results.close()  # worker threads end before the model is restored
            eng.remove_hooks()
            for p, rg in zip(selected, saved_rg, strict=True):
                p.requires_grad_(rg)
            progress.close()
            self._remember(eng)
        if n_zero:
            warnings.warn(
                f"{n_zero} example(s) have a zero PEF (zero Frobenius norm); they are kept "
                "as empty rows.",
                stacklevel=2,
            )
        if n_floored:
            warnings.warn(
                f"{n_floored} example(s) have a PEF norm below min_norm={floor!r}; they are "
                "stored as empty rows.",
                stacklevel=2,
            )

    def compute(self, X, out: str | None = None, *, overwrite: bool = False) -> PEFResult:
        """PEFs, their norms, the logits and the predictions in one pass.

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset
        out : str or path, default=None
            If given, stream the results to this directory (see :mod:`sknpeff.io`)
            instead of holding them in memory, and return them memory-mapped.
        overwrite : bool, default=False
            Replace an existing store at ``out``.

        Returns
        -------
        result : PEFResult
            With attributes ``pefs``, ``norms``, ``logits`` and ``predictions``.
        """
        if not hasattr(self, "layout_"):
            check_is_fitted(self, "layout_")
        if out is not None:
            from .io import PEFWriter, load_pefs

            with PEFWriter(out, n_cols=self.n_features_out_, kind=self.kind,
                           layout=self.layout_, n_classes=self.n_classes_,
                           dtype=self.dtype, overwrite=overwrite) as w:
                for res in self.iter_compute(X):
                    w.append(res)
            return load_pefs(out)
        parts = list(self.iter_compute(X))
        res = _concat_results(parts, self.n_features_out_, self.dtype, self.n_outputs_)
        res.metadata = self._metadata()
        return res

    def _metadata(self) -> dict:
        return {"kind": self.kind, "n_classes": self.n_classes_, "layout": self.layout_}

    def transform(self, X):
        """Sparse PEF matrix of ``X`` (see DESIGN.md, "Data layouts").

        Parameters
        ----------
        X : array, tensor, dict of tensors, list of per-example items or Dataset

        Returns
        -------
        pefs : scipy.sparse.csr_matrix of shape (n_examples, n_features_out)
        """
        return self.compute(X).pefs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.non_deterministic = False
        tags.requires_fit = True
        return tags


def _make_csr(data, indices, indptr, shape) -> sp.csr_matrix:
    nnz = int(indptr[-1])
    big = max(shape[1], nnz) > np.iinfo(np.int32).max
    it = np.int64 if big else np.int32
    m = sp.csr_matrix(shape, dtype=data.dtype)
    m.data = data
    m.indices = np.asarray(indices, dtype=it)
    m.indptr = np.asarray(indptr, dtype=it)
    return m


def _concat_results(parts: list[PEFResult], n_cols: int, dtype, n_out: int) -> PEFResult:
    if not parts:
        return PEFResult(
            pefs=sp.csr_matrix((0, n_cols), dtype=dtype), norms=np.zeros(0),
            logits=np.zeros((0, n_out), dtype=dtype), predictions=np.zeros(0, np.int64),
        )
    data = np.concatenate([p.pefs.data for p in parts])
    indices = np.concatenate([p.pefs.indices.astype(np.int64, copy=False) for p in parts])
    counts = np.concatenate([np.diff(p.pefs.indptr) for p in parts])
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return PEFResult(
        pefs=_make_csr(data, indices, indptr, (counts.shape[0], n_cols)),
        norms=np.concatenate([p.norms for p in parts]),
        logits=np.concatenate([p.logits for p in parts]),
        predictions=np.concatenate([p.predictions for p in parts]),
    )
