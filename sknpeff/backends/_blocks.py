"""Column blocks: one concept for cache blocking, device shards and distributed ranks.

The two expensive products of every NPEFF iteration are ``A @ Ft`` (sparse rows x
columns times a tall dense factor, result rows x components) and ``A.T @ R``. Both are
computed block by block over contiguous ranges of columns:

* on one CPU, a block's slice of the factor (a few thousand rows of ``Ft``) stays in
  cache while the block's nonzeros are streamed, several times faster than one big
  product;
* on several devices, each device owns a contiguous range of blocks (a *partition*) and
  its slice of ``Ft``; the small results (``rows x r`` and ``r x r``) are all-reduced;
* across processes, each rank owns a partition in the same way.

Every block keeps the CSR matrix of its columns (``A_b``, for ``A_b @ Ft_b``) and the CSR
matrix of their transpose (``At_b``, for ``At_b @ R``, a gather): transposed products
through the same kernels are several times slower. ``At_b`` are zero-copy row ranges of
one CSC copy of the input, so the two together cost about twice the input's bytes.
Each block has fewer than 2**31 nonzeros, so its indices are int32 even when the whole
matrix needs int64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._base import Backend

#: largest number of nonzeros a block may hold (int32 index range)
INT32_MAX_NNZ = 2**31 - 1


@dataclass
class Block:
    """One contiguous range of columns ``[start, stop)``."""

    start: int
    stop: int
    partition: int
    #: the block's columns relative to its partition's first column
    local_start: int
    local_stop: int
    #: backend sparse matrix, rows x (stop - start)
    A: Any
    #: backend sparse matrix, (stop - start) x rows
    At: Any
    nnz: int


def plan_blocks(col_nnz: np.ndarray, block_size: int, max_block_nnz: int) -> list[tuple[int, int]]:
    """Cut columns into contiguous blocks of at most ``block_size`` columns and
    ``max_block_nnz`` nonzeros (a single column is never cut)."""
    n_cols = len(col_nnz)
    if n_cols == 0:
        return []
    bounds = []
    start = 0
    cum = np.concatenate([[0], np.cumsum(col_nnz, dtype=np.int64)])
    while start < n_cols:
        stop = min(start + block_size, n_cols)
        # shrink until the block's nonzeros fit (keep at least one column)
        if cum[stop] - cum[start] > max_block_nnz:
            limit = cum[start] + max_block_nnz
            stop = max(start + 1, int(np.searchsorted(cum, limit, side="right")) - 1)
        bounds.append((start, stop))
        start = stop
    return bounds


def plan_partitions(bounds: list[tuple[int, int]], block_nnz: np.ndarray,
                    n_partitions: int) -> np.ndarray:
    """Assign contiguous runs of blocks to partitions, balancing nonzeros."""
    n_blocks = len(bounds)
    if n_blocks == 0:
        return np.zeros(0, dtype=np.int64)
    n_partitions = min(n_partitions, n_blocks)
    cum = np.cumsum(block_nnz, dtype=np.float64)
    total = cum[-1] if cum[-1] > 0 else 1.0
    # block b goes to the partition its nonzero mass midpoint falls in
    mid = (cum - 0.5 * np.asarray(block_nnz, dtype=np.float64)) / total
    part = np.minimum((mid * n_partitions).astype(np.int64), n_partitions - 1)
    # every partition non-empty and contiguous: fall back to an even split by blocks
    if len(np.unique(part)) < n_partitions:
        part = (np.arange(n_blocks) * n_partitions) // n_blocks
    return part


class ColumnBlocks:
    """A sparse matrix split into column blocks, spread over a backend's partitions.

    Parameters
    ----------
    X : scipy.sparse matrix of shape (n_rows, n_cols)
        The matrix. It is not modified; the blocks hold copies of its values (so the
        caller may drop its own copy once this is built).
    backend : Backend
        Supplies the sparse matrix type, products and all-reduce.
    block_size : int, default=4096
        Columns per block. About 4096 keeps a block's slice of a float32 factor with
        64 components (1 MiB) in a 2-core machine's L2/L3 cache.
    max_block_nnz : int, default=2**31 - 1
        Nonzeros per block at most (blocks then need only int32 indices).
    """

    def __init__(self, X: sp.spmatrix, backend: Backend, block_size: int = 4096,
                 max_block_nnz: int = INT32_MAX_NNZ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}.")
        if max_block_nnz < 1:
            raise ValueError(f"max_block_nnz must be >= 1, got {max_block_nnz!r}.")
        self.backend = backend
        self.n_rows, self.n_cols = (int(s) for s in X.shape)
        self.dtype = X.dtype
        csc = sp.csc_matrix(X)  # one copy (no copy if X is already CSC)
        csc.sort_indices()
        col_nnz = np.diff(csc.indptr)
        self.nnz = int(csc.indptr[-1])
        bounds = plan_blocks(col_nnz, block_size, max_block_nnz)
        block_nnz = np.array([csc.indptr[e] - csc.indptr[s] for s, e in bounds], dtype=np.int64)
        part = plan_partitions(bounds, block_nnz, backend.n_partitions())
        self.n_partitions = int(part.max()) + 1 if len(part) else 1
        self.partition_ranges: list[tuple[int, int]] = []
        for p in range(self.n_partitions):
            ids = np.flatnonzero(part == p)
            self.partition_ranges.append((bounds[ids[0]][0], bounds[ids[-1]][1]))
        if not bounds:
            self.partition_ranges = [(0, self.n_cols)]
        self.blocks: list[Block] = []
        for (s, e), p, nnz in zip(bounds, part, block_nnz, strict=True):
            p = int(p)
            lo, hi = csc.indptr[s], csc.indptr[e]
            indptr = (csc.indptr[s:e + 1] - lo).astype(np.int32)
            indices = csc.indices[lo:hi]
            if indices.dtype != np.int32:  # only when the whole matrix needs int64
                indices = indices.astype(np.int32)
            data = csc.data[lo:hi]
            at = backend.csr(indptr, indices, data, (e - s, self.n_rows), partition=p)
            # A_b: the same block as CSR of shape (rows, e - s)
            a_host = sp.csc_matrix((data, indices, indptr), shape=(self.n_rows, e - s)).tocsr()
            a = backend.csr(a_host.indptr.astype(np.int32), a_host.indices.astype(np.int32),
                            a_host.data, a_host.shape, partition=p)
            p0 = self.partition_ranges[p][0]
            self.blocks.append(Block(s, e, p, s - p0, e - p0, a, at, int(nnz)))

    # ------------------------------------------------------------------ factors
    def split_factor(self, Ft: np.ndarray, dtype: Any = None) -> list[Any]:
        """Split a host factor of shape (n_cols, r) into per-partition device arrays."""
        Ft = np.asarray(Ft)
        if Ft.shape[0] != self.n_cols:
            raise ValueError(f"factor has {Ft.shape[0]} rows, expected {self.n_cols}")
        dtype = dtype or self.dtype
        # a fresh C-ordered host copy per partition: the factor is updated in place
        return [self.backend.asarray(np.array(Ft[s:e], dtype=dtype, order="C"), partition=p)
                for p, (s, e) in enumerate(self.partition_ranges)]

    def gather_factor(self, parts: list[Any]) -> np.ndarray:
        """Concatenate per-partition factors back into one host array (n_cols, r)."""
        return np.concatenate([self.backend.to_numpy(p) for p in parts], axis=0)

    # ----------------------------------------------------------------- products
    def matmul(self, parts: list[Any]) -> Any:
        """``A @ Ft`` (n_rows x r), summed over partitions."""
        xp = self.backend.xp
        r = parts[0].shape[1]
        outs = [xp.zeros((self.n_rows, r), dtype=parts[0].dtype) for _ in parts]
        outs = [self.backend.move(o, p) for p, o in enumerate(outs)]
        for b in self.blocks:
            self.backend.spmm(b.A, parts[b.partition][b.local_start:b.local_stop],
                              out=outs[b.partition], accumulate=True)
        return self.backend.allreduce(outs)

    def rmatmul(self, R: Any) -> list[Any]:
        """``A.T @ R`` as per-partition arrays of shape (n_cols_p, r)."""
        xp = self.backend.xp
        Rs = [self.backend.move(R, p) for p in range(self.n_partitions)]
        outs = []
        for p, (s, e) in enumerate(self.partition_ranges):
            outs.append(self.backend.move(xp.empty((e - s, R.shape[1]), dtype=R.dtype), p))
        for b in self.blocks:
            out = outs[b.partition][b.local_start:b.local_stop]
            self.backend.spmm(b.At, Rs[b.partition], out=out)
        return outs

    def gram(self, parts: list[Any]) -> Any:
        """``Ft.T @ Ft`` (r x r), summed over partitions."""
        return self.backend.allreduce([p.T @ p for p in parts])

    def sweep(self, parts: list[Any], R: Any,
              update: Callable[[Any, Any], None]) -> tuple[Any, Any]:
        """Update the factor block by block and return the products of the new factor.

        For each block ``b``: ``T = At_b @ R``; ``update(Ft_b, T)`` changes the block's
        rows of the factor in place; then ``A_b @ Ft_b`` and ``Ft_b.T @ Ft_b`` of the
        *updated* rows are accumulated. One pass over the factor, each slice touched
        while in cache. Returns ``(A @ Ft_new, Ft_new.T @ Ft_new)``, all-reduced.
        """
        xp = self.backend.xp
        r = parts[0].shape[1]
        Rs = [self.backend.move(R, p) for p in range(self.n_partitions)]
        P = [self.backend.move(xp.zeros((self.n_rows, r), dtype=parts[0].dtype), p)
             for p in range(self.n_partitions)]
        Q = [self.backend.move(xp.zeros((r, r), dtype=parts[0].dtype), p)
             for p in range(self.n_partitions)]
        for b in self.blocks:
            p = b.partition
            Fb = parts[p][b.local_start:b.local_stop]
            T = self.backend.spmm(b.At, Rs[p])
            update(Fb, T)
            self.backend.spmm(b.A, Fb, out=P[p], accumulate=True)
            Q[p] += Fb.T @ Fb
        return self.backend.allreduce(P), self.backend.allreduce(Q)
