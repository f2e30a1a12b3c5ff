"""Column blocks: one concept for cache blocking, device shards and distributed ranks.

The two expensive products of every NPEFF iteration are ``A @ Ft`` (sparse rows x
columns times a tall dense factor, result rows x components) and ``A.T @ R``. Both are
computed block by block over contiguous ranges of columns:

* on one CPU, a block's slice of the factor (a few thousand rows of ``Ft``) stays in
  cache while the block's nonzeros are streamed, several times faster than one big
  product;
* on several devices, each device owns a contiguous range of blocks (a *partition*) and
  its slice of ``Ft``; the small results (``rows x r`` and ``r x r``) are all-reduced.
  On GPUs a partition is by default one block (cut only at ``max_block_nnz``): cuSPARSE
  gains nothing from cache-sized blocks;
* across processes, each rank owns a partition in the same way, and builds only the
  blocks of its own partitions (:meth:`Backend.local_partitions`).

Blocks are always built on the host, one partition at a time from the columns of that
partition only, and then handed to the backend (which copies them to the partition's
device): an input larger than one device is split before anything is moved.

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
    #: local index of the block's partition (position in the list of factor parts)
    partition: int
    #: the block's columns relative to its partition's first column
    local_start: int
    local_stop: int
    #: backend sparse matrix (or dense array), rows x (stop - start)
    A: Any
    #: backend sparse matrix (or dense view), (stop - start) x rows
    At: Any
    nnz: int
    #: global id of the block's partition (equals ``partition`` in one process)
    global_partition: int = -1
    #: ``At`` split by its columns (rows of ``A``) into ``(row_start, row_stop, tile)``
    #: when the backend asks for row tiles (then ``At`` is None)
    At_tiles: list | None = None

    def at_mats(self) -> list[Any]:
        """The backend matrices that hold ``At`` (one, or its row tiles)."""
        return [self.At] if self.At_tiles is None else [t for _, _, t in self.At_tiles]


def split_row_tiles(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                    n_cols: int, chunk: int, in_place: bool = False
                    ) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Split a CSR matrix (rows x ``n_cols``) into tiles of ``chunk`` columns.

    Returns ``(col_start, col_stop, indptr, indices, data)`` per non-empty tile, indices
    relative to ``col_start``, int32. Entries keep their order within each row. With
    ``in_place`` the entries of ``indices`` (int32) and ``data`` are reordered tile by
    tile in place and the tiles are views of them (no copy of the values).
    """
    n_rows = len(indptr) - 1
    n_chunks = max(1, -(-n_cols // chunk))
    row_ids = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    key = (np.asarray(indices, dtype=np.int64) // chunk) * n_rows + row_ids
    del row_ids
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=n_chunks * n_rows).reshape(n_chunks, n_rows)
    del key
    starts = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])
    if in_place:
        if indices.dtype != np.int32:
            raise ValueError("in-place tiles need int32 indices")
        data[...] = data[order]
        indices[...] = indices[order] % chunk  # relative to each entry's tile
    tiles = []
    for k in range(n_chunks):
        if starts[k] == starts[k + 1]:
            continue
        lo, hi = starts[k], starts[k + 1]
        ip = np.zeros(n_rows + 1, dtype=np.int32)
        np.cumsum(counts[k], out=ip[1:])
        if in_place:
            idx, d = indices[lo:hi], data[lo:hi]
        else:
            sel = order[lo:hi]
            idx = (np.asarray(indices[sel], dtype=np.int64) - k * chunk).astype(np.int32)
            d = data[sel]
        tiles.append((k * chunk, min(n_cols, (k + 1) * chunk), ip, idx, d))
    return tiles


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


