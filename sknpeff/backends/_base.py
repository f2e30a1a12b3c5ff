"""What every array backend supplies: an array module, sparse products and an all-reduce.

The decomposition math (``sknpeff.decomposition._updates``) never names an array library.
It receives ``xp`` (NumPy or CuPy) and calls the few operations the array API lacks
through a backend object. Nothing else in the package branches on the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Backend(ABC):
    """Interface of an array backend.

    A backend owns one or more *partitions* (one per device; simulated partitions on
    CPU). Each partition holds a contiguous range of the column blocks of the sparse
    input and the matching rows of the transposed factor. Products whose result is
    small (``A @ Gt``: rows x components, ``Gt.T @ Gt``: components x components) are
    computed per partition and summed with :meth:`allreduce`.
    """

    #: short name used in ``repr`` and error messages
    name: str = "base"
    #: the array namespace (``numpy`` or ``cupy``)
    xp: Any = np

    @abstractmethod
    def asarray(self, x: Any, dtype: Any = None, partition: int = 0) -> Any:
        """Move ``x`` onto ``partition``'s device as a dense array of ``dtype``."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """Return ``x`` as a NumPy array (a view where possible)."""

    @abstractmethod
    def csr(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
            shape: tuple[int, int], partition: int = 0) -> Any:
        """Wrap host CSR arrays as the backend's sparse matrix on ``partition``'s device."""

    @abstractmethod
    def spmm(self, a: Any, b: Any, out: Any = None, accumulate: bool = False) -> Any:
        """Sparse @ dense. Writes into ``out`` (adding to it when ``accumulate``)."""

    def n_partitions(self) -> int:
        """Number of column partitions (devices) this backend spreads a matrix over."""
        return 1

    def allreduce(self, parts: list[Any]) -> Any:
        """Sum per-partition partial results; every partition receives the total.

        The single-process backends get a list with one entry per partition and return
        the sum (on partition 0's device); distributed backends sum across processes.
        """
        total = parts[0]
        for p in parts[1:]:
            total = total + self.move(p, 0)
        return total

    def move(self, x: Any, partition: int) -> Any:
        """Move a dense array to ``partition``'s device (no-op on one device)."""
        return x

    def synchronize(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Wait for queued device work (for timing); no-op on CPU."""
