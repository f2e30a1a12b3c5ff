"""CPU backend and column blocks: coverage, partition plans, products, placement, errors."""

import contextlib
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from sknpeff.backends import Backend, ColumnBlocks, NumpyBackend, get_backend
from sknpeff.backends._base import resolve_devices
from sknpeff.backends._blocks import plan_blocks, plan_partitions
from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import LowRankNPEFF


# ----------------------------------------------------------------- fake devices
class DevArray(np.ndarray):
    """A NumPy array that remembers which fake device it lives on."""

    dev: int | None = None

    def __array_finalize__(self, obj):
        self.dev = getattr(obj, "dev", None)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        arrays = [x for x in inputs + (out or ()) if isinstance(x, DevArray)]
        devs = {x.dev for x in arrays if x.dev is not None}
        backend = FakeDeviceBackend.active
        if len(devs) > 1:
            backend.violation(f"{ufunc.__name__} mixes devices {sorted(devs)}")
        dev = min(devs) if devs else None
        if backend is not None and backend.current is not None and dev is not None \
                and dev != backend.current:
            backend.violation(f"{ufunc.__name__} on device {dev} while device "
                              f"{backend.current} is current")
        args = [x.view(np.ndarray) if isinstance(x, DevArray) else x for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(x.view(np.ndarray) if isinstance(x, DevArray) else x
                                  for x in out)
        res = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        if isinstance(res, np.ndarray):
            res = res.view(DevArray)
            res.dev = dev
        return res


class FakeSparse:
    """A SciPy CSR matrix 'on' a fake device."""

    def __init__(self, mat, dev):
        self.mat, self.dev = mat, dev
        self.indices_dtype = mat.indices.dtype
        self.indptr_dtype = mat.indptr.dtype


class FakeDeviceBackend(Backend):
    """A CPU backend that behaves like several devices and checks every placement.

    Arrays are tagged with a device; products with operands on different devices, or
    on a device that is not current, are recorded (``strict``: raised).
    """

    name = "fake"
    xp = np
    active = None

    def __init__(self, n_partitions=2, strict=True):
        self._n = n_partitions
        self.strict = strict
        self.current = None
        self.violations = []
        self.moves = 0
        self.sparse = []

    def violation(self, msg):
        self.violations.append(msg)
        if self.strict:
            raise AssertionError(msg)

    def n_partitions(self):
        return self._n

    @contextlib.contextmanager
    def device(self, partition):
        prev, self.current = self.current, partition
        try:
            yield
        finally:
            self.current = prev

    def _tag(self, x, partition):
        x = np.array(x, copy=True).view(DevArray)
        x.dev = partition
        return x

    def asarray(self, x, dtype=None, partition=0):
        return self._tag(np.asarray(x, dtype=dtype), partition)

    def to_numpy(self, x):
        return np.array(x).view(np.ndarray)

    def move(self, x, partition):
        if not isinstance(x, np.ndarray):
            return x
        if isinstance(x, DevArray) and x.dev == partition:
            return x
        self.moves += 1
        return self._tag(x, partition)

    def csr(self, indptr, indices, data, shape, partition=0):
        if self.current is not None and self.current != partition:
            self.violation("csr built under another device")
        m = FakeSparse(sp.csr_matrix((data, indices, indptr), shape=shape), partition)
        self.sparse.append(m)
        return m

    def spmm(self, a, b, out=None, accumulate=False):
        for name, x in (("b", b), ("out", out)):
            if x is not None and getattr(x, "dev", None) != a.dev:
                self.violation(f"spmm: {name} on {getattr(x, 'dev', None)}, A on {a.dev}")
        if self.current != a.dev:
            self.violation(f"spmm of device {a.dev} while device {self.current} is current")
        res = self._tag(a.mat @ np.asarray(b).view(np.ndarray), a.dev)
        if out is None:
            return res
        if accumulate:
            out += res
        else:
            out[...] = res
        return out

    def allreduce(self, parts):
        for i, p in enumerate(parts):
            if getattr(p, "dev", None) != i:
                self.violation(f"allreduce: part {i} on device {getattr(p, 'dev', None)}")
        with self.device(0):
            total = parts[0].copy()
            for p in parts[1:]:
                total += self.move(p, 0)
        return total


@pytest.fixture
def fake_active():
    yield
    FakeDeviceBackend.active = None


def _activate(be):
    FakeDeviceBackend.active = be
    return be


# --------------------------------------------------------------------- data
def _matrix(n_rows=60, n_cols=500, density=0.05, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng,
                  dtype=dtype)
    A = A.tocoo()
    keep = (A.col != 7) & (A.row != 3)  # an empty column and an empty row
    return sp.csr_matrix((np.abs(A.data[keep]) + 0.1, (A.row[keep], A.col[keep])),
                         shape=A.shape)


BACKENDS = {
    "numpy": lambda n: NumpyBackend(n_partitions=n),
    "scipy": lambda n: NumpyBackend(n_partitions=n, use_torch=False),
    "fake": lambda n: _activate(FakeDeviceBackend(n)),
}


# ------------------------------------------------------------------ planning
@pytest.mark.parametrize("block_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("cap", [5, 40, 2**31 - 1])
def test_plan_blocks_cover_columns(block_size, cap):
    col_nnz = np.random.default_rng(1).integers(0, 12, size=300)
    bounds = plan_blocks(col_nnz, block_size, cap)
    assert bounds[0][0] == 0 and bounds[-1][1] == 300
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    for s, e in bounds:
        assert 0 < e - s <= block_size
        assert col_nnz[s:e].sum() <= cap or e - s == 1


@pytest.mark.parametrize("n_partitions", [1, 2, 3, 4, 7])
def test_plan_partitions_contiguous_and_balanced(n_partitions):
    rng = np.random.default_rng(2)
    bounds = [(i, i + 1) for i in range(200)]
    block_nnz = rng.integers(50, 150, size=200)
    part = plan_partitions(bounds, block_nnz, n_partitions)
    assert np.all(np.diff(part) >= 0) and np.all(np.diff(part) <= 1)
    assert set(part.tolist()) == set(range(n_partitions))
    loads = np.bincount(part, weights=block_nnz)
    # each partition within one block's worth of the even share
    assert np.all(np.abs(loads - block_nnz.sum() / n_partitions) <= block_nnz.max())


def test_plan_partitions_fewer_blocks_than_partitions():
    part = plan_partitions([(0, 5), (5, 9)], np.array([3, 4]), 5)
    assert part.tolist() == [0, 1]


# ------------------------------------------------------------------ blocks
@pytest.mark.parametrize("kind", sorted(BACKENDS))
@pytest.mark.parametrize("n_partitions", [1, 2, 3, 4])
def test_blocks_cover_all_columns(kind, n_partitions, fake_active):
    A = _matrix()
    blocks = ColumnBlocks(A, BACKENDS[kind](n_partitions), block_size=37)
    assert blocks.n_partitions == n_partitions
    starts = [b.start for b in blocks.blocks]
    assert starts == sorted(starts) and blocks.blocks[0].start == 0
    assert blocks.blocks[-1].stop == A.shape[1]
    assert all(a.stop == b.start for a, b in zip(blocks.blocks, blocks.blocks[1:]))
    assert sum(b.nnz for b in blocks.blocks) == A.nnz == blocks.nnz
    ranges = blocks.partition_ranges
    assert ranges[0][0] == 0 and ranges[-1][1] == A.shape[1]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for b in blocks.blocks:  # every block inside its partition's range
        s, e = ranges[b.partition]
        assert s <= b.start < b.stop <= e
        assert (b.local_start, b.local_stop) == (b.start - s, b.stop - s)


@pytest.mark.parametrize("kind", sorted(BACKENDS))
@pytest.mark.parametrize("n_partitions", [1, 2, 3, 4])
def test_products_equal_dense(kind, n_partitions, fake_active):
    A = _matrix(seed=n_partitions)
    D = A.toarray()
    rng = np.random.default_rng(0)
    F = rng.standard_normal((A.shape[1], 5))
    R = rng.standard_normal((A.shape[0], 5))
    be = BACKENDS[kind](n_partitions)
    blocks = ColumnBlocks(A, be, block_size=29)
    parts = blocks.split_factor(F)
    assert len(parts) == n_partitions
    np.testing.assert_allclose(blocks.gather_factor(parts), F)
    np.testing.assert_allclose(be.to_numpy(blocks.matmul(parts)), D @ F, rtol=1e-12)
    np.testing.assert_allclose(be.to_numpy(blocks.gram(parts)), F.T @ F, rtol=1e-12)
    out = blocks.gather_factor(blocks.rmatmul(be.asarray(R)))
    np.testing.assert_allclose(out, D.T @ R, rtol=1e-12, atol=1e-12)

    # sweep: the update sees A_b.T @ R and its products use the updated factor
    step = be.asarray(np.full(5, 0.5))

    def update(Fb, T, s):
        Fb -= s * T

    P, Q = blocks.sweep(parts, be.asarray(R), update, consts=(step,))
    F_new = F - 0.5 * (D.T @ R)
    np.testing.assert_allclose(blocks.gather_factor(parts), F_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(P), D @ F_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(Q), F_new.T @ F_new, rtol=1e-12)
    if kind == "fake":
        assert be.violations == []
        # every block was placed on its partition's device
        devs = [m.dev for m in be.sparse]
        assert devs == sorted(devs) and set(devs) == set(range(n_partitions))


def test_fake_device_catches_misplaced_arrays(fake_active):
    be = _activate(FakeDeviceBackend(2))
    blocks = ColumnBlocks(_matrix(), be, block_size=50)
    parts = blocks.split_factor(np.ones((500, 3)))
    captured = be.asarray(np.ones(3))  # on device 0: read from device 1 below
    with pytest.raises(AssertionError, match="mixes devices"):
        blocks.sweep(parts, be.asarray(np.ones((60, 3))),
                     lambda Fb, T: Fb.__isub__(captured * T))


def test_more_partitions_than_blocks_leaves_none_empty():
    A = _matrix(n_cols=40)
    blocks = ColumnBlocks(A, NumpyBackend(n_partitions=4), block_size=4096)
    assert blocks.n_partitions == 4
    assert all(e > s for s, e in blocks.partition_ranges)
    F = np.random.default_rng(0).standard_normal((40, 3))
    np.testing.assert_allclose(blocks.matmul(blocks.split_factor(F)), A @ F, rtol=1e-12)


def test_more_partitions_than_columns():
    A = _matrix(n_cols=3, density=0.5)
    blocks = ColumnBlocks(A, NumpyBackend(n_partitions=5))
    assert blocks.n_partitions == 5
    widths = [e - s for s, e in blocks.partition_ranges]
    assert sum(widths) == 3 and min(widths) == 0
    F = np.arange(9.0).reshape(3, 3)
    parts = blocks.split_factor(F)
    np.testing.assert_allclose(blocks.matmul(parts), A @ F)
    np.testing.assert_allclose(blocks.gram(parts), F.T @ F)
    np.testing.assert_allclose(blocks.gather_factor(blocks.rmatmul(np.ones((60, 3)))),
                               A.T @ np.ones((60, 3)))


class _OnePartitionOfThree(NumpyBackend):
    """Holds only partition 1 of 3 (what a rank of a distributed job sees)."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def n_partitions(self):
        return 3

    def local_partitions(self):
        return [self.rank]


def test_local_partitions_build_only_their_blocks():
    A = _matrix(n_cols=300)
    full = ColumnBlocks(A, NumpyBackend(n_partitions=3), block_size=20)
    F = np.random.default_rng(0).standard_normal((300, 4))
    total = 0
    for rank in range(3):
        blocks = ColumnBlocks(A, _OnePartitionOfThree(rank), block_size=20)
        assert blocks.n_partitions == 1 and blocks.local_partitions == [rank]
        assert blocks.global_partition_ranges == full.global_partition_ranges
        s, e = blocks.partition_ranges[0]
        assert (s, e) == full.partition_ranges[rank]
        assert all(s <= b.start and b.stop <= e for b in blocks.blocks)
        assert sum(b.nnz for b in blocks.blocks) == A[:, s:e].nnz
        parts = blocks.split_factor(F)
        assert parts[0].shape == (e - s, 4)
        total = total + blocks.matmul(parts)  # this rank's partial
    np.testing.assert_allclose(total, A @ F, rtol=1e-12)


# -------------------------------------------------------------- int32 boundary
@pytest.mark.parametrize("n_partitions", [1, 3])
def test_int32_boundary_with_int64_input(n_partitions):
    """Blocks stay below max_block_nnz, so int32 indices suffice even for int64 input."""
    A = _matrix(n_rows=80, n_cols=400, density=0.1)
    A64 = A.copy()  # SciPy would downcast int64 indices given to the constructor
    A64.indices = A64.indices.astype(np.int64)
    A64.indptr = A64.indptr.astype(np.int64)
    assert A64.indices.dtype == np.int64
    cap = 50
    be = NumpyBackend(n_partitions=n_partitions, use_torch=False)
    blocks = ColumnBlocks(A64, be, max_block_nnz=cap)
    assert len(blocks.blocks) > 400 * 80 * 0.1 / cap / 2
    for b in blocks.blocks:
        assert b.nnz <= cap or b.stop - b.start == 1
        for m in (b.A, *b.at_mats()):
            assert m.indices.dtype == np.int32 and m.indptr.dtype == np.int32
    F = np.random.default_rng(0).standard_normal((400, 3))
    np.testing.assert_allclose(blocks.matmul(blocks.split_factor(F)), A @ F, rtol=1e-12)
    R = np.random.default_rng(1).standard_normal((80, 3))
    np.testing.assert_allclose(blocks.gather_factor(blocks.rmatmul(R)), A.T @ R, rtol=1e-12)


def test_max_block_nnz_validation():
    with pytest.raises(ValueError, match="max_block_nnz"):
        ColumnBlocks(_matrix(), NumpyBackend(), max_block_nnz=2**31)
    with pytest.raises(ValueError, match="block_size"):
        ColumnBlocks(_matrix(), NumpyBackend(), block_size=0)


def test_unsorted_csc_input_left_alone():
    A = _matrix().tocsc()
    A.indices[A.indptr[10]:A.indptr[11]] = A.indices[A.indptr[10]:A.indptr[11]][::-1].copy()
    A.has_sorted_indices = False
    before = A.indices.copy()
    blocks = ColumnBlocks(A, NumpyBackend(n_partitions=2), block_size=64)
    np.testing.assert_array_equal(A.indices, before)
    F = np.ones((500, 2))
    np.testing.assert_allclose(blocks.matmul(blocks.split_factor(F)), A @ F)


# --------------------------------------------------------- estimator on fakes
def _fit(backend):
    X, _, _ = make_planted_lowrank(n_examples=60, n_params=400, support_size=40,
                                   random_state=0, dtype=np.float64)
    est = LowRankNPEFF(n_components=4, n_classes=3, random_state=0, max_iter=15, tol=0,
                       block_size=64, backend=backend)
    return est.fit_transform(X), est


def test_estimator_on_fake_devices_matches_numpy(fake_active):
    W_ref, ref = _fit(NumpyBackend(n_partitions=3))
    be = _activate(FakeDeviceBackend(3, strict=False))
    W, est = _fit(be)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-10, atol=1e-12)
    # blocks were all placed on their partitions' devices
    assert {m.dev for m in be.sparse} == {0, 1, 2}


def test_estimator_on_fake_devices_no_cross_device_reads(fake_active):
    """Every product of a fit runs on the device its operands live on (the G step's
    constants reach each device through ``sweep(consts=...)``)."""
    be = _activate(FakeDeviceBackend(3, strict=False))
    _fit(be)
    assert be.violations == []


# ------------------------------------------------------------------- get_backend
def test_get_backend_resolution():
    assert isinstance(get_backend("auto"), NumpyBackend)
    assert isinstance(get_backend("numpy"), NumpyBackend)
    be = NumpyBackend(n_partitions=2)
    assert get_backend(be) is be
    with pytest.raises(ValueError, match="backend must be"):
        get_backend("torch")
    with pytest.raises(ValueError, match="devices"):
        get_backend("numpy", devices=[0])


def test_get_backend_cupy_without_cupy(monkeypatch):
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed")
    monkeypatch.setitem(sys.modules, "cupy", None)
    for args in (dict(backend="cupy"), dict(backend="auto", devices=[0])):
        with pytest.raises(ImportError, match=r"sknpeff\[cuda\]"):
            get_backend(**args)


def test_get_backend_cupy_missing_is_reported_even_if_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delitem(sys.modules, "sknpeff.backends._cupy", raising=False)
    with pytest.raises(ImportError, match=r"sknpeff\[cuda\]"):
        get_backend("cupy")


def test_resolve_devices():
    assert resolve_devices(None, 2) == [0]
    assert resolve_devices(1, 2) == [1]
    assert resolve_devices([1, 0], 2) == [1, 0]
    for bad, match in (([], "at least one"), ([0, 0], "distinct"), ([2], "does not exist"),
                       (["0"], "integers"), ([True], "integers"), (1.5, "list of ints")):
        with pytest.raises(ValueError, match=match):
            resolve_devices(bad, 2)
    with pytest.raises(ValueError, match="no device"):
        resolve_devices(None, 0)


def test_local_partitions_default_is_all():
    assert NumpyBackend(n_partitions=3).local_partitions() == [0, 1, 2]
    assert NumpyBackend().is_root()


# ------------------------------------------------- CuPy glue on a fake CuPy (CPU)
@pytest.fixture
def fake_cupy(monkeypatch):
    from tests import _fake_cupy

    _fake_cupy.install(monkeypatch)
    yield _fake_cupy
    sys.modules.pop("sknpeff.backends._cupy", None)


@pytest.mark.parametrize("devices", [[0], [1, 0]])
@pytest.mark.parametrize("use_nccl", [True, False])
def test_cupy_glue_on_fake_cupy(fake_cupy, devices, use_nccl):
    from sknpeff.backends._cupy import CupyBackend

    be = CupyBackend(devices=devices, use_nccl=use_nccl)
    assert be.n_partitions() == len(devices)
    assert (be._comms is not None) == (use_nccl and len(devices) > 1)
    A = _matrix()
    blocks = ColumnBlocks(A, be, block_size=37, max_block_nnz=60)
    for b in blocks.blocks:
        assert b.A.data.device.id == devices[b.partition] == b.At.indices.device.id
    rng = np.random.default_rng(0)
    F, R = rng.standard_normal((500, 4)), rng.standard_normal((60, 4))
    parts = blocks.split_factor(F)
    assert [p.device.id for p in parts] == devices
    P = blocks.matmul(parts)
    assert P.device.id == devices[0]
    np.testing.assert_allclose(be.to_numpy(P), A @ F, rtol=1e-12)
    np.testing.assert_allclose(be.to_numpy(blocks.gram(parts)), F.T @ F, rtol=1e-12)
    np.testing.assert_allclose(blocks.gather_factor(blocks.rmatmul(be.asarray(R))),
                               A.T @ R, rtol=1e-12, atol=1e-12)
    step = be.asarray(np.full(4, 0.5))
    P, Q = blocks.sweep(parts, be.asarray(R), lambda Fb, T, s: Fb.__isub__(s * T),
                        consts=(step,))
    F_new = F - 0.5 * (A.T @ R)
    np.testing.assert_allclose(be.to_numpy(P), A @ F_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(Q), F_new.T @ F_new, rtol=1e-12)
    assert fake_cupy.FakeState.cross_device_reads == []


def test_lowrank_on_fake_cupy_two_devices(fake_cupy):
    from sknpeff.backends._cupy import CupyBackend

    W_ref, ref = _fit(NumpyBackend(n_partitions=2))
    W, est = _fit(CupyBackend(devices=[0, 1]))
    assert isinstance(W, np.ndarray) and not isinstance(W, fake_cupy.ndarray)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("n_partitions", [1, 3])
def test_row_tiles_give_the_same_products(chunk, n_partitions):
    """The transpose of each block split into row tiles (a CPU cache optimisation)
    computes the same A.T @ R and the same fused sweep as untiled blocks."""
    from sknpeff.backends._blocks import split_row_tiles

    rng = np.random.default_rng(0)
    A = sp.random(150, 90, density=0.2, format="csr", random_state=3, dtype=np.float64)
    R = rng.standard_normal((150, 4))
    F = rng.standard_normal((90, 4))
    plain = ColumnBlocks(A, NumpyBackend(n_partitions=n_partitions), block_size=16)
    be = NumpyBackend(n_partitions=n_partitions)
    be.row_chunk = chunk
    tiled = ColumnBlocks(A, be, block_size=16)
    assert all(b.At is None and b.At_tiles for b in tiled.blocks)
    np.testing.assert_allclose(tiled.gather_factor(tiled.rmatmul(R)), A.T @ R, rtol=1e-12)

    def upd(Fb, T):
        Fb += 0.1 * T

    parts_p, parts_t = plain.split_factor(F), tiled.split_factor(F)
    P1, Q1 = plain.sweep(parts_p, R, upd)
    P2, Q2 = tiled.sweep(parts_t, R, upd)
    np.testing.assert_allclose(P2, P1, rtol=1e-12)
    np.testing.assert_allclose(Q2, Q1, rtol=1e-12)
    np.testing.assert_allclose(tiled.gather_factor(parts_t), F + 0.1 * (A.T @ R), rtol=1e-12)
    # the tiles hold every value once, int32 indices, columns within the tile
    b = tiled.blocks[0]
    total = sum(t.values().numel() for t in b.at_mats())
    assert total == b.nnz
    csr = A[:, b.start:b.stop].T.tocsr()
    for c0, c1, ip, ix, d in split_row_tiles(csr.indptr, csr.indices, csr.data, 150, chunk):
        assert ip.dtype == np.int32 and ix.dtype == np.int32
        assert ix.min() >= 0 and ix.max() < c1 - c0
        np.testing.assert_array_equal(
            sp.csr_matrix((d, ix, ip), shape=(csr.shape[0], c1 - c0)).toarray(),
            csr[:, c0:c1].toarray())


def test_owned_csc_is_reordered_in_place_and_callers_matrix_untouched():
    A = sp.random(300, 120, density=0.1, format="csc", random_state=4, dtype=np.float64)
    A.sort_indices()
    R = np.random.default_rng(2).standard_normal((300, 3))
    be = NumpyBackend()
    be.row_chunk = 64
    before = (A.data.copy(), A.indices.copy())
    ColumnBlocks(A, be, block_size=32)  # not owned: the caller's CSC stays as it was
    np.testing.assert_array_equal(A.data, before[0])
    np.testing.assert_array_equal(A.indices, before[1])
    own = A.copy()
    blocks = ColumnBlocks(own, be, block_size=32, owned=True)
    # tiles are views of the private copy, and the products are unchanged
    tile = blocks.blocks[0].At_tiles[0][2]
    assert np.shares_memory(tile.values().numpy(), own.data)
    np.testing.assert_allclose(blocks.gather_factor(blocks.rmatmul(R)), A.T @ R, rtol=1e-12)
