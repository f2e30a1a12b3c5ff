"""GPU backend: CuPy arrays, cuSPARSE products, one partition per device.

Only the device glue lives here. What goes where (which columns each device holds,
which arrays are copied to which partition, when the partial products are summed) is
decided by :class:`~sknpeff.backends.ColumnBlocks` against the :class:`Backend`
interface, and is tested on the CPU with a fake multi-device backend
(``tests/test_backends.py``).

* Blocks are built on the host, one partition at a time, then copied to their device
  (``csr``): an input larger than one GPU is split before it is moved.
* Each block is a ``cupyx.scipy.sparse.csr_matrix`` with int32 indices (CuPy's sparse
  matrices took only int32 indices until int64 support landed); ColumnBlocks keeps
  every block under 2**31 nonzeros so that int32 always suffices, and any CuPy works.
* By default blocks are 4096 columns, as on the CPU (``default_block_size``): measured
  on an H100 (``benchmarks/gpu.py --no-cpu --gpu-block-size -1 4096 -1 4096``, 30,000 x
  200,000, 40.8M nonzeros, r = 64), an iteration took 0.031-0.033 s with 4096-column
  blocks against 0.041 s with one block per device, and ``A @ Ft`` 9.9 ms against
  20.5-20.7 ms: the block's slice of the factor stays in the GPU's L2 cache, as it stays
  in the CPU's.
* ``spmm`` is cuSPARSE SpMM through ``a @ b``.
* ``allreduce`` over several devices uses NCCL (``cupy.cuda.nccl``, one communicator per
  device, in-place all-reduce in a group), falling back to peer copies summed on the
  first device when NCCL is unavailable.
* The first device is made current at construction: the replicated arrays (``W``, the
  all-reduced products) live there.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

try:
    import cupy
    import cupyx.scipy.sparse as cusparse_matrix
except ImportError as exc:  # get_backend turns this into the sknpeff[cuda] message
    raise ImportError("the CuPy backend needs CuPy: pip install 'sknpeff[cuda]'.") from exc

from ._base import Backend, resolve_devices


def _nccl_dtype(nccl: Any, dtype: np.dtype) -> int | None:
    table = {np.dtype(np.float32): "NCCL_FLOAT32", np.dtype(np.float64): "NCCL_FLOAT64",
             np.dtype(np.float16): "NCCL_FLOAT16", np.dtype(np.int32): "NCCL_INT32",
             np.dtype(np.int64): "NCCL_INT64"}
    name = table.get(np.dtype(dtype))
    return None if name is None else getattr(nccl, name, None)


class CupyBackend(Backend):
    """CuPy backend: one column partition per GPU.

    Parameters
    ----------
    devices : int or list of int, optional
        GPU ids; partition ``i`` lives on ``devices[i]``. Default: device 0.
    use_nccl : bool, default=True
        All-reduce with NCCL across several devices when ``cupy.cuda.nccl`` is
        available; otherwise peer copies summed on the first device.

    Examples
    --------
    >>> from sknpeff.decomposition import LowRankNPEFF  # doctest: +SKIP
    >>> est = LowRankNPEFF(n_components=32, n_classes=3, backend="cupy",
    ...                    devices=[0, 1]).fit(X)  # doctest: +SKIP
    """

    name = "cupy"
    xp = cupy
    on_host = False

    def __init__(self, devices: Any = None, use_nccl: bool = True) -> None:
        try:
            n_available = int(cupy.cuda.runtime.getDeviceCount())
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise RuntimeError(f"backend='cupy': no usable CUDA device ({exc}).") from exc
        if n_available == 0:
            raise RuntimeError("backend='cupy': no CUDA device is visible.")
        self.devices = resolve_devices(devices, n_available)
        cupy.cuda.Device(self.devices[0]).use()
        self._comms: list[Any] | None = None
        self._nccl: Any = None
        if len(self.devices) > 1:
            self._enable_peer_access()
            if use_nccl:
                self._init_nccl()

    def __repr__(self) -> str:
        comm = "nccl" if self._comms else "peer-copy"
        return f"CupyBackend(devices={self.devices}, allreduce={comm!r})"

    def _enable_peer_access(self) -> None:
        for d in self.devices:
            for e in self.devices:
                if d == e or not cupy.cuda.runtime.deviceCanAccessPeer(d, e):
                    continue
                with cupy.cuda.Device(d):
                    try:
                        cupy.cuda.runtime.deviceEnablePeerAccess(e)
                    except cupy.cuda.runtime.CUDARuntimeError:
                        pass  # already enabled

    def _init_nccl(self) -> None:
        try:
            from cupy.cuda import nccl

            if not nccl.available:
                return
            self._comms = list(nccl.NcclCommunicator.initAll(self.devices))
            self._nccl = nccl
        except Exception:  # noqa: BLE001 - any NCCL trouble: peer copies still work
            self._comms = None

    # ------------------------------------------------------------ partitions
    def n_partitions(self) -> int:
        return len(self.devices)

    def device(self, partition: int) -> contextlib.AbstractContextManager:
        return cupy.cuda.Device(self.devices[partition])

    # ---------------------------------------------------------------- arrays
    def asarray(self, x: Any, dtype: Any = None, partition: int = 0) -> Any:
        if isinstance(x, cupy.ndarray):
            x = self.move(x, partition)
        with self.device(partition):
            return cupy.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, cupy.ndarray):
            return x.get()
        return np.asarray(x)

    def move(self, x: Any, partition: int) -> Any:
        if not isinstance(x, cupy.ndarray):
            if isinstance(x, np.ndarray):
                with self.device(partition):
                    return cupy.asarray(x)
            return x  # Python scalars travel as they are
        dev = self.devices[partition]
        if x.device.id == dev:
            return x
        with cupy.cuda.Device(x.device.id):
            src = cupy.ascontiguousarray(x)
        with cupy.cuda.Device(dev):
            out = cupy.empty(src.shape, dtype=src.dtype)
            if src.nbytes:
                out.data.copy_from_device(src.data, src.nbytes)  # peer copy (UVA)
        return out

    def zeros(self, shape: tuple[int, ...], dtype: Any, partition: int = 0) -> Any:
        with self.device(partition):
            return cupy.zeros(shape, dtype=dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any, partition: int = 0) -> Any:
        with self.device(partition):
            return cupy.empty(shape, dtype=dtype)

    # -------------------------------------------------------------- products
    def csr(self, indptr, indices, data, shape, partition: int = 0) -> Any:
        # int32 indices (any CuPy): ColumnBlocks keeps blocks within range; refuse to
        # wrap silently anything that is not
        limit = np.iinfo(np.int32).max
        if len(data) > limit or max(int(s) for s in shape) > limit:
            raise ValueError(f"the CuPy backend takes sparse blocks of at most {limit} "
                             f"nonzeros and rows/columns, got shape {tuple(shape)} with "
                             f"{len(data)} nonzeros; split it with ColumnBlocks.")
        with self.device(partition):
            return cusparse_matrix.csr_matrix(
                (cupy.asarray(data), cupy.asarray(np.asarray(indices, dtype=np.int32)),
                 cupy.asarray(np.asarray(indptr, dtype=np.int32))),
                shape=tuple(int(s) for s in shape))

    def spmm(self, a: Any, b: Any, out: Any = None, accumulate: bool = False) -> Any:
        res = a @ b  # cuSPARSE SpMM
        if out is None:
            return res
        if accumulate:
            out += res
        else:
            out[...] = res
        return out

    # ----------------------------------------------------------- collectives
    def allreduce(self, parts: list[Any]) -> Any:
        if len(parts) == 1:
            return parts[0]
        if self._comms is not None and len(parts) == len(self._comms):
            code = _nccl_dtype(self._nccl, parts[0].dtype)
            if code is not None:
                return self._allreduce_nccl(parts, code)
        with self.device(0):
            total = parts[0].copy()
            for p in parts[1:]:
                total += self.move(p, 0)
        return total

    def _allreduce_nccl(self, parts: list[Any], code: int) -> Any:
        nccl = self._nccl
        bufs = []
        for i, p in enumerate(parts):
            with self.device(i):
                bufs.append(cupy.ascontiguousarray(p))
        nccl.groupStart()
        try:
            for i, (comm, buf) in enumerate(zip(self._comms, bufs, strict=True)):
                with self.device(i):
                    comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, code, nccl.NCCL_SUM,
                                   cupy.cuda.get_current_stream().ptr)
        finally:
            nccl.groupEnd()
        return bufs[0]

    def synchronize(self) -> None:
        for d in self.devices:
            cupy.cuda.Device(d).synchronize()
