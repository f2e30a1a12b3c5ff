"""CuPy backend on GPUs: the planted-recovery and partition-equality checks of the CPU.

Skipped (with the reason) without CuPy or without a CUDA device. Run on a GPU machine:
``pytest -q -m gpu tests/test_cupy.py``.
"""

import numpy as np
import pytest
import scipy.sparse as sp

from sknpeff.backends import ColumnBlocks, NumpyBackend, get_backend
from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import LowRankNPEFF
from tests._helpers import matched_cos

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'sknpeff[cuda]')")


def _n_gpus() -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver / no device
        return 0


N_GPUS = _n_gpus()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(N_GPUS == 0, reason="CuPy is installed but no CUDA GPU is visible"),
]
two_gpus = pytest.mark.skipif(N_GPUS < 2, reason="needs at least 2 CUDA GPUs")


def test_get_backend_picks_cupy():
    from sknpeff.backends._cupy import CupyBackend

    assert isinstance(get_backend("cupy"), CupyBackend)
    assert isinstance(get_backend("auto", devices=[0]), CupyBackend)
    assert isinstance(get_backend("auto", X=cupy.zeros(3)), CupyBackend)
    with pytest.raises(ValueError, match="does not exist"):
        get_backend("cupy", devices=[N_GPUS])


@pytest.mark.parametrize("devices", [[0], pytest.param([0, 1], marks=two_gpus)])
def test_blocks_products_on_gpu(devices):
    from sknpeff.backends._cupy import CupyBackend

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


@two_gpus
@pytest.mark.parametrize("use_nccl", [True, False])
def test_allreduce_and_move_across_devices(use_nccl):
    from sknpeff.backends._cupy import CupyBackend

    be = CupyBackend(devices=[0, 1], use_nccl=use_nccl)
    x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    parts = [be.asarray(x, partition=0), be.asarray(2 * x, partition=1)]
    total = be.allreduce(parts)
    assert total.device.id == 0
    np.testing.assert_array_equal(be.to_numpy(total), 3 * x)
    moved = be.move(parts[0], 1)
    assert moved.device.id == 1
    np.testing.assert_array_equal(be.to_numpy(moved), x)


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_recovery_on_gpu(seed):
    X, _, G = make_planted_lowrank(random_state=seed)
    est = LowRankNPEFF(n_components=8, n_classes=3, random_state=seed, backend="cupy",
                       devices=[0])
    W = est.fit_transform(X)
    assert isinstance(W, np.ndarray) and (W >= 0).all()
    assert matched_cos(G, est.components_).min() >= 0.98
    assert est.reconstruction_err_ < 1e-2 * np.sqrt(X.shape[0])


def _kw():
    return dict(n_components=8, n_classes=3, random_state=2, max_iter=40, tol=0,
                block_size=256)


def test_gpu_equals_cpu():
    X, _, _ = make_planted_lowrank(n_examples=200, n_params=2000, random_state=2,
                                   dtype=np.float64)
    cpu = LowRankNPEFF(**_kw(), backend=NumpyBackend())
    gpu = LowRankNPEFF(**_kw(), backend="cupy", devices=[0])
    np.testing.assert_allclose(gpu.fit_transform(X), cpu.fit_transform(X),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpu.components_, cpu.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpu.transform(X), cpu.transform(X), rtol=1e-5, atol=1e-7)


@two_gpus
def test_two_gpus_equal_one():
    X, _, _ = make_planted_lowrank(n_examples=200, n_params=2000, random_state=2,
                                   dtype=np.float64)
    one = LowRankNPEFF(**_kw(), backend="cupy", devices=[0])
    two = LowRankNPEFF(**_kw(), backend="cupy", devices=[0, 1])
    W1, W2 = one.fit_transform(X), two.fit_transform(X)
    np.testing.assert_allclose(W2, W1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two.components_, one.components_, rtol=1e-5, atol=1e-7)
    cpu2 = LowRankNPEFF(**_kw(), backend=NumpyBackend(n_partitions=2))
    np.testing.assert_allclose(W2, cpu2.fit_transform(X), rtol=1e-5, atol=1e-7)
