"""What every array backend supplies: an array module, sparse products and an all-reduce.

The decomposition math (``sknpeff.decomposition._updates``) never names an array library.
It receives ``xp`` (NumPy or CuPy) and calls the few operations the array API lacks
through a backend object. Nothing else in the package branches on the backend.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Backend(ABC):
    """Interface of an array backend.

    A backend spreads the column blocks of the sparse input over *partitions* (one per
    device; simulated partitions on CPU; one or more per rank of a distributed job).
    Each partition holds a contiguous range of column blocks and the matching rows of
    the transposed factor. Products whose result is small (``A @ Gt``: rows x
    components, ``Gt.T @ Gt``: components x components) are computed per partition and
    summed with :meth:`allreduce`.

    :meth:`n_partitions` counts the partitions of the whole job;
    :meth:`local_partitions` lists (by global id) those this process holds. Every
    ``partition`` argument of the methods below is a *local* index: position ``i`` in
    :meth:`local_partitions`, i.e. the ``i``-th device of this process.
    """

    #: short name used in ``repr`` and error messages
    name: str = "base"
    #: the array namespace (``numpy`` or ``cupy``)
    xp: Any = np
    #: rows of ``R`` per tile of a block's transpose for ``At_b @ R`` (None: no tiles).
    #: On a CPU the gathered rows of ``R`` then come from a cache-sized slice.
    row_chunk: int | None = None
    #: columns per block when an estimator's ``block_size`` is ``"auto"``; None: one
    #: block per partition (cut only at the int32 nonzero cap). CPUs and GPUs both want
    #: blocks whose slice of the factor stays in cache (see ``benchmarks/gpu.py``).
    default_block_size: int | None = 4096
    #: the arrays of this backend are host NumPy arrays (False: device arrays)
    on_host: bool = True

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
        """Sparse (or dense) @ dense. Writes into ``out`` (adding to it when
        ``accumulate``)."""

    def n_partitions(self) -> int:
        """Number of column partitions of the whole job (all processes)."""
        return 1

    def local_partitions(self) -> list[int]:
        """Global ids of the partitions held by this process (default: all of them)."""
        return list(range(self.n_partitions()))

    def device(self, partition: int) -> contextlib.AbstractContextManager:
        """Context in which work on local ``partition`` runs (its device made current).

        CPU backends need none; the CuPy backend makes the partition's GPU current.
        """
        return contextlib.nullcontext()

    def zeros(self, shape: tuple[int, ...], dtype: Any, partition: int = 0) -> Any:
        """A zero-filled dense array on local ``partition``'s device."""
        with self.device(partition):
            return self.move(self.xp.zeros(shape, dtype=dtype), partition)

    def empty(self, shape: tuple[int, ...], dtype: Any, partition: int = 0) -> Any:
        """An uninitialized dense array on local ``partition``'s device."""
        with self.device(partition):
            return self.move(self.xp.empty(shape, dtype=dtype), partition)

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """Concatenate, in process order, every process's rows of a host array.

        ``local`` holds this process's rows (its partitions' rows of a factor, in
        order). One process holds all partitions, so the default returns ``local``;
        the distributed backend all-gathers.
        """
        return local

    def holds_whole_job(self) -> bool:
        """True when this process computes the whole job on one host partition.

        Then a product with a whole host matrix needs no column blocks, copies or
        transfers, and a factor held in one part is the whole factor already.

        Returns
        -------
        bool
            ``on_host`` and a single partition in the whole job.
        """
        return self.on_host and self.n_partitions() == 1

    def is_root(self) -> bool:
        """True on the process that should print, save or log (rank 0)."""
        return True

    def allreduce(self, parts: list[Any]) -> Any:
        """Sum per-partition partial results; every partition receives the total.

        The single-process backends get a list with one entry per partition and return
        the sum (on partition 0's device); distributed backends sum across processes.
        The entries of ``parts`` may be overwritten (NCCL and torch.distributed sum in
        place, without extra copies): pass temporaries, or copies.
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



def resolve_devices(devices: Any, n_available: int) -> list[int]:
    """Validate a ``devices`` parameter against the number of visible devices.

    Parameters
    ----------
    devices : None, int or sequence of int
        ``None`` means device 0 only; an int means that one device.
    n_available : int
        Number of visible devices.

    Returns
    -------
    list of int
        Distinct device ids, in the given order (partition ``i`` lives on entry ``i``).

    Raises
    ------
    ValueError
        On an empty list, repeated ids, non-integers or ids out of range.
    """
    if n_available < 1:
        raise ValueError("no device is visible.")
    if devices is None:
        return [0]
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        devices = [devices]
    try:
        devs = list(devices)
    except TypeError:
        raise ValueError(f"devices must be None, an int or a list of ints, got {devices!r}.")\
            from None
    if not devs:
        raise ValueError("devices must name at least one device.")
    out = []
    for d in devs:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise ValueError(f"devices must be integers, got {d!r}.")
        if not 0 <= int(d) < n_available:
            raise ValueError(f"device {int(d)} does not exist: {n_available} visible.")
        out.append(int(d))
    if len(set(out)) != len(out):
        raise ValueError(f"devices must be distinct, got {out}.")
    return out
