"""A NumPy-backed stand-in for the parts of CuPy that ``sknpeff.backends._cupy`` uses.

It lets the CuPy backend's glue run on a CPU (tests/test_backends.py, tests/test_cupy.py):
arrays are a NumPy subclass (so a test tells them from NumPy output) that remember
the fake device they were created on (the current device), sparse products check their
operands share the current device, NCCL all-reduces in a group are summed at
``groupEnd``. It checks our use of these calls against our reading of CuPy's API, not
CuPy itself: the real thing is exercised by tests/test_cupy.py on a GPU.
"""

from __future__ import annotations

import types

import numpy as np

N_DEVICES = 2


class FakeState:
    current = 0
    cross_device_reads: list[str] = []
    registry: dict[int, np.ndarray] = {}


class CUDARuntimeError(RuntimeError):
    pass


class _Ptr:
    def __init__(self, arr):
        self.arr = arr
        self.ptr = id(arr.base if arr.base is not None and arr.base.shape == arr.shape
                      else arr)
        FakeState.registry[self.ptr] = arr

    def copy_from_device(self, src, nbytes):
        dst = self.arr.view(np.ndarray).reshape(-1).view(np.uint8)
        dst[:nbytes] = src.arr.view(np.ndarray).reshape(-1).view(np.uint8)[:nbytes]


