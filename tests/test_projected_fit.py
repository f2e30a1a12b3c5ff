"""LowRankNPEFF on projected (dense, signed) PEFs: dense products equal the CSR path,
the fitted projection is recorded and enforced, and the components of planted sparse
PEFs come back in parameter space through the projection."""

import math
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sknpeff.backends import ColumnBlocks, NumpyBackend
from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.layout import ParameterLayout
from sknpeff.pef import Projection, recover_components
from sknpeff.utils import tag_pef_matrix
from tests import _fake_cupy
from tests._helpers import matched_cos

# three fake "layers" of 3000 parameters in all
LAYOUT = ParameterLayout(["a.weight", "a.bias", "b.weight"], [(40, 50), (40,), (24, 40)])


def _dense_pefs(n=120, c=3, m=200, seed=0):
    """Signed dense rows with a zero column and some all-zero (empty) class slots."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, c * m))
    X[:, [5, m + 5, 2 * m + 5]] = 0.0  # parameter 5 is zero everywhere: pruned
    X[::7, m:2 * m] = 0.0  # empty middle slot: compacted away as in CSR
    X[::11, :] = 0.0  # an empty example
    return X


def _project(X, R, n_slots):
    """Project every class slot of ``X`` (n, n_slots * m) by ``R``: (n, n_slots * d)."""
    n = X.shape[0]
    dense = X.toarray() if sp.issparse(X) else X
    out = R.apply(torch.from_numpy(dense.reshape(n * n_slots, -1))).numpy()
    return out.reshape(n, -1)


def test_dense_blocks_are_dense_and_match_sparse():
    A = np.random.default_rng(1).standard_normal((50, 90))
    for be, bs in ((NumpyBackend(), 16), (NumpyBackend(n_partitions=2), 32)):
        dense, csr = ColumnBlocks(A, be, block_size=bs), ColumnBlocks(sp.csr_matrix(A), be,
                                                                      block_size=bs)
        assert all(isinstance(b.A, np.ndarray) for b in dense.blocks)  # no sparse format
        F = np.random.default_rng(2).standard_normal((90, 4))
        np.testing.assert_allclose(dense.matmul(dense.split_factor(F)), A @ F, rtol=1e-12)
        R = np.random.default_rng(3).standard_normal((50, 4))
        np.testing.assert_allclose(np.concatenate(dense.rmatmul(R)), A.T @ R, rtol=1e-12)
        np.testing.assert_allclose(np.concatenate(csr.rmatmul(R)), A.T @ R, rtol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"block_size": 64},
                                {"backend": NumpyBackend(n_partitions=2), "block_size": 50}])
def test_dense_fit_equals_csr_fit(kw):
    X = _dense_pefs()
    common = dict(n_components=4, n_classes=3, random_state=0, max_iter=25, tol=0)
    a, b = LowRankNPEFF(**common, **kw), LowRankNPEFF(**common, **kw)
    Wa, Wb = a.fit_transform(X), b.fit_transform(sp.csr_matrix(X))
    np.testing.assert_array_equal(a.kept_columns_, b.kept_columns_)
    assert 5 not in a.kept_columns_ and a.kept_columns_.size == 199
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-9)
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-9)
    np.testing.assert_allclose(Wa, Wb, rtol=1e-7, atol=1e-9 * np.abs(Wb).max())
    np.testing.assert_allclose(a.transform(X), b.transform(sp.csr_matrix(X)),
                               rtol=1e-7, atol=1e-9 * np.abs(Wb).max())
    np.testing.assert_allclose(a.score(X), b.score(sp.csr_matrix(X)), rtol=1e-10)
    np.testing.assert_allclose(a.reconstruction_err_, b.reconstruction_err_, rtol=1e-10)
    assert a.projection_ is None  # an untagged matrix is not projected


def test_dense_partial_fit_equals_csr():
    X = _dense_pefs(n=160, seed=4)
    kw = dict(n_components=3, n_classes=3, random_state=0, block_size=100)
    a, b = LowRankNPEFF(**kw), LowRankNPEFF(**kw)
    for s in (slice(0, 80), slice(80, 160)):
        a.partial_fit(X[s])
        b.partial_fit(sp.csr_matrix(X[s]))
    np.testing.assert_allclose(a.components_, b.components_, atol=1e-9)
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-9)


def test_dense_fit_on_fake_devices(monkeypatch):
    """The multi-device code path (two fake CuPy devices) on dense input."""
    _fake_cupy.install(monkeypatch)
    try:
        X = _dense_pefs(n=80, m=150, seed=5)
        kw = dict(n_components=3, n_classes=3, random_state=0, max_iter=15, tol=0)
        ref = LowRankNPEFF(**kw, backend=NumpyBackend()).fit(sp.csr_matrix(X))
        est = LowRankNPEFF(**kw, backend="cupy", devices=[0, 1], block_size=None).fit(X)
        assert _fake_cupy.FakeState.cross_device_reads == []
        np.testing.assert_allclose(est.components_, ref.components_, atol=1e-9)
        np.testing.assert_allclose(est.loss_curve_, ref.loss_curve_, rtol=1e-9)
    finally:
        # the CuPy backend module imported the fake CuPy: later tests must import anew
        sys.modules.pop("sknpeff.backends._cupy", None)


def test_projection_recorded_and_enforced():
    X, _, _ = make_planted_lowrank(n_examples=40, n_params=LAYOUT.n_params, n_classes=2,
                                   n_components=3, support_size=30, n_active=(1, 2),
                                   random_state=0)
    R, R2 = (Projection.for_layout(LAYOUT, 64, seed=s) for s in (0, 1))
    P = tag_pef_matrix(_project(X, R, 2), "low_rank", 2, R.description())
    P2 = tag_pef_matrix(_project(X, R2, 2), "low_rank", 2, R2.description())
    est = LowRankNPEFF(3, n_classes=2, random_state=0, max_iter=10, tol=0).fit(P)
    assert isinstance(est.projection_, Projection)
    assert est.projection_.description() == R.description()
    assert est.transform(P).shape == (40, 3)
    with pytest.raises(ValueError, match=r"seed=1, n_components=64.*seed=0, n_components=64"):
        est.transform(P2)
    with pytest.raises(ValueError, match="projected by"):
        est.partial_fit(P2)
    # tagged, unprojected PEFs of the same width: refused
    U = tag_pef_matrix(np.asarray(P).copy(), "low_rank", 2)
    with pytest.raises(ValueError, match="unprojected PEFs"):
        est.score(U)
    # and the other way round
    plain = LowRankNPEFF(3, n_classes=2, random_state=0, max_iter=10, tol=0).fit(U)
    assert plain.projection_ is None
    with pytest.raises(ValueError, match="fitted on unprojected PEFs"):
        plain.transform(P)
    # the slot-count check still comes first
    with pytest.raises(ValueError, match="n_classes=4"):
        LowRankNPEFF(3, n_classes=4).fit(P)
    # a fitted estimator holding a projection survives pickling, still enforcing it
    import pickle

    est2 = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(est2.transform(P), est.transform(P))
    with pytest.raises(ValueError, match="projected by"):
        est2.partial_fit(P2)


def test_planted_components_recovered_through_projection():
    n, m, c, r, s = 300, LAYOUT.n_params, 2, 5, 60
    X, _, G = make_planted_lowrank(n_examples=n, n_params=m, n_classes=c, n_components=r,
                                   support_size=s, n_active=(1, 2), random_state=0)
    d = int(math.ceil(8 * s * math.log(m / s)))  # 1878: a few times s log(m / s)
    R = Projection.for_layout(LAYOUT, d, seed=0)
    P = tag_pef_matrix(_project(X, R, c).astype(np.float32), "low_rank", c,
                       R.description())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = LowRankNPEFF(r, n_classes=c, random_state=0, max_iter=300).fit(P)
    # in the projected space the fit finds R g_k
    assert matched_cos(_project(G, R, 1), est.components_).min() >= 0.99
    rec = recover_components(est, max_iter=300, n_stages=4)  # projection_ found on est
    assert rec.shape == (r, m)
    assert matched_cos(G, rec.toarray()).min() >= 0.95