def plan_partition_blocks(col_nnz: np.ndarray, n_partitions: int, max_block_nnz: int
                          ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """One block per partition: columns cut into ``n_partitions`` contiguous ranges of
    about equal nonzeros, each range cut further only where it holds more than
    ``max_block_nnz`` nonzeros.

    This is the plan for GPUs: cuSPARSE gains nothing from cache-sized blocks, and each
    extra block is one more kernel launch and one more pass over the output.

    Returns
    -------
    bounds : list of (int, int)
        The blocks' column ranges, in order.
    part : ndarray of int64
        The partition of each block (non-decreasing; ranges of ``n_partitions`` beyond
        the number of columns stay empty).
    """
    n_cols = len(col_nnz)
    if n_cols == 0:
        return [], np.zeros(0, dtype=np.int64)
    n = min(int(n_partitions), n_cols)
    cum = np.concatenate([[0], np.cumsum(col_nnz, dtype=np.int64)])
    total = int(cum[-1])
    if total > 0:  # cut where the running nonzero count crosses k / n of the total
        cuts = np.searchsorted(cum, (np.arange(1, n) * total) // n, side="left")
    else:
        cuts = (np.arange(1, n) * n_cols) // n
    edges = [0]
    for k, c in enumerate(cuts, start=1):  # every range non-empty, in order
        edges.append(int(min(max(int(c), edges[-1] + 1), n_cols - (n - k))))
    edges.append(n_cols)
    bounds: list[tuple[int, int]] = []
    part: list[int] = []
    for p in range(n):
        s, e = edges[p], edges[p + 1]
        for bs, be in plan_blocks(col_nnz[s:e], e - s, max_block_nnz):
            bounds.append((s + bs, s + be))
            part.append(p)
    return bounds, np.asarray(part, dtype=np.int64)


def plan_partitions(bounds: list[tuple[int, int]], block_nnz: np.ndarray,
                    n_partitions: int) -> np.ndarray:
    """Assign contiguous runs of blocks to partitions, balancing nonzeros.

    Returns the partition of each block: non-decreasing, and using every partition
    ``0 .. min(n_partitions, n_blocks) - 1``.
    """
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


def partition_ranges(bounds: list[tuple[int, int]], part: np.ndarray, n_partitions: int,
                     n_cols: int) -> list[tuple[int, int]]:
    """Column range ``[start, stop)`` of each of ``n_partitions`` partitions.

    Partitions without blocks (more partitions than blocks) get an empty range at the
    end of the previous one, so the ranges tile ``[0, n_cols)`` in order.
    """
    ranges = []
    prev = 0
    for p in range(n_partitions):
        ids = np.flatnonzero(part == p)
        if ids.size:
            ranges.append((bounds[ids[0]][0], bounds[ids[-1]][1]))
        else:
            ranges.append((prev, prev))
        prev = ranges[-1][1]
    if bounds and prev != n_cols:  # pragma: no cover - plan_blocks covers every column
        raise AssertionError("partitions do not cover all columns")
    return ranges


def column_nnz(X: sp.spmatrix, chunk: int = 1 << 24) -> np.ndarray:
    """Stored entries per column of ``X`` without converting it (bounded temporaries)."""
    n_cols = int(X.shape[1])
    if X.format == "csc":
        return np.diff(np.asarray(X.indptr, dtype=np.int64))
    if X.format == "coo":
        idx = X.col
    else:
        if X.format != "csr":
            X = sp.csr_matrix(X)
        idx = X.indices
    counts = np.zeros(n_cols, dtype=np.int64)
    for s in range(0, len(idx), chunk):
        counts += np.bincount(idx[s:s + chunk], minlength=n_cols)
    return counts


def columns_csc(X: sp.spmatrix, start: int, stop: int) -> sp.csc_matrix:
    """Host CSC copy of the columns ``[start, stop)`` of ``X`` (sorted indices).

    Only those columns are copied; for the whole range of a CSC input, no copy.
    """
    n_cols = int(X.shape[1])
    if start == 0 and stop == n_cols:
        csc = sp.csc_matrix(X)
    elif X.format == "csc":
        csc = X[:, start:stop]
    else:
        csr = X if X.format == "csr" else sp.csr_matrix(X)
        csc = csr[:, start:stop].tocsc()
    if not csc.has_sorted_indices:
        csc = csc.sorted_indices()  # a copy: the caller's arrays are never touched
    return csc


def resolve_block_size(block_size: int | str | None, backend: Backend) -> int | None:
    """Columns per block for ``backend``: an int, or None for one block per partition.

    ``"auto"`` is the backend's choice (:attr:`Backend.default_block_size`).
    """
    if isinstance(block_size, str):
        if block_size != "auto":
            raise ValueError(f"block_size must be a positive integer, 'auto' or None, got "
                             f"{block_size!r}.")
        return backend.default_block_size
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, 'auto' or None, got "
                         f"{block_size!r}.")
    return int(block_size)


class ColumnBlocks:
    """A sparse matrix split into column blocks, spread over a backend's partitions.

    Parameters
    ----------
    X : scipy.sparse matrix or ndarray of shape (n_rows, n_cols)
        The matrix. A dense array gets dense blocks (C-ordered column copies, their
        transposes views) and dense products (BLAS). It is not modified; the blocks
        hold copies of its values (so the caller may drop its own copy once this is
        built). In a distributed job every process passes the same matrix (a memory
        map is fine) and only the columns of its own partitions are read into blocks.
    backend : Backend
        Supplies the sparse matrix type, products, placement and all-reduce.
    block_size : int, "auto" or None, default="auto"
        Columns per block. ``"auto"``: the backend's choice
        (:attr:`Backend.default_block_size`): 4096, which keeps a block's slice of a
        float32 factor with 64 components (1 MiB) in a 2-core machine's L2/L3 cache and
        in a GPU's L2 cache. ``None``: one block per partition (columns
        balanced by nonzeros), cut only where a block would exceed ``max_block_nnz``.
        Integer blocks are cut smaller when there would otherwise be fewer blocks than
        partitions.
    max_block_nnz : int, default=2**31 - 1
        Nonzeros per block at most (blocks then need only int32 indices).
    transpose : bool, default=True
        Also hold each block's transpose (for :meth:`rmatmul` and :meth:`sweep`). With
        ``False`` only :meth:`matmul` and :meth:`gram` are available, and on one
        partition the matrix is used as it is (no copy).
    owned : bool, default=False
        ``X`` is a private CSC copy that the blocks may reorder and keep (the caller
        drops its reference): the row tiles of the transposes are then views of it, and
        memory stays at one CSC copy plus the row-major blocks.

    Attributes
    ----------
    n_partitions : int
        Number of partitions held by this process (the length of the factor part lists
        the methods take and return).
    n_global_partitions : int
        Number of partitions of the whole job.
    local_partitions : list of int
        Global ids of this process's partitions.
    partition_ranges : list of (int, int)
        Column range of each local partition (aligned with the factor parts).
    global_partition_ranges : list of (int, int)
        Column range of every partition of the job; they tile ``[0, n_cols)``.
    blocks : list of Block
        This process's blocks, in column order.
    block_size : int or None
        The resolved ``block_size`` (None: one block per partition).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> from sknpeff.backends import ColumnBlocks, NumpyBackend
    >>> A = sp.random(30, 100, density=0.1, format="csr", random_state=0)
    >>> blocks = ColumnBlocks(A, NumpyBackend(n_partitions=2), block_size=16)
    >>> F = np.ones((100, 3))
    >>> np.allclose(blocks.matmul(blocks.split_factor(F)), A @ F)
    True
    """

    def __init__(self, X: sp.spmatrix, backend: Backend, block_size: int | str | None = "auto",
                 max_block_nnz: int = INT32_MAX_NNZ, transpose: bool = True,
                 owned: bool = False) -> None:
        block_size = resolve_block_size(block_size, backend)
        if max_block_nnz < 1:
            raise ValueError(f"max_block_nnz must be >= 1, got {max_block_nnz!r}.")
        if max_block_nnz > INT32_MAX_NNZ:
            raise ValueError(f"max_block_nnz must be <= 2**31 - 1 (int32 block indices), "
                             f"got {max_block_nnz!r}.")
        # a dense X (projected PEFs: every entry a nonzero) gets dense blocks and dense
        # products; converting it to a sparse format would store every entry's index
        self.dense = not sp.issparse(X)
        if self.dense:
            X = np.asarray(X)
        self._owned = not self.dense and bool(owned) and X.format == "csc" \
            and X.has_sorted_indices
        self.backend = backend
        self.n_rows, self.n_cols = (int(s) for s in X.shape)
        self.dtype = X.dtype
        col_nnz = np.count_nonzero(X, axis=0).astype(np.int64) if self.dense \
            else column_nnz(X)
        self._col_nnz = col_nnz
        self.nnz = int(col_nnz.sum())
        n_global = int(backend.n_partitions())
        cum = np.concatenate([[0], np.cumsum(col_nnz, dtype=np.int64)])
        if block_size is None:
            bounds, part = plan_partition_blocks(col_nnz, n_global, max_block_nnz)
        else:
            bounds = plan_blocks(col_nnz, block_size, max_block_nnz)
            if 0 < len(bounds) < n_global:  # smaller blocks, so that no partition is empty
                bounds = plan_blocks(col_nnz, -(-self.n_cols // n_global), max_block_nnz)
            block_nnz = np.array([cum[e] - cum[s] for s, e in bounds], dtype=np.int64)
            part = plan_partitions(bounds, block_nnz, n_global)
        self.block_size = block_size
        self.n_global_partitions = n_global
        self.global_partition_ranges = partition_ranges(bounds, part, n_global, self.n_cols)
        self.local_partitions = [int(g) for g in backend.local_partitions()]
        self.partition_ranges = [self.global_partition_ranges[g]
                                 for g in self.local_partitions]
        self.n_partitions = len(self.local_partitions)
        self.blocks: list[Block] = []
        if not transpose and self._whole_matrix_block(X):
            return
        for i, g in enumerate(self.local_partitions):
            ids = np.flatnonzero(part == g)
            if ids.size:
                self._build_partition(X, i, g, [bounds[k] for k in ids])

    def _whole_matrix_block(self, X: sp.spmatrix) -> bool:
        """Products with ``A`` only, one partition: one zero-copy block of all columns.

        Coefficient fitting (``transform``) needs only ``A @ Ft`` once; building column
        blocks and the transpose would cost more than the product itself.
        """
        if self.n_partitions != 1 or self.n_global_partitions != 1 or self.nnz == 0:
            return False
        if self.dense:
            self.partition_ranges = self.global_partition_ranges = [(0, self.n_cols)]
            a = self.backend.asarray(np.ascontiguousarray(X), partition=0)
            self.blocks = [Block(0, self.n_cols, 0, 0, self.n_cols, a, None, self.nnz,
                                 global_partition=self.local_partitions[0])]
            return True
        if self.nnz > INT32_MAX_NNZ or X.format != "csr" or not X.has_sorted_indices:
            return False
        self.partition_ranges = self.global_partition_ranges = [(0, self.n_cols)]
        a = self.backend.csr(np.asarray(X.indptr, dtype=np.int32),
                             np.asarray(X.indices, dtype=np.int32), X.data, X.shape,
                             partition=0)
        g = self.local_partitions[0]
        self.blocks = [Block(0, self.n_cols, 0, 0, self.n_cols, a, None, self.nnz,
                             global_partition=g)]
        return True

    def _build_partition(self, X: sp.spmatrix, i: int, g: int,
                         bounds: list[tuple[int, int]]) -> None:
        """Build, on the host, the blocks of local partition ``i`` and hand them over."""
        be = self.backend
        p0, p1 = self.partition_ranges[i]
        if self.dense:  # A_b a C-ordered copy of the columns; At_b its transposed view
            for s, e in bounds:
                a = be.asarray(np.ascontiguousarray(X[:, s:e]), partition=i)
                self.blocks.append(Block(s, e, i, s - p0, e - p0, a, a.T,
                                         int(self._col_nnz[s:e].sum()),
                                         global_partition=g))
            return
        csc = columns_csc(X, p0, p1)
        # reorder a private CSC in place (tiles become views of it); never the caller's
        # arrays (sp.csc_matrix(X) of a CSC input shares them)
        in_place = self._owned or not (np.may_share_memory(csc.data, X.data)
                                       or np.may_share_memory(csc.indices, X.indices))
        for s, e in bounds:
            ls, le = s - p0, e - p0
            lo, hi = int(csc.indptr[ls]), int(csc.indptr[le])
            if hi - lo > INT32_MAX_NNZ:  # pragma: no cover - plan_blocks prevents it
                raise AssertionError("a column block exceeds the int32 index range")
            indptr = (np.asarray(csc.indptr[ls:le + 1]) - lo).astype(np.int32)
            indices = csc.indices[lo:hi]
            if indices.dtype != np.int32:  # only when the whole matrix needs int64
                indices = indices.astype(np.int32)
            data = csc.data[lo:hi]
            # A_b first (a copy): the same block as CSR of shape (rows, e - s)
            a_host = sp.csc_matrix((data, indices, indptr), shape=(self.n_rows, e - s)).tocsr()
            a = be.csr(np.asarray(a_host.indptr, dtype=np.int32),
                       np.asarray(a_host.indices, dtype=np.int32),
                       a_host.data, a_host.shape, partition=i)
            del a_host
            tiles = None
            if be.row_chunk and self.n_rows > be.row_chunk:
                at = None
                tiles = [(c0, c1, be.csr(ip, ix, d, (e - s, c1 - c0), partition=i))
                         for c0, c1, ip, ix, d in split_row_tiles(
                             indptr, indices, data, self.n_rows, be.row_chunk,
                             in_place=in_place and indices.dtype == np.int32)]
            else:
                at = be.csr(indptr, indices, data, (e - s, self.n_rows), partition=i)
            self.blocks.append(Block(s, e, i, ls, le, a, at, hi - lo, global_partition=g,
                                     At_tiles=tiles))

    # ------------------------------------------------------------------ factors
    def split_factor(self, Ft: np.ndarray, dtype: Any = None, copy: bool = True) -> list[Any]:
        """Split a host factor of shape (n_cols, r) into this process's partitions.

        Returns one device array per local partition (rows of its column range), fresh
        copies since the factor is updated in place. With ``copy=False`` the caller hands
        ``Ft`` over: on one CPU partition it is then used as it is when its dtype and
        layout already fit (no second copy of the factor at the peak of a fit).
        """
        Ft = np.asarray(Ft)
        if Ft.shape[0] != self.n_cols:
            raise ValueError(f"factor has {Ft.shape[0]} rows, expected {self.n_cols}")
        dtype = np.dtype(dtype or self.dtype)
        if not copy and self.backend.holds_whole_job() and Ft.dtype == dtype \
                and Ft.flags.c_contiguous:
            return [Ft]
        return [self.backend.asarray(np.array(Ft[s:e], dtype=dtype, order="C"), partition=p)
                for p, (s, e) in enumerate(self.partition_ranges)]

    def gather_factor(self, parts: list[Any]) -> np.ndarray:
        """The whole factor (n_cols, r) on the host, from every process's partitions.

        In a distributed job every process receives the same full array.
        """
        local = np.concatenate([np.asarray(self.backend.to_numpy(p)) for p in parts], axis=0)
        full = self.backend.gather_rows(local)
        if full.shape[0] != self.n_cols:
            raise ValueError(f"gathered factor has {full.shape[0]} rows, expected "
                             f"{self.n_cols}")
        return full

    def whole_factor(self, parts: list[Any]) -> np.ndarray:
        """The whole factor on the host, as :meth:`gather_factor`, without a copy when
        this process computes the whole job on one host partition.

        Parameters
        ----------
        parts : list of arrays
            This process's factor parts, one per local partition.

        Returns
        -------
        ndarray of shape (n_cols, r)
            ``parts[0]`` itself when it is the whole factor already, else a gathered
            host copy.
        """
        if self.backend.holds_whole_job() and len(parts) == 1:
            return parts[0]
        return self.gather_factor(parts)

    def replicate(self, x: Any) -> list[Any]:
        """``x`` (a replicated array, on local partition 0) on every local partition.

        Entry ``p`` is for work under ``backend.device(p)``; entry 0 is ``x`` itself.
        """
        return [x if p == 0 else self.backend.move(x, p) for p in range(self.n_partitions)]

    # ----------------------------------------------------------------- products
    def matmul(self, parts: list[Any]) -> Any:
        """``A @ Ft`` (n_rows x r), summed over partitions."""
        be = self.backend
        r = parts[0].shape[1]
        outs = [be.zeros((self.n_rows, r), parts[0].dtype, p) for p in range(len(parts))]
        for b in self.blocks:
            with be.device(b.partition):
                be.spmm(b.A, parts[b.partition][b.local_start:b.local_stop],
                        out=outs[b.partition], accumulate=True)
        return be.allreduce(outs)

    def rmatmul(self, R: Any) -> list[Any]:
        """``A.T @ R`` as per-partition arrays of shape (n_cols_p, r)."""
        be = self.backend
        Rs = self.replicate(R)
        # one zero fill per partition, then each block accumulates into its rows
        # (cheaper than a fill, or a temporary and a copy, per block)
        outs = [be.zeros((e - s, R.shape[1]), R.dtype, p)
                for p, (s, e) in enumerate(self.partition_ranges)]
        for b in self.blocks:
            with be.device(b.partition):
                out = outs[b.partition][b.local_start:b.local_stop]
                self._at_matmul(b, Rs[b.partition], out)
        return outs

    def _at_matmul(self, b: Block, R: Any, out: Any) -> Any:
        """``out += At_b @ R`` (tile by tile when the block's transpose is tiled)."""
        be = self.backend
        if b.At_tiles is None:
            return be.spmm(b.At, R, out=out, accumulate=True)
        for r0, r1, tile in b.At_tiles:
            be.spmm(tile, R[r0:r1], out=out, accumulate=True)
        return out

    def gram(self, parts: list[Any]) -> Any:
        """``Ft.T @ Ft`` (r x r), summed over partitions."""
        grams = []
        for p, x in enumerate(parts):
            with self.backend.device(p):
                grams.append(x.T @ x)
        return self.backend.allreduce(grams)

    def sweep(self, parts: list[Any], R: Any, update: Callable[..., None],
              consts: tuple = ()) -> tuple[Any, Any]:
        """Update the factor block by block and return the products of the new factor.

        For each block ``b``: ``T = At_b @ R``; ``update(Ft_b, T, *consts)`` changes the
        block's rows of the factor in place; then ``A_b @ Ft_b`` and ``Ft_b.T @ Ft_b``
        of the *updated* rows are accumulated. One pass over the factor, each slice
        touched while in cache. Returns ``(A @ Ft_new, Ft_new.T @ Ft_new)``,
        all-reduced.

        ``consts`` are small replicated arrays the update reads (on local partition 0);
        they are passed to ``update`` as copies on the block's own device. Pass device
        arrays through ``consts`` rather than capturing them in ``update``: on several
        GPUs a captured array lives on the first device only.
        """
        be = self.backend
        r = parts[0].shape[1]
        dtype = parts[0].dtype
        Rs = self.replicate(R)
        cs = [self.replicate(c) for c in consts]
        P = [be.zeros((self.n_rows, r), dtype, p) for p in range(self.n_partitions)]
        Q = [be.zeros((r, r), dtype, p) for p in range(self.n_partitions)]
        # one buffer per partition for the blocks' At_b @ R (the largest block's rows)
        rows = [max((b.stop - b.start for b in self.blocks if b.partition == p), default=0)
                for p in range(self.n_partitions)]
        bufs = [be.zeros((rows[p], r), dtype, p) for p in range(self.n_partitions)]
        for b in self.blocks:
            p = b.partition
            with be.device(p):
                Fb = parts[p][b.local_start:b.local_stop]
                T = bufs[p][:b.stop - b.start]
                T[...] = 0
                self._at_matmul(b, Rs[p], T)
                update(Fb, T, *(c[p] for c in cs))
                be.spmm(b.A, Fb, out=P[p], accumulate=True)
                Q[p] += Fb.T @ Fb
        return be.allreduce(P), be.allreduce(Q)