class ndarray(np.ndarray):  # noqa: N801 - mirrors cupy.ndarray
    _dev = 0

    def __array_finalize__(self, obj):
        self._dev = getattr(obj, "_dev", FakeState.current)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        devs = {x._dev for x in inputs + (out or ()) if isinstance(x, ndarray)}
        if devs - {FakeState.current}:
            FakeState.cross_device_reads.append(
                f"{ufunc.__name__}: {sorted(devs)} under {FakeState.current}")
        args = [x.view(np.ndarray) if isinstance(x, ndarray) else x for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(x.view(np.ndarray) if isinstance(x, ndarray) else x
                                  for x in out)
        res = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(res, np.ndarray):
            res = res.view(ndarray)
            res._dev = FakeState.current
        return res

    def __setitem__(self, key, value):
        # a write is a kernel too: it runs on the current device
        devs = {self._dev} | ({value._dev} if isinstance(value, ndarray) else set())
        if devs - {FakeState.current}:
            FakeState.cross_device_reads.append(
                f"setitem: {sorted(devs)} under {FakeState.current}")
        super().__setitem__(key, value)

    @property
    def device(self):
        return types.SimpleNamespace(id=self._dev)

    @property
    def data(self):
        return _Ptr(self)

    def get(self):
        return np.array(self.view(np.ndarray))


def _wrap(x):
    x = x.view(ndarray)
    x._dev = FakeState.current
    return x


def asarray(x, dtype=None):
    if isinstance(x, ndarray):
        if x._dev != FakeState.current:
            raise ValueError("fake cupy.asarray of an array on another device")
        return x if dtype is None or x.dtype == dtype else _wrap(np.array(x, dtype=dtype))
    return _wrap(np.array(x, dtype=dtype))


def zeros(shape, dtype=float):
    return _wrap(np.zeros(shape, dtype=dtype))


def empty(shape, dtype=float):
    return _wrap(np.empty(shape, dtype=dtype))


def ascontiguousarray(x, dtype=None):
    if isinstance(x, ndarray) and x.flags.c_contiguous and dtype in (None, x.dtype):
        return x
    return _wrap(np.ascontiguousarray(x, dtype=dtype))


class Device:
    def __init__(self, device_id=0):
        self.id = int(device_id)
        self._prev = []

    def __enter__(self):
        self._prev.append(FakeState.current)
        FakeState.current = self.id
        return self

    def __exit__(self, *exc):
        FakeState.current = self._prev.pop()

    def use(self):
        FakeState.current = self.id

    def synchronize(self):
        pass


class _Runtime:
    CUDARuntimeError = CUDARuntimeError

    @staticmethod
    def getDeviceCount():  # noqa: N802 - CuPy's name
        return N_DEVICES

    @staticmethod
    def getDeviceProperties(d):  # noqa: N802
        return {"name": b"Fake H100 80GB HBM3", "memoryClockRate": 2_619_000,
                "memoryBusWidth": 5120}

    @staticmethod
    def deviceCanAccessPeer(d, e):  # noqa: N802
        return True

    @staticmethod
    def deviceEnablePeerAccess(e):  # noqa: N802
        return None


class _Comm:
    pending: list[tuple[int, int, int]] = []

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802
        assert op == _nccl.NCCL_SUM and send == recv
        _Comm.pending.append((send, count, dtype))


def _group_start():
    _Comm.pending = []


def _group_end():
    arrays = [FakeState.registry[p] for p, _, _ in _Comm.pending]
    total = sum(a.view(np.ndarray).copy() for a in arrays)
    for a in arrays:
        a.view(np.ndarray)[...] = total
    _Comm.pending = []


_nccl = types.SimpleNamespace(
    available=True, NCCL_SUM=0, NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_FLOAT16=6,
    NCCL_INT32=2, NCCL_INT64=4, groupStart=_group_start, groupEnd=_group_end,
    NcclCommunicator=types.SimpleNamespace(initAll=lambda devs: [_Comm() for _ in devs]))


class spmatrix:  # noqa: N801 - mirrors cupyx.scipy.sparse.spmatrix
    """Base of the fake sparse matrices (``isinstance`` checks of CuPy input)."""


class csr_matrix(spmatrix):  # noqa: N801 - mirrors cupyx.scipy.sparse.csr_matrix
    format = "csr"

    def __init__(self, arg, shape=None):
        import scipy.sparse as sp

        if sp.issparse(arg):  # host matrix -> device (as cupyx accepts SciPy input)
            h = sp.csr_matrix(arg)
            arg = (asarray(h.data), asarray(h.indices.astype(np.int32)),
                   asarray(h.indptr.astype(np.int32)))
            shape = h.shape
        data, indices, indptr = arg
        for a in arg:
            assert isinstance(a, ndarray) and a._dev == FakeState.current
        assert indices.dtype == np.int32 and indptr.dtype == np.int32, "int32 only"
        self.data, self.indices, self.indptr = data, indices, indptr
        self.shape = tuple(int(s) for s in shape)
        self._m = sp.csr_matrix((data.view(np.ndarray), indices.view(np.ndarray),
                                 indptr.view(np.ndarray)), shape=self.shape)

    @property
    def nnz(self):
        return int(self._m.nnz)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self):
        # as in CuPy 14: the sparse matrix does not know its device (its ``data`` does)
        raise NotImplementedError

    def get(self):
        """A SciPy copy on the host (as ``cupyx.scipy.sparse.csr_matrix.get``)."""
        return self._m.copy()

    def toarray(self):
        with Device(self.data._dev):
            return _wrap(self._m.toarray())

    def __matmul__(self, b):
        if not (self.data._dev == b._dev == FakeState.current):
            raise ValueError(f"fake cuSPARSE: matrix on {self.data._dev}, dense on "
                             f"{b._dev}, current {FakeState.current}")
        return _wrap(np.asarray(self._m @ b.view(np.ndarray)))


def install(monkeypatch) -> types.ModuleType:
    """Put the fake ``cupy``/``cupyx`` into ``sys.modules`` (undone by ``monkeypatch``)."""
    import sys

    FakeState.current = 0
    FakeState.cross_device_reads = []
    FakeState.registry = {}
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device = Device
    cuda.runtime = _Runtime
    cuda.nccl = _nccl
    cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)
    cupy.cuda = cuda
    cupy.ndarray = ndarray
    for name in ("asarray", "zeros", "empty", "ascontiguousarray"):
        setattr(cupy, name, globals()[name])
    cupy.__getattr__ = lambda name: getattr(np, name)  # the rest of the namespace
    cupyx = types.ModuleType("cupyx")
    scipy_mod = types.ModuleType("cupyx.scipy")
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.csr_matrix = csr_matrix
    sparse.spmatrix = spmatrix
    cupyx.scipy = scipy_mod
    scipy_mod.sparse = sparse
    for name, mod in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", _nccl),
                      ("cupyx", cupyx), ("cupyx.scipy", scipy_mod),
                      ("cupyx.scipy.sparse", sparse)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "sknpeff.backends._cupy", raising=False)
    return cupy
