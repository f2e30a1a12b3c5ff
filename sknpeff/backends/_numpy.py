"""CPU backend: NumPy arrays, sparse products through torch's CSR kernels.

torch's CSR @ dense kernel is multi-threaded and, applied per column block so that the
block's slice of the dense factor stays in cache, several times faster than SciPy's
single-threaded one (see ``benchmarks/bench_sparse.py``). Arrays stay NumPy: torch only
sees zero-copy views of them.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._base import Backend

try:  # torch is a hard dependency of the package, but keep the backend importable alone
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None


def _as_torch(x: np.ndarray) -> Any:
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return torch.from_numpy(x)


class NumpyBackend(Backend):
    """NumPy/SciPy backend for one CPU process.

    Parameters
    ----------
    n_partitions : int, default=1
        Number of simulated column partitions. A value above one runs exactly the code
        path of a multi-device fit (per-partition partial products, then an all-reduce)
        on the CPU; it exists to test that path without GPUs and gives the same numbers
        as one partition up to floating-point summation order.
    use_torch : bool, default=True
        Run sparse products through torch's CSR kernels (faster); ``False`` uses SciPy.
    """

    name = "numpy"
    xp = np

    def __init__(self, n_partitions: int = 1, use_torch: bool = True) -> None:
        if int(n_partitions) < 1:
            raise ValueError(f"n_partitions must be >= 1, got {n_partitions!r}.")
        self._n_partitions = int(n_partitions)
        self.use_torch = bool(use_torch) and torch is not None
        # At_b @ R gathers rows of R (n*c x r) at random: 2048-row tiles keep the gathered
        # slice (512 KiB at r = 64, float32) in cache: 5.3 -> 14.5 GFLOP/s single-threaded
        # at n*c = 30k, m = 200k (benchmarks/bench_sparse.py)
        self.row_chunk = 2048 if self.use_torch else None

    def __repr__(self) -> str:
        return f"NumpyBackend(n_partitions={self._n_partitions}, use_torch={self.use_torch})"

    def n_partitions(self) -> int:
        return self._n_partitions

    def asarray(self, x: Any, dtype: Any = None, partition: int = 0) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def csr(self, indptr, indices, data, shape, partition: int = 0) -> Any:
        if not self.use_torch:
            import scipy.sparse as sp

            return sp.csr_matrix((data, indices, indptr), shape=shape, copy=False)
        # torch wants one index dtype for both arrays
        idx_dtype = np.int64 if indptr.dtype == np.int64 or indices.dtype == np.int64 else np.int32
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            return torch.sparse_csr_tensor(
                _as_torch(np.asarray(indptr, dtype=idx_dtype)),
                _as_torch(np.asarray(indices, dtype=idx_dtype)),
                _as_torch(np.asarray(data)),
                size=tuple(int(s) for s in shape),
                check_invariants=False,
            )

    def spmm(self, a: Any, b: np.ndarray, out: np.ndarray | None = None,
             accumulate: bool = False) -> np.ndarray:
        if isinstance(a, np.ndarray):  # a dense block (projected PEFs): BLAS
            if out is None:
                return a @ b
            if accumulate:
                out += a @ b
            else:
                np.matmul(a, b, out=out)
            return out
        if not self.use_torch:
            res = a @ b
            if out is None:
                return np.asarray(res)
            if accumulate:
                out += res
            else:
                out[...] = res
            return out
        bt = _as_torch(b)
        if out is None:
            return (a @ bt).numpy()
        if not out.flags.c_contiguous:
            raise ValueError("spmm: out must be C-contiguous")
        ot = torch.from_numpy(out)
        if not accumulate:
            # zero then accumulate: torch.mm(out=) computes into a temporary and copies
            ot.zero_()
        ot.addmm_(a, bt)
        return out
