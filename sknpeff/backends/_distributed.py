"""Distributed backend: one process per rank of a ``torch.distributed`` job.

Launch the script with ``torchrun`` (or any launcher that sets up a process group),
call :func:`torch.distributed.init_process_group` and pass ``distributed=True`` to an
estimator. Every rank passes the same ``X``; the columns are cut into
``world_size * n_local`` partitions (``n_local``: the partitions of the rank's own
backend, one per GPU) and rank ``q`` builds only partitions
``q * n_local ... (q + 1) * n_local - 1``. Per step, the small products (rows x
components and components x components) are summed over the rank's partitions by the
local backend, then over ranks with :func:`torch.distributed.all_reduce`: gloo on CPU
tensors that are zero-copy views of the NumPy arrays, NCCL (or gloo) on CUDA tensors
that are zero-copy DLPack views of CuPy arrays. The all-reduced values are identical on
every rank, so the replicated coefficients ``W`` evolve identically, and
:meth:`DistributedBackend.gather_rows` all-gathers the factor at the end so that every
rank ends with the same ``components_``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ._base import Backend


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise ImportError("distributed=True needs torch with torch.distributed.") from exc
    if not dist.is_available():
        raise RuntimeError("distributed=True: this torch build has no torch.distributed.")
    return dist


class DistributedBackend(Backend):
    """Spread the partitions of a local backend over the ranks of a process group.

    Parameters
    ----------
    local : Backend
        This rank's backend (NumPy on CPU; CuPy on this rank's GPUs). Its
        ``n_partitions()`` is the number of partitions this rank holds.
    group : torch.distributed.ProcessGroup, optional
        The process group; the default group when omitted.

    Raises
    ------
    RuntimeError
        When ``torch.distributed`` is not initialized.

    Examples
    --------
    Run under ``torchrun --nproc_per_node=2 script.py``::

        import torch.distributed as dist
        from sknpeff.decomposition import LowRankNPEFF

        dist.init_process_group("gloo")
        est = LowRankNPEFF(n_components=32, n_classes=3, distributed=True).fit(X)
        # every rank holds the same est.components_
    """

    name = "distributed"

    def __init__(self, local: Backend, group: Any = None) -> None:
        dist = _dist()
        if not dist.is_initialized():
            raise RuntimeError(
                "distributed=True needs an initialized torch.distributed process group: "
                "launch with torchrun and call torch.distributed.init_process_group() "
                "(backend 'gloo' on CPU, 'nccl' on GPUs) before fitting.")
        if isinstance(local, DistributedBackend):
            raise ValueError("DistributedBackend cannot wrap another DistributedBackend.")
        self.local = local
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.world_size = int(dist.get_world_size(group))
        self.xp = local.xp
        self.default_block_size = local.default_block_size
        self._n_local = int(local.n_partitions())
        self.on_host = local.on_host
        self._on_cuda = not local.on_host
        if not self._on_cuda and dist.get_backend(group) == "nccl":
            raise ValueError(
                "distributed=True with a CPU backend needs a 'gloo' process group "
                "(NCCL only moves CUDA memory): init_process_group('gloo').")

    def __repr__(self) -> str:
        return (f"DistributedBackend({self.local!r}, rank={self.rank}, "
                f"world_size={self.world_size})")

    # ------------------------------------------------------------ partitions
    def n_partitions(self) -> int:
        return self.world_size * self._n_local

    def local_partitions(self) -> list[int]:
        first = self.rank * self._n_local
        return list(range(first, first + self._n_local))

    def is_root(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------- delegated to local
    def asarray(self, x: Any, dtype: Any = None, partition: int = 0) -> Any:
        return self.local.asarray(x, dtype=dtype, partition=partition)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.local.to_numpy(x)

    def csr(self, indptr, indices, data, shape, partition: int = 0) -> Any:
        return self.local.csr(indptr, indices, data, shape, partition=partition)

    def spmm(self, a: Any, b: Any, out: Any = None, accumulate: bool = False) -> Any:
        return self.local.spmm(a, b, out=out, accumulate=accumulate)

    def move(self, x: Any, partition: int) -> Any:
        return self.local.move(x, partition)

    def device(self, partition: int) -> contextlib.AbstractContextManager:
        return self.local.device(partition)

    def zeros(self, shape: tuple[int, ...], dtype: Any, partition: int = 0) -> Any:
        return self.local.zeros(shape, dtype, partition)

    def empty(self, shape: tuple[int, ...], dtype: Any, partition: int = 0) -> Any:
        return self.local.empty(shape, dtype, partition)

    def synchronize(self) -> None:
        self.local.synchronize()

    # ----------------------------------------------------------- collectives
    def _tensor(self, x: Any) -> Any:
        """A torch view of a C-contiguous array (no copy)."""
        import torch

        if self._on_cuda:
            return torch.from_dlpack(x)
        return torch.from_numpy(x)

    def _contiguous(self, x: Any) -> Any:
        xp = self.xp
        x = xp.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        if not x.flags.c_contiguous or (self.on_host and not x.flags.writeable):
            x = xp.ascontiguousarray(x).copy()
        return x

    def _sync_device(self) -> None:
        if self._on_cuda:
            self.local.synchronize()

    def allreduce(self, parts: list[Any]) -> Any:
        """Sum of the local partials over the rank's partitions and over all ranks.

        The result is on local partition 0 and bitwise identical on every rank.
        """
        dist = _dist()
        total = self.local.allreduce(parts)
        shape = getattr(total, "shape", ())
        buf = self._contiguous(total)
        self._sync_device()  # the torch collective must see finished local work
        dist.all_reduce(self._tensor(buf), op=dist.ReduceOp.SUM, group=self.group)
        self._sync_device()
        return buf.reshape(shape)

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """All-gather every rank's rows of a host array, concatenated in rank order.

        Ranks may hold different numbers of rows: the row counts are all-gathered
        first, and each rank's rows are padded to the largest count for the transfer.
        """
        import torch

        dist = _dist()
        local = np.ascontiguousarray(local)
        counts = torch.zeros(self.world_size, dtype=torch.int64)
        mine = torch.tensor([local.shape[0]], dtype=torch.int64)
        count_list = list(counts.split(1))
        on_cpu = dist.get_backend(self.group) != "nccl"
        if not on_cpu:  # NCCL collectives need CUDA tensors
            import torch.cuda

            dev = torch.device("cuda", torch.cuda.current_device())
            mine = mine.to(dev)
            count_list = [c.to(dev) for c in count_list]
        dist.all_gather(count_list, mine, group=self.group)
        sizes = [int(c.item()) for c in count_list]
        width = local.shape[1:]
        top = max(sizes) if sizes else 0
        padded = np.zeros((top, *width), dtype=local.dtype)
        padded[:local.shape[0]] = local
        send = torch.from_numpy(padded)
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        if not on_cpu:
            send = send.to(dev)
            recv = [t.to(dev) for t in recv]
        dist.all_gather(recv, send, group=self.group)
        return np.concatenate([t[:n].cpu().numpy() for t, n in zip(recv, sizes, strict=True)],
                              axis=0)
