"""Input preparation shared by both estimators: PEF rows reshaped to one row per class
slot, columns pruned, row norms and row samples, all in bounded memory.

Sparse input (top-K PEFs) becomes a CSR matrix ``A``; dense input (projected PEFs, whose
every entry is a signed nonzero) becomes a dense array ``A``, so that the products run
as dense BLAS rather than through a sparse format storing every entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["reshape_and_prune", "reshape_and_prune_dense", "row_chunks", "row_sq_norms",
           "sample_rows"]

#: entries handled per chunk of rows in the dense paths (bounds float64 temporaries)
CHUNK_DENSE = 1 << 22

#: nonzeros handled per chunk when re-indexing the input (bounds temporary memory)
CHUNK_NNZ = 1 << 24


def row_chunks(indptr: np.ndarray, chunk_nnz: int | None = None
               ) -> Iterator[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` holding about ``chunk_nnz`` stored values each
    (default: :data:`CHUNK_NNZ`)."""
    chunk_nnz = CHUNK_NNZ if chunk_nnz is None else chunk_nnz
    n = len(indptr) - 1
    r0 = 0
    while r0 < n:
        r1 = int(np.searchsorted(indptr, indptr[r0] + chunk_nnz, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n)
        yield r0, r1
        r0 = r1


def reshape_and_prune(X: sp.csr_matrix, n_slots: int, kept: np.ndarray | None,
                      min_nnz: int, dtype: Any, *, compact: bool = True
                      ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Turn ``(n, n_slots * m)`` PEF rows into ``A`` of shape ``(n * c, m')``.

    Each example spans ``c`` consecutive rows of ``A``, restricted to the kept columns.
    With ``compact`` (the default) an example's rows are its non-empty class slots (those
    with a stored value in a kept column), in slot order, padded with empty rows to
    ``c``, the largest number of non-empty slots of any example (at least 1). The loss
    only sees ``F_i = sum_j a_ij a_ij^T``, which neither the order of the slots nor an
    empty one changes, and PEFs with a per-example class cut-off (``min_class_prob``)
    leave most of their ``n_slots`` slots empty: the work then follows the stored
    values, not the slot count. Without ``compact``, ``c = n_slots`` and row
    ``i * n_slots + j`` is class slot ``j`` of example ``i``. The example count is
    ``X.shape[0]``, so ``c = A.shape[0] // X.shape[0]``.

    When ``kept`` is None the kept columns are chosen here: those with at least
    ``min_nnz`` nonzero entries (over all rows of ``A``); all columns are kept when none
    qualifies. ``X`` is not modified. Work runs over row chunks of about ``CHUNK_NNZ``
    values, so temporaries stay small: ``A`` costs one int32 index per value beside ``X``
    (its ``data`` is shared when ``X``'s rows are sorted, nothing is pruned and the dtype
    matches; otherwise one permuted copy), and the row structure costs one entry per
    non-empty slot (nothing of size ``n * n_slots`` when compacting).

    Returns
    -------
    A : csr_matrix of shape (n * c, len(kept))
    kept : ndarray of int64, the kept parameter indices (sorted)

    A dense ``X`` goes to :func:`reshape_and_prune_dense` (``A`` is then dense).
    """
    if not sp.issparse(X):
        return reshape_and_prune_dense(X, n_slots, kept, min_nnz, dtype, compact=compact)
    n, width = X.shape
    m = width // n_slots
    indptr = np.asarray(X.indptr, dtype=np.int64)
    nnz = int(indptr[-1])
    col_dtype = np.int64 if m > np.iinfo(np.int32).max else np.int32
    # slot-major order within each row is what the reshape needs; sorted rows have it
    ordered = X.has_sorted_indices or n_slots == 1
    # one slot: the columns are X's own indices; share them unless pruning rewrites them
    share = n_slots == 1 and X.indices.dtype == col_dtype
    col = X.indices if share else np.empty(nnz, dtype=col_dtype)
    data = None if ordered else np.empty(nnz, dtype=dtype)
    slot = None if ordered else np.empty(nnz, dtype=np.min_scalar_type(n_slots))
    counts = np.zeros(m, dtype=np.int64) if kept is None else None
    for r0, r1 in row_chunks(indptr):
        lo, hi = indptr[r0], indptr[r1]
        idx = X.indices[lo:hi]
        vals = X.data[lo:hi]
        if share:
            pass
        elif ordered:
            col[lo:hi] = idx % m
        else:  # stable sort of each row's values by class slot
            rows = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(indptr[r0:r1 + 1]))
            s_ = idx // m
            order = np.argsort(rows * n_slots + s_, kind="stable")
            col[lo:hi] = (idx % m)[order]
            data[lo:hi] = vals[order]
            slot[lo:hi] = s_[order]
        if counts is not None:
            counts += np.bincount(col[lo:hi][(data[lo:hi] if data is not None else vals) != 0],
                                  minlength=m)
    if kept is None:
        kept = np.flatnonzero(counts >= min_nnz)
        if kept.size == 0:
            kept = np.arange(m)
    kept = np.asarray(kept, dtype=np.int64)
    colmap = np.full(m, -1, dtype=col_dtype)
    colmap[kept] = np.arange(kept.size, dtype=col_dtype)
    keep_all = kept.size == m
    if share and not keep_all:
        col = col.copy()  # pruning remaps the indices: never in the caller's array
    mask = None if keep_all else np.empty(nnz, dtype=bool)
    # one slot, nothing pruned: A's rows are X's rows (no second pass)
    trivial = n_slots == 1 and keep_all
    # (example * n_slots + slot) of every non-empty slot, ascending, and its value count
    keys: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    for r0, r1 in ([] if trivial else row_chunks(indptr)):
        lo, hi = indptr[r0], indptr[r1]
        rows = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(indptr[r0:r1 + 1]))
        s_ = X.indices[lo:hi] // m if slot is None else slot[lo:hi]
        key = rows * n_slots + s_
        mapped = colmap[col[lo:hi]]
        if mask is not None:
            mask[lo:hi] = mapped >= 0
            key = key[mask[lo:hi]]
        if key.size:  # values are in (row, slot) order: run lengths of the keys
            starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
            keys.append(key[starts])
            sizes.append(np.diff(np.append(starts, key.size)))
        if not keep_all:  # all kept: the map is the identity
            col[lo:hi] = mapped
    del slot
    if trivial:
        c, slot_counts = 1, np.diff(indptr)
    else:
        key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        size = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
        del keys, sizes
        if compact and n_slots > 1:
            example = key // n_slots
            per_example = np.bincount(example, minlength=n)
            c = max(1, int(per_example.max(initial=0)))
            first = np.cumsum(per_example) - per_example  # an example's first key
            key = example * c + (np.arange(key.size) - first[example])
        else:
            c = n_slots
        slot_counts = np.zeros(n * c, dtype=np.int64)
        slot_counts[key] = size
    new_indptr = np.zeros(n * c + 1, dtype=np.int64)
    np.cumsum(slot_counts, out=new_indptr[1:])
    if data is None:
        data = np.asarray(X.data, dtype=dtype)
    if mask is None:
        indices = col
    else:
        data = data[mask]
        indices = col[mask]
        del col
    if new_indptr[-1] <= np.iinfo(np.int32).max:
        new_indptr = new_indptr.astype(np.int32)
        if indices.dtype != np.int32:
            indices = indices.astype(np.int32)
    A = sp.csr_matrix((data, indices, new_indptr), shape=(n * c, kept.size), copy=False)
    return A, kept


def _dense_row_steps(A: np.ndarray) -> int:
    """Rows per chunk of a dense pass over ``A`` (about ``CHUNK_DENSE`` entries)."""
    return max(1, CHUNK_DENSE // max(1, A.shape[1]))


def reshape_and_prune_dense(X: np.ndarray, n_slots: int, kept: np.ndarray | None,
                            min_nnz: int, dtype: Any, *, compact: bool = True
                            ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`reshape_and_prune` for a dense ``X``: ``A`` is a dense array.

    The same rules as for sparse input, with "stored value" read as "nonzero entry":
    a column is kept when it holds at least ``min_nnz`` nonzero entries (all columns
    when none does; on projected PEFs every entry is a signed nonzero, so only a column
    that is zero in nearly every row is dropped), and with ``compact`` an example's
    rows are its slots that are nonzero in a kept column, padded with zero rows to the
    largest count. The result is the same as that of the CSR copy of ``X`` (densified).

    When nothing is pruned and no slot is dropped, ``A`` is a reshaped view of ``X``
    (no copy; the caller must not write to it); otherwise one copy of the kept part.
    ``X`` is not modified.

    Returns
    -------
    A : ndarray of shape (n * c, len(kept))
    kept : ndarray of int64, the kept parameter indices (sorted)
    """
    n, width = X.shape
    m = width // n_slots
    X3 = np.asarray(X).reshape(n, n_slots, m)
    step = _dense_row_steps(X)
    if kept is None:
        counts = np.zeros(m, dtype=np.int64)
        for r0 in range(0, n, step):
            counts += np.count_nonzero(X3[r0:r0 + step], axis=(0, 1))
        kept = np.flatnonzero(counts >= min_nnz)
        if kept.size == 0:
            kept = np.arange(m)
    kept = np.asarray(kept, dtype=np.int64)
    keep_all = kept.size == m
    c, order = n_slots, None
    if compact and n_slots > 1:
        # slots with a nonzero entry in a kept column, per example
        filled = np.empty((n, n_slots), dtype=bool)
        for r0 in range(0, n, step):
            part = X3[r0:r0 + step] if keep_all else X3[r0:r0 + step][:, :, kept]
            filled[r0:r0 + step] = np.any(part != 0, axis=2)
        c = max(1, int(filled.sum(axis=1).max(initial=0)))
        if c < n_slots or not np.all(filled[:, :c]):
            # non-empty slots first, in slot order (a stable sort of "empty")
            order = np.argsort(~filled, axis=1, kind="stable")[:, :c]
    if keep_all and order is None:
        A = X3.reshape(n * c, m)
        return (A if A.dtype == dtype else A.astype(dtype)), kept
    A = np.empty((n, c, kept.size), dtype=dtype)
    for r0 in range(0, n, step):
        part = X3[r0:r0 + step]
        if order is not None:
            part = part[np.arange(part.shape[0])[:, None], order[r0:r0 + step]]
        A[r0:r0 + step] = part if keep_all else part[:, :, kept]
    # a padding row is an empty slot: already zero over the kept columns
    return A.reshape(n * c, kept.size), kept


def row_sq_norms(A: sp.csr_matrix | np.ndarray) -> np.ndarray:
    """Squared L2 norm of every row of a CSR matrix (or a dense array), in float64,
    without copying A."""
    if not sp.issparse(A):
        out = np.empty(A.shape[0], dtype=np.float64)
        step = _dense_row_steps(A)
        for r0 in range(0, A.shape[0], step):
            d = np.asarray(A[r0:r0 + step], dtype=np.float64)
            out[r0:r0 + step] = np.einsum("ij,ij->i", d, d)
        return out
    out = np.zeros(A.shape[0], dtype=np.float64)
    indptr = A.indptr
    for r0, r1 in row_chunks(indptr):
        lo, hi = indptr[r0], indptr[r1]
        d = np.asarray(A.data[lo:hi], dtype=np.float64)
        cs = np.concatenate([[0.0], np.cumsum(d * d)])
        out[r0:r1] = cs[indptr[r0 + 1:r1 + 1] - lo] - cs[indptr[r0:r1] - lo]
    return np.maximum(out, 0.0)


def sample_rows(A: sp.csr_matrix | np.ndarray, n_rows: int,
                rng: np.random.RandomState | None) -> tuple[sp.csr_matrix, np.ndarray]:
    """At most ``n_rows`` random nonzero rows of ``A`` (sorted, as CSR: a small sample,
    also of a dense ``A``) and their L2 norms."""
    norms = np.sqrt(row_sq_norms(A))
    rows = np.flatnonzero(norms > 0)
    if rows.size > n_rows:
        rng = rng if rng is not None else np.random.RandomState(0)
        rows = np.sort(rng.choice(rows, n_rows, replace=False))
    sample = A[rows] if sp.issparse(A) else sp.csr_matrix(A[rows])
    return sample, norms[rows]
