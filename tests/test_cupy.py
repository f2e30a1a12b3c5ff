"""CuPy backend: the planted-recovery and equality checks of the CPU, and CuPy dispatch.

Every test that takes the ``cp`` fixture runs twice: on a fake CuPy (``_fake_cupy``, NumPy
underneath, two fake devices; always runs) and on the real CuPy (marked ``gpu``; skipped,
with the reason, without CuPy or without a CUDA device). On a GPU machine:
``pytest -q -m gpu tests/test_cupy.py``.
"""

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sknpeff.backends import ColumnBlocks, NumpyBackend, get_backend
from sknpeff.backends._blocks import INT32_MAX_NNZ, plan_partition_blocks
from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from tests import _fake_cupy
from tests._helpers import matched_cos

HERE = Path(__file__).resolve().parent


def _gpu_skip_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'sknpeff[cuda]')"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver / no device
        n = 0
    return None if n else "CuPy is installed but no CUDA GPU is visible"


GPU_SKIP = _gpu_skip_reason()


@pytest.fixture(params=["fake", pytest.param("gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))])])
def cp(request, monkeypatch):
    """The ``cupy`` module: the fake one on the CPU, or the real one on a GPU."""
    if request.param == "fake":
        fake = _fake_cupy
        module = fake.install(monkeypatch)
        yield module
        sys.modules.pop("sknpeff.backends._cupy", None)
        assert fake.FakeState.cross_device_reads == []
    else:
        import cupy

        yield cupy


def _n_devices(cp) -> int:
    return int(cp.cuda.runtime.getDeviceCount())


def _need_devices(cp, n: int) -> None:
    if _n_devices(cp) < n:
        pytest.skip(f"needs at least {n} CUDA GPUs")


def _is_numpy(x) -> bool:
    """A plain NumPy array (not the fake CuPy's NumPy subclass)."""
    return type(x) is np.ndarray


def _on_device(cp, x, device: int) -> bool:
    return isinstance(x, cp.ndarray) and x.device.id == device


def _to_cupy_csr(cp, X: sp.spmatrix, device: int = 0):
    import cupyx.scipy.sparse as cusp

    with cp.cuda.Device(device):
        return cusp.csr_matrix(sp.csr_matrix(X))


def _to_cupy_dense(cp, X: sp.spmatrix, device: int = 0):
    with cp.cuda.Device(device):
        return cp.asarray(X.toarray())


# ----------------------------------------------------------------- backend choice
def test_get_backend_picks_cupy(cp):
    from sknpeff.backends._cupy import CupyBackend

    assert isinstance(get_backend("cupy"), CupyBackend)
    assert isinstance(get_backend("auto", devices=[0]), CupyBackend)
    assert isinstance(get_backend("auto", X=cp.zeros(3)), CupyBackend)
    X = _to_cupy_csr(cp, sp.random(5, 7, density=0.5, random_state=0))
    assert isinstance(get_backend("auto", X=X), CupyBackend)
    assert isinstance(get_backend("auto", X=np.zeros(3)), NumpyBackend)
    with pytest.raises(ValueError, match="does not exist"):
        get_backend("cupy", devices=[_n_devices(cp)])


def test_auto_backend_computes_on_the_input_device(cp):
    _need_devices(cp, 2)
    with cp.cuda.Device(1):
        x = cp.zeros(3)
    assert get_backend("auto", X=x).devices == [1]
    assert get_backend("auto", X=x, devices=[0]).devices == [0]  # explicit devices win


# ------------------------------------------------------------------- block plans
@pytest.mark.parametrize("n_devices", [1, 2])
def test_gpu_blocks_default_and_one_per_device(cp, n_devices):
    from sknpeff.backends._cupy import CupyBackend

    _need_devices(cp, n_devices)
    A = sp.random(60, 5000, density=0.05, format="csr", random_state=0)
    be = CupyBackend(devices=list(range(n_devices)))
    auto = ColumnBlocks(A, be)  # block_size="auto": cache-sized, as on the CPU
    assert auto.block_size == 4096 and len(auto.blocks) == 2
    blocks = ColumnBlocks(A, be, block_size=None)  # one block per device
    assert len(blocks.blocks) == n_devices
    assert [b.partition for b in blocks.blocks] == list(range(n_devices))
    # under the nonzero cap, blocks are cut only where they would pass it
    capped = ColumnBlocks(A, be, block_size=None, max_block_nnz=A.nnz // 7)
    assert len(capped.blocks) > n_devices
    assert all(b.nnz <= A.nnz // 7 for b in capped.blocks)
    # the CPU has the same default
    cpu = ColumnBlocks(A, NumpyBackend(n_partitions=n_devices))
    assert cpu.block_size == 4096 and len(cpu.blocks) == 2
    F = np.random.default_rng(0).standard_normal((5000, 3))
    for b in (auto, blocks, capped):
        np.testing.assert_allclose(be.to_numpy(b.matmul(b.split_factor(F))), A @ F,
                                   rtol=1e-10)


def test_plan_partition_blocks():
    rng = np.random.default_rng(0)
    col_nnz = rng.integers(0, 50, size=1000)
    total = int(col_nnz.sum())
    for n in (1, 2, 3, 7):
        bounds, part = plan_partition_blocks(col_nnz, n, INT32_MAX_NNZ)
        assert len(bounds) == n and list(part) == list(range(n))
        assert bounds[0][0] == 0 and bounds[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        loads = [int(col_nnz[s:e].sum()) for s, e in bounds]
        assert max(loads) <= total / n + col_nnz.max()  # balanced by nonzeros
        cap = total // (2 * n)
        bounds, part = plan_partition_blocks(col_nnz, n, cap)
        assert all(col_nnz[s:e].sum() <= cap or e - s == 1 for s, e in bounds)
        assert np.all(np.diff(part) >= 0) and set(part) == set(range(n))
    # more partitions than columns; columns without nonzeros
    bounds, part = plan_partition_blocks(np.array([3, 0, 4]), 5, 10)
    assert bounds == [(0, 1), (1, 2), (2, 3)] and list(part) == [0, 1, 2]
    bounds, part = plan_partition_blocks(np.zeros(10, dtype=np.int64), 2, 10)
    assert bounds == [(0, 5), (5, 10)]
    assert plan_partition_blocks(np.zeros(0, dtype=np.int64), 2, 10)[0] == []


def test_block_size_none_or_auto_in_estimators():
    X, _, _ = make_planted_lowrank(n_examples=60, n_params=400, support_size=40,
                                   random_state=0, dtype=np.float64)
    kw = dict(n_components=3, n_classes=3, random_state=0, max_iter=5, tol=0)
    W_auto = LowRankNPEFF(**kw).fit_transform(X)
    W_none = LowRankNPEFF(**kw, block_size=None).fit_transform(X)
    W_int = LowRankNPEFF(**kw, block_size=64).fit_transform(X)
    np.testing.assert_allclose(W_none, W_auto, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(W_int, W_auto, rtol=1e-10, atol=1e-12)
    for bad in (0, "big", 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            LowRankNPEFF(**kw, block_size=bad).fit(X)


@pytest.mark.parametrize("devices", [[0], [0, 1]])
def test_blocks_products(cp, devices):
    from sknpeff.backends._cupy import CupyBackend

    _need_devices(cp, len(devices))
    rng = np.random.default_rng(0)
    A = sp.random(90, 700, density=0.05, format="csr", random_state=rng, dtype=np.float64)
    be = CupyBackend(devices=devices)
    blocks = ColumnBlocks(A, be, block_size=64, max_block_nnz=200)
    for b in blocks.blocks:  # int32 blocks, each on its partition's GPU
        assert b.A.indices.dtype == np.int32 and b.At.indptr.dtype == np.int32
        assert b.A.data.device.id == devices[b.partition]
        assert b.nnz <= 200 or b.stop - b.start == 1
    F = rng.standard_normal((700, 6))
    R = rng.standard_normal((90, 6))
    parts = blocks.split_factor(F)
    assert [p.device.id for p in parts] == devices
    np.testing.assert_allclose(be.to_numpy(blocks.matmul(parts)), A @ F, rtol=1e-10)
    np.testing.assert_allclose(be.to_numpy(blocks.gram(parts)), F.T @ F, rtol=1e-10)
    np.testing.assert_allclose(blocks.gather_factor(blocks.rmatmul(be.asarray(R))),
                               A.T @ R, rtol=1e-10, atol=1e-12)
    step = be.asarray(np.full(6, 0.25))
    P, Q = blocks.sweep(parts, be.asarray(R), lambda Fb, T, s: Fb.__isub__(s * T),
                        consts=(step,))
    F_new = F - 0.25 * (A.T @ R)
    np.testing.assert_allclose(blocks.gather_factor(parts), F_new, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(P), A @ F_new, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(be.to_numpy(Q), F_new.T @ F_new, rtol=1e-10)


@pytest.mark.parametrize("use_nccl", [True, False])
def test_allreduce_and_move_across_devices(cp, use_nccl):
    from sknpeff.backends._cupy import CupyBackend

    _need_devices(cp, 2)
    be = CupyBackend(devices=[0, 1], use_nccl=use_nccl)
    x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    parts = [be.asarray(x, partition=0), be.asarray(2 * x, partition=1)]
    moved = be.move(parts[0], 1)
    assert moved.device.id == 1
    np.testing.assert_array_equal(be.to_numpy(moved), x)
    total = be.allreduce(parts)  # may sum in place (NCCL): parts are not reused
    assert total.device.id == 0
    np.testing.assert_array_equal(be.to_numpy(total), 3 * x)


# --------------------------------------------------- planted recovery, equality
@pytest.mark.parametrize("seed", [0, 1])
def test_planted_recovery_lowrank(cp, seed):
    X, _, G = make_planted_lowrank(random_state=seed)
    est = LowRankNPEFF(n_components=8, n_classes=3, random_state=seed, backend="cupy",
                       devices=[0])
    W = est.fit_transform(X)
    assert _is_numpy(W) and (W >= 0).all()  # SciPy input: NumPy output
    assert matched_cos(G, est.components_).min() >= 0.98
    assert est.reconstruction_err_ < 1e-2 * np.sqrt(X.shape[0])


def test_planted_recovery_diagonal(cp):
    X, _, H = make_planted_diagonal(n_examples=300, n_params=2000, n_components=6,
                                    support_size=150, random_state=0)
    est = DiagonalNPEFF(n_components=6, random_state=0, backend="cupy", devices=[0])
    W = est.fit_transform(X)
    assert _is_numpy(W) and (W >= 0).all()
    assert matched_cos(H, est.components_).min() >= 0.98


def _kw():
    return dict(n_components=8, n_classes=3, random_state=2, max_iter=40, tol=0,
                block_size=256)


def _lowrank_data():
    X, _, _ = make_planted_lowrank(n_examples=200, n_params=2000, random_state=2,
                                   dtype=np.float64)
    return X


def test_gpu_equals_cpu(cp):
    X = _lowrank_data()
    cpu = LowRankNPEFF(**_kw(), backend=NumpyBackend())
    gpu = LowRankNPEFF(**_kw(), backend="cupy", devices=[0])
    np.testing.assert_allclose(gpu.fit_transform(X), cpu.fit_transform(X),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpu.components_, cpu.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpu.transform(X), cpu.transform(X), rtol=1e-5, atol=1e-7)
    # the GPU default (4096-column blocks) and one block per device compute the same fit
    for bs in ("auto", None):
        other = LowRankNPEFF(**{**_kw(), "block_size": bs}, backend="cupy", devices=[0])
        np.testing.assert_allclose(other.fit_transform(X), cpu.transform(X), rtol=1e-5,
                                   atol=1e-7)


def test_two_gpus_equal_one(cp):
    _need_devices(cp, 2)
    X = _lowrank_data()
    one = LowRankNPEFF(**_kw(), backend="cupy", devices=[0])
    two = LowRankNPEFF(**_kw(), backend="cupy", devices=[0, 1])
    W1, W2 = one.fit_transform(X), two.fit_transform(X)
    np.testing.assert_allclose(W2, W1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two.components_, one.components_, rtol=1e-5, atol=1e-7)
    cpu2 = LowRankNPEFF(**_kw(), backend=NumpyBackend(n_partitions=2))
    np.testing.assert_allclose(W2, cpu2.fit_transform(X), rtol=1e-5, atol=1e-7)


def test_diagonal_two_gpus_equal_cpu(cp):
    _need_devices(cp, 2)
    X, _, _ = make_planted_diagonal(n_examples=150, n_params=1500, n_components=5,
                                    support_size=100, random_state=3, dtype=np.float64)
    kw = dict(n_components=5, random_state=3, max_iter=30, tol=0, block_size=128)
    cpu = DiagonalNPEFF(**kw, backend=NumpyBackend(n_partitions=2))
    gpu = DiagonalNPEFF(**kw, backend="cupy", devices=[0, 1])
    np.testing.assert_allclose(gpu.fit_transform(X), cpu.fit_transform(X), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(gpu.components_, cpu.components_, rtol=1e-5, atol=1e-7)
    # transform splits X and H over the devices as the fit does
    np.testing.assert_allclose(gpu.transform(X), cpu.transform(X), rtol=1e-5, atol=1e-7)


def test_cupy_csr_refuses_int64_sizes(cp):
    from sknpeff.backends._cupy import CupyBackend

    be = CupyBackend()
    one = np.ones(1)
    with pytest.raises(ValueError, match="at most 2147483647"):
        be.csr(np.array([0, 1]), np.array([0]), one, (1, 2**31))


# --------------------------------------------- CuPy in, CuPy out (array API style)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_lowrank_cupy_input_gives_cupy_output(cp, kind):
    X = _lowrank_data()
    device = _n_devices(cp) - 1  # the last device: output must follow the input
    Xd = (_to_cupy_csr if kind == "sparse" else _to_cupy_dense)(cp, X, device)
    ref = LowRankNPEFF(**_kw(), backend=NumpyBackend())
    W_ref = ref.fit_transform(X)
    est = LowRankNPEFF(**_kw())  # backend="auto": CuPy for CuPy input
    W = est.fit_transform(Xd)
    assert _on_device(cp, W, device)
    from sknpeff.backends._cupy import CupyBackend

    assert isinstance(est._get_backend(Xd), CupyBackend)
    np.testing.assert_allclose(W.get(), W_ref, rtol=1e-5, atol=1e-7)
    # fitted attributes stay NumPy (documented), equal to the CPU fit
    assert _is_numpy(est.components_) and _is_numpy(est.kept_columns_)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-5, atol=1e-7)
    Wt = est.transform(Xd)
    assert _on_device(cp, Wt, device)
    np.testing.assert_allclose(Wt.get(), ref.transform(X), rtol=1e-5, atol=1e-7)
    # NumPy/SciPy input to the same fitted estimator: NumPy output
    assert _is_numpy(est.transform(X))
    # scalars stay Python floats; W may be CuPy or NumPy
    for value in (est.loss(Xd), -est.score(Xd), est.loss(Xd, W=Wt), est.loss(X, W=Wt)):
        assert type(value) is float
        np.testing.assert_allclose(value, ref.loss(X), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="W must have shape"):
        est.loss(Xd, W=Wt[:3])


def test_lowrank_cupy_input_partial_fit(cp):
    X = _lowrank_data()
    kw = dict(n_components=4, n_classes=3, random_state=0, block_size=256)
    ref = LowRankNPEFF(**kw, backend=NumpyBackend())
    est = LowRankNPEFF(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in (slice(0, 100), slice(100, 200)):
            assert ref.partial_fit(X[s]) is ref
            assert est.partial_fit(_to_cupy_csr(cp, X[s])) is est
    assert _is_numpy(est.components_)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-5, atol=1e-7)
    assert type(est.loss_curve_[-1]) is float
    assert _on_device(cp, est.transform(_to_cupy_csr(cp, X)), 0)


@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_diagonal_cupy_input_gives_cupy_output(cp, backend):
    X, _, _ = make_planted_diagonal(n_examples=120, n_params=800, n_components=4,
                                    support_size=80, random_state=1, dtype=np.float64)
    device = _n_devices(cp) - 1
    Xd = _to_cupy_csr(cp, X, device)
    kw = dict(n_components=4, random_state=1, max_iter=20, tol=0)
    ref = DiagonalNPEFF(**kw)
    W_ref = ref.fit_transform(X)
    # whatever backend computes it, CuPy input gives CuPy output on its device
    est = DiagonalNPEFF(**kw, backend=backend)
    W = est.fit_transform(Xd)
    assert _on_device(cp, W, device)
    np.testing.assert_allclose(W.get(), W_ref, rtol=1e-5, atol=1e-7)
    assert _is_numpy(est.components_)
    Wt = est.transform(Xd)
    assert _on_device(cp, Wt, device)
    np.testing.assert_allclose(Wt.get(), ref.transform(X), rtol=1e-5, atol=1e-7)
    assert _is_numpy(est.transform(X))
    back = est.inverse_transform(Wt)
    assert _on_device(cp, back, device)
    np.testing.assert_allclose(back.get(), ref.inverse_transform(W_ref), rtol=1e-5,
                               atol=1e-7)
    assert _is_numpy(est.inverse_transform(Wt.get()))
    with pytest.raises(ValueError, match="shape"):
        est.inverse_transform(Wt[:, :2])
    # partial_fit on CuPy batches: the fitted state stays NumPy
    online = DiagonalNPEFF(**kw, backend=backend)
    assert online.partial_fit(_to_cupy_csr(cp, X[:60], device)) is online
    online.partial_fit(_to_cupy_csr(cp, X[60:], device))
    assert _is_numpy(online.components_) and online.n_steps_ == 2


@pytest.mark.parametrize("n_devices", [1, 2])
def test_frozen_components_fit_on_cupy_input(cp, n_devices):
    # the frozen-components protocol follows the estimators' rule: CuPy in, CuPy out
    _need_devices(cp, n_devices)
    X, _, _ = make_planted_diagonal(n_examples=120, n_params=800, n_components=4,
                                    support_size=80, random_state=1)
    base = DiagonalNPEFF(n_components=2, random_state=0, max_iter=10, tol=0).fit(X)
    est = DiagonalNPEFF(n_components=4, random_state=0, max_iter=10, tol=0,
                        devices=list(range(n_devices)), block_size=128)
    W = est.fit_transform(_to_cupy_csr(cp, X), frozen_components=base.components_)
    assert not _is_numpy(W) and W.shape == (120, 4)
    np.testing.assert_array_equal(est.components_[:2], base.components_)


# ------------------------------------------------------------ benchmarks/gpu.py
def _gpu_bench():
    path = HERE.parent / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("_bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMOKE = ["--rows", "150", "--cols", "1200", "--k", "60", "--r", "4", "--iters", "2",
         "--repeats", "1"]


def test_gpu_benchmark_smoke(cp, capsys):
    """The whole script (CPU and GPU columns) on a tiny problem."""
    _gpu_bench().main(SMOKE + ["--devices", *map(str, range(min(2, _n_devices(cp))))])
    out = capsys.readouterr().out
    assert "peak memory bandwidth" in out and "s / iteration" in out
    rows = [line for line in out.splitlines() if line.startswith("| GPU")]
    assert len(rows) >= 2
    for line in rows:  # 12 columns; products vs CPU is a ratio (the iteration time of
        cells = [c.strip() for c in line.strip("| \n").split("|")]  # a tiny fit is noise)
        assert len(cells) == 12 and cells[10].endswith("x")
        assert cells[5].endswith("%")  # bandwidth against the device's peak


def test_gpu_benchmark_without_gpu_exits_cleanly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    with pytest.raises(SystemExit) as exc:
        _gpu_bench().main(SMOKE)
    assert "needs CuPy and a CUDA GPU" in str(exc.value.code)
    assert "--cpu-only" in str(exc.value.code)
    _gpu_bench().main(SMOKE + ["--cpu-only"])
    assert "| CPU" in capsys.readouterr().out


def test_expander_cupy_input_gives_cupy_output(cp):
    from sknpeff import ComponentExpander

    X, _, _ = make_planted_diagonal(n_examples=120, n_params=800, n_components=4,
                                    support_size=80, random_state=1)
    base = DiagonalNPEFF(n_components=2, random_state=0, max_iter=10, tol=0).fit(X)
    exp = ComponentExpander(base, n_new_components=2)
    W = exp.fit_transform(_to_cupy_csr(cp, X))
    assert _on_device(cp, W, 0) and W.shape == (120, 4)
    assert _on_device(cp, exp.transform(_to_cupy_csr(cp, X)), 0)
    assert _is_numpy(exp.components_)
    assert _is_numpy(ComponentExpander(base, n_new_components=2).fit_transform(X))


def test_lowrank_dense_signed_input_equals_cpu(cp):
    """Projected PEFs are dense and signed: the dense column blocks on the devices give
    the CPU fit."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((4, 300))
    coef = rng.random((120 * 3, 4)) * (rng.random((120 * 3, 4)) < 0.4)
    X = (coef @ G + 0.01 * rng.standard_normal((360, 300))).reshape(120, 3 * 300)
    kw = dict(n_components=4, n_classes=3, random_state=0, max_iter=30, tol=0,
              block_size=64)
    ref = LowRankNPEFF(**kw, backend=NumpyBackend())
    W_ref = ref.fit_transform(X)
    est = LowRankNPEFF(**kw, backend="cupy", devices=[0])
    W = est.fit_transform(X)
    np.testing.assert_allclose(np.asarray(W), W_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est.components_, ref.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est.loss(X), ref.loss(X), rtol=1e-6)
