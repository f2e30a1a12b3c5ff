"""Tests for sknpeff.decomposition.DiagonalNPEFF (D-NPEFF) and its update rules."""

import pickle
import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning, NotFittedError

import sknpeff.decomposition._diagonal as diag_mod
import sknpeff.decomposition._updates as upd
from sknpeff.backends import NumpyBackend
from sknpeff.datasets import make_planted_diagonal
from sknpeff.decomposition import DiagonalNPEFF
from tests._helpers import check_checkpoint_resume

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _planted(seed=0, n=400, m=2000, r=8, support=200, dtype=np.float32):
    return make_planted_diagonal(n_examples=n, n_params=m, n_components=r,
                                 support_size=support, random_state=seed, dtype=dtype)


def _noisy(seed=0, n=400, m=2000, r=8, dtype=np.float64):
    """Planted data plus sparse non-negative noise: the best loss is clearly above 0."""
    X, W, H = _planted(seed, n, m, r, dtype=dtype)
    rng = np.random.default_rng(seed)
    N = sp.random(n, m, density=0.02, random_state=seed,
                  data_rvs=lambda k: rng.uniform(0, 0.05, k))
    return sp.csr_matrix(X + N, dtype=dtype)


def _matched_cos(H_est, H_true):
    A = H_est / np.maximum(np.linalg.norm(H_est, axis=1, keepdims=True), 1e-30)
    B = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    C = np.abs(A @ B.T)
    rows, cols = linear_sum_assignment(-C)
    return C[rows, cols]


def _dense_loss(X, W, H):
    D = X.toarray().astype(np.float64) - W.astype(np.float64) @ H.astype(np.float64)
    return float(np.sum(D * D))


# ---------------------------------------------------------------------- recovery
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_planted_recovery_default_settings(seed):
    X, _, H = _planted(seed)
    est = DiagonalNPEFF(n_components=H.shape[0], random_state=seed)
    W = est.fit_transform(X)
    assert _matched_cos(est.components_, H).min() >= 0.98
    assert est.n_iter_ < 60  # HALS converges in tens of iterations
    assert W.min() >= 0 and est.components_.min() >= 0
    assert est.reconstruction_err_ < 0.05 * np.sqrt(X.multiply(X).sum())


@pytest.mark.parametrize("init", ["random", "nndsvd", "nndsvda"])
def test_planted_recovery_other_inits(init):
    X, _, H = _planted(1)
    est = DiagonalNPEFF(n_components=H.shape[0], init=init, random_state=0).fit(X)
    assert _matched_cos(est.components_, H).min() >= 0.98


def test_planted_recovery_mu():
    X, _, H = _planted(2)
    est = DiagonalNPEFF(n_components=H.shape[0], solver="mu", max_iter=300,
                        random_state=0).fit(X)
    assert _matched_cos(est.components_, H).min() >= 0.98
    # HALS reaches a lower loss in fewer iterations than multiplicative updates
    cd = DiagonalNPEFF(n_components=H.shape[0], random_state=0, max_iter=20, tol=0).fit(X)
    mu = DiagonalNPEFF(n_components=H.shape[0], solver="mu", random_state=0, max_iter=20,
                       tol=0).fit(X)
    assert cd.loss_curve_[-1] < 0.1 * mu.loss_curve_[-1]


# -------------------------------------------------------------------------- loss
@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_reconstruction_err_matches_dense_formula(solver):
    X = _noisy(0)
    est = DiagonalNPEFF(n_components=6, solver=solver, max_iter=15, tol=0, random_state=0)
    W = est.fit_transform(X)
    dense = _dense_loss(X, W, est.components_)
    assert est.reconstruction_err_ ** 2 == pytest.approx(dense, rel=1e-9, abs=1e-9)
    curve = np.asarray(est.loss_curve_)
    assert len(curve) == est.n_iter_ == 15
    assert np.all(np.diff(curve) <= 1e-9 * curve[0])  # both solvers are monotone


def test_reconstruction_err_includes_pruned_columns():
    X = _noisy(1)
    est = DiagonalNPEFF(n_components=6, min_nnz_per_column=12, random_state=0)
    W = est.fit_transform(X)
    counts = np.diff(X.tocsc().indptr)
    np.testing.assert_array_equal(est.kept_columns_, np.flatnonzero(counts >= 12))
    assert 0 < len(est.kept_columns_) < X.shape[1]
    pruned = np.setdiff1d(np.arange(X.shape[1]), est.kept_columns_)
    assert np.all(est.components_[:, pruned] == 0)
    assert est.reconstruction_err_ ** 2 == pytest.approx(
        _dense_loss(X, W, est.components_), rel=1e-9)


def test_diag_loss_formula():
    rng = np.random.default_rng(0)
    X = sp.random(30, 50, density=0.3, random_state=0, format="csr")
    W, Ft = rng.random((30, 4)), rng.random((50, 4))
    got = upd.diag_loss(np, float(X.multiply(X).sum()), W, X @ Ft, W.T @ W, Ft.T @ Ft)
    assert got == pytest.approx(_dense_loss(X, W, Ft.T), rel=1e-12)


@pytest.mark.parametrize("update", [upd.diag_hals_update, upd.diag_mu_update])
def test_row_updates_decrease_quadratic(update):
    # min 1/2 tr(F G F^T) - tr(F^T T), F >= 0
    rng = np.random.default_rng(1)
    B = rng.random((20, 5))
    G, T = B.T @ B, rng.random((40, 5))
    F = rng.random((40, 5))

    def obj(F):
        return 0.5 * np.sum((F @ G) * F) - np.sum(F * T)

    prev = obj(F)
    for _ in range(5):
        update(np, F, T, G)
        assert F.min() >= 0 and obj(F) <= prev + 1e-12
        prev = obj(F)


def test_hals_update_matches_coordinate_formula():
    rng = np.random.default_rng(2)
    B = rng.random((20, 4))
    G, T = B.T @ B, rng.random((7, 4)) - 0.3
    G[2, :] = G[:, 2] = 0  # a dead component is left alone
    F = rng.random((7, 4))
    ref = F.copy()
    for k in range(4):
        if G[k, k] > 0:
            ref[:, k] = np.maximum(0, ref[:, k] + (T[:, k] - ref @ G[:, k]) / G[k, k])
    upd.diag_hals_update(np, F, T, G)
    np.testing.assert_allclose(F, ref, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------- transform
def test_transform_consistent_with_fit_transform():
    X = _noisy(2, dtype=np.float32)
    est = DiagonalNPEFF(n_components=8, random_state=0)
    W = est.fit_transform(X)
    np.testing.assert_allclose(est.transform(X), W, rtol=1e-3, atol=1e-5)


def test_transform_heldout_recovers_planted_coefficients():
    X, W_true, H = _planted(3, n=600)
    est = DiagonalNPEFF(n_components=8, random_state=0).fit(X[:400])
    W = est.transform(X[400:])
    # match components, then compare coefficients up to the per-component scale
    A = est.components_ / np.linalg.norm(est.components_, axis=1, keepdims=True)
    Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    rows, cols = linear_sum_assignment(-np.abs(A @ Hn.T))
    scale = np.linalg.norm(est.components_, axis=1)[rows] / np.linalg.norm(H, axis=1)[cols]
    np.testing.assert_allclose(W[:, rows] * scale, W_true[400:, cols], atol=2e-3)


def test_transform_uses_one_sparse_product(monkeypatch):
    X = _noisy(0)
    est = DiagonalNPEFF(n_components=6, random_state=0, max_iter=50).fit(X)
    calls = []
    orig = NumpyBackend.spmm

    def counting(self, *args, **kwargs):
        calls.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(NumpyBackend, "spmm", counting)
    est.transform(X)
    assert len(calls) == 1  # X @ H.T once; the W steps use only small dense products


def test_inverse_transform():
    X = _noisy(0)
    est = DiagonalNPEFF(n_components=6, random_state=0)
    W = est.fit_transform(X)
    np.testing.assert_allclose(est.inverse_transform(W), W @ est.components_)
    with pytest.raises(ValueError, match="shape"):
        est.inverse_transform(W[:, :3])


def test_feature_names_out():
    X = _noisy(0)
    est = DiagonalNPEFF(n_components=3, random_state=0, max_iter=5).fit(X)
    assert list(est.get_feature_names_out()) == [f"diagonalnpeff{i}" for i in range(3)]


# -------------------------------------------------------------------- partitions
@pytest.mark.parametrize("solver", ["cd", "mu"])
@pytest.mark.parametrize("init", ["auto", "random"])
def test_partitions_give_same_fit(solver, init):
    X = _noisy(4)
    kw = dict(n_components=6, solver=solver, init=init, random_state=0, max_iter=20,
              block_size=512)
    one = DiagonalNPEFF(**kw)
    W1 = one.fit_transform(X)
    three = DiagonalNPEFF(backend=NumpyBackend(n_partitions=3), **kw)
    W3 = three.fit_transform(X)
    np.testing.assert_allclose(three.components_, one.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(W3, W1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(three.loss_curve_, one.loss_curve_, rtol=1e-5)
    # transform on partitions goes through the column blocks of the kept columns
    np.testing.assert_allclose(three.transform(X), one.transform(X), rtol=1e-5, atol=1e-7)


def test_block_size_does_not_change_fit():
    X = _noisy(5, n=200, m=1000)
    a = DiagonalNPEFF(n_components=5, random_state=0, max_iter=10, block_size=97).fit(X)
    b = DiagonalNPEFF(n_components=5, random_state=0, max_iter=10).fit(X)
    np.testing.assert_allclose(a.components_, b.components_, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------- partial_fit
@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_partial_fit_streaming_close_to_full_fit(solver):
    X = _noisy(6)
    r = 8
    kw = dict(n_components=r, solver=solver, random_state=0)
    full = DiagonalNPEFF(max_iter=500 if solver == "mu" else 200, **kw)
    W_full = full.fit_transform(X)
    loss_full = _dense_loss(X, W_full, full.components_)
    est = DiagonalNPEFF(**kw)
    rng = np.random.default_rng(0)
    for _ in range(4):  # epochs over mini-batches of 80 examples
        perm = rng.permutation(X.shape[0])
        for s in range(0, X.shape[0], 80):
            est.partial_fit(X[perm[s:s + 80]])
    assert est.n_steps_ == 4 * 5 and len(est.loss_curve_) == est.n_steps_
    loss_stream = _dense_loss(X, est.transform(X), est.components_)
    assert loss_stream <= 1.05 * loss_full
    assert est.components_.shape == (r, X.shape[1]) and est.components_.min() >= 0


def test_partial_fit_after_fit_continues():
    X = _noisy(7)
    est = DiagonalNPEFF(n_components=6, random_state=0).fit(X)
    before = _dense_loss(X, est.transform(X), est.components_)
    for s in range(0, X.shape[0], 100):
        est.partial_fit(X[s:s + 100])
    after = _dense_loss(X, est.transform(X), est.components_)
    assert after <= 1.05 * before
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(X[:10, :-1])


# ---------------------------------------------------------- determinism, pickling
def test_deterministic_under_random_state():
    X = _noisy(8)
    a = DiagonalNPEFF(n_components=5, random_state=42, init="random", max_iter=20).fit(X)
    b = DiagonalNPEFF(n_components=5, random_state=42, init="random", max_iter=20).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    c = DiagonalNPEFF(n_components=5, random_state=43, init="random", max_iter=20).fit(X)
    assert not np.array_equal(a.components_, c.components_)
    d = DiagonalNPEFF(n_components=5, random_state=np.random.RandomState(42), init="random",
                      max_iter=20).fit(X)
    np.testing.assert_array_equal(a.components_, d.components_)


def test_pickle_and_joblib_round_trip(tmp_path):
    X = _noisy(9)
    est = DiagonalNPEFF(n_components=5, random_state=0).fit(X)
    W = est.transform(X)
    est2 = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(est2.transform(X), W)
    joblib.dump(est, tmp_path / "est.joblib")
    est3 = joblib.load(tmp_path / "est.joblib")
    np.testing.assert_array_equal(est3.transform(X), W)
    np.testing.assert_array_equal(est3.kept_columns_, est.kept_columns_)


# ------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(dtype):
    X = _noisy(0, dtype=dtype)
    est = DiagonalNPEFF(n_components=4, random_state=0, max_iter=10)
    W = est.fit_transform(X)
    assert W.dtype == dtype and est.components_.dtype == dtype
    assert est.transform(X).dtype == dtype
    other = np.float64 if dtype == np.float32 else np.float32
    assert est.transform(X.astype(other)).dtype == other


def test_int_input_is_converted():
    X = sp.csr_matrix(np.random.default_rng(0).integers(0, 3, size=(30, 40)))
    W = DiagonalNPEFF(n_components=3, random_state=0, max_iter=10).fit_transform(X)
    assert W.dtype in (np.float32, np.float64) and np.all(np.isfinite(W))


# -------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_empty_rows_get_zero_coefficients(solver):
    X = _noisy(1).tolil()
    X[[0, 5, 17], :] = 0
    X = X.tocsr()
    est = DiagonalNPEFF(n_components=5, solver=solver, random_state=0, max_iter=30)
    W = est.fit_transform(X)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(est.components_))
    assert np.all(W[[0, 5, 17]] == 0)
    Wt = est.transform(sp.csr_matrix((3, X.shape[1])))
    assert np.all(Wt == 0)


def test_all_zero_input():
    X = sp.csr_matrix((20, 30))
    for init in ("auto", "random"):
        est = DiagonalNPEFF(n_components=3, init=init, random_state=0, max_iter=5)
        W = est.fit_transform(X)
        assert np.all(W == 0) and np.all(np.isfinite(est.components_))
        assert est.reconstruction_err_ == 0


def test_more_components_than_rank():
    X = _noisy(0)[:6, :]
    est = DiagonalNPEFF(n_components=10, random_state=0, max_iter=20)
    W = est.fit_transform(X)
    assert W.shape == (6, 10) and np.all(np.isfinite(W))
    assert est.reconstruction_err_ ** 2 == pytest.approx(_dense_loss(X, W, est.components_),
                                                          rel=1e-9, abs=1e-12)


def test_max_iter_zero():
    X = _noisy(0)
    est = DiagonalNPEFF(n_components=4, random_state=0, max_iter=0)
    W = est.fit_transform(X)
    assert est.n_iter_ == 0 and est.loss_curve_ == []
    assert est.reconstruction_err_ ** 2 == pytest.approx(_dense_loss(X, W, est.components_),
                                                          rel=1e-9)


def test_convergence_warning_and_early_stop():
    X = _noisy(0)
    with pytest.warns(ConvergenceWarning):
        DiagonalNPEFF(n_components=4, random_state=0, max_iter=3).fit(X)
    est = DiagonalNPEFF(n_components=4, random_state=0, tol=1e-3, max_iter=500).fit(X)
    assert est.n_iter_ < 500


def test_verbose_prints(capsys):
    DiagonalNPEFF(n_components=3, random_state=0, max_iter=12, verbose=1).fit(_noisy(0))
    out = capsys.readouterr().out
    assert "DiagonalNPEFF" in out and "loss" in out


def test_keyboard_interrupt_keeps_consistent_state(monkeypatch):
    X = _noisy(3)
    calls = {"n": 0}
    hals = upd.DIAG_UPDATES["cd"]

    def interrupting(xp, F, T, G, **kw):
        calls["n"] += 1
        if calls["n"] == 40:  # in the middle of the third iteration's block sweep
            raise KeyboardInterrupt
        hals(xp, F, T, G, **kw)

    monkeypatch.setitem(upd.DIAG_UPDATES, "cd", interrupting)
    est = DiagonalNPEFF(n_components=5, random_state=0, block_size=128, max_iter=100)
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="interrupted"):
        est.fit_transform(X)
    monkeypatch.setitem(upd.DIAG_UPDATES, "cd", hals)
    assert 0 < est.n_iter_ < 100 and len(est.loss_curve_) == est.n_iter_
    W = est.transform(X)  # as the interrupted fit solved them, up to rounding
    assert est.reconstruction_err_ ** 2 == pytest.approx(_dense_loss(X, W, est.components_),
                                                          rel=1e-7)


# ------------------------------------------------------------------- bad inputs
def test_negative_values_rejected():
    X = _noisy(0).tolil()
    X[3, 4] = -1.0
    with pytest.raises(ValueError, match=r"X must be non-negative"):
        DiagonalNPEFF(n_components=3).fit(X.tocsr())
    est = DiagonalNPEFF(n_components=3, max_iter=5, random_state=0).fit(_noisy(0))
    with pytest.raises(ValueError, match=r"X must be non-negative"):
        est.transform(X.tocsr())
    with pytest.raises(ValueError, match=r"X must be non-negative"):
        est.partial_fit(X.tocsr())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_rejected(bad):
    X = _noisy(0).toarray()
    X[1, 2] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        DiagonalNPEFF(n_components=3).fit(X)
    with pytest.raises(ValueError, match="NaN|infinity"):
        DiagonalNPEFF(n_components=3).fit(sp.csr_matrix(X))


def test_wrong_n_features_in_transform():
    X = _noisy(0)
    est = DiagonalNPEFF(n_components=3, max_iter=5, random_state=0).fit(X)
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :-1])


def test_not_fitted():
    with pytest.raises(NotFittedError):
        DiagonalNPEFF().transform(_noisy(0))


@pytest.mark.parametrize("params, match", [
    (dict(n_components=0), "n_components"),
    (dict(solver="als"), "solver"),
    (dict(init="nndsvdar"), "init"),
    (dict(max_iter=-1), "max_iter"),
    (dict(tol=-1.0), "tol"),
    (dict(min_nnz_per_column=0), "min_nnz_per_column"),
    (dict(block_size=0), "block_size"),
    (dict(block_size="big"), "block_size"),
    (dict(backend="tpu"), "backend"),
])
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        DiagonalNPEFF(**params).fit(_noisy(0))


def test_dense_csr_csc_coo_give_same_fit():
    X = _noisy(0)
    kw = dict(n_components=4, random_state=0, max_iter=15)
    ref = DiagonalNPEFF(**kw).fit(X).components_
    for Xf in (X.toarray(), X.tocsc(), X.tocoo()):
        np.testing.assert_allclose(DiagonalNPEFF(**kw).fit(Xf).components_, ref,
                                   rtol=1e-10, atol=1e-12)


def test_input_not_modified():
    X = _noisy(0, dtype=np.float32)
    X.indices = X.indices.astype(np.int64)
    X.indptr = X.indptr.astype(np.int64)
    assert X.indices.dtype == np.int64
    inputs = [X, X.tocsc(), X.toarray()]
    snapshots = [(x.data.copy(), x.indices.copy(), x.indptr.copy()) if sp.issparse(x)
                 else x.copy() for x in inputs]
    est = DiagonalNPEFF(n_components=4, random_state=0, max_iter=10, min_nnz_per_column=2)
    for x in inputs:
        est.fit(x)
        est.transform(x)
        est.partial_fit(x)
    for x, snap in zip(inputs, snapshots):
        if sp.issparse(x):
            np.testing.assert_array_equal(x.data, snap[0])
            np.testing.assert_array_equal(x.indices, snap[1])
            np.testing.assert_array_equal(x.indptr, snap[2])
        else:
            np.testing.assert_array_equal(x, snap)


def test_int64_indices_same_as_int32():
    X = _noisy(0, dtype=np.float32)
    X64 = X.copy()
    X64.indices, X64.indptr = X.indices.astype(np.int64), X.indptr.astype(np.int64)
    assert X64.indices.dtype == np.int64
    kw = dict(n_components=4, random_state=0, max_iter=15)
    a = DiagonalNPEFF(**kw)
    Wa = a.fit_transform(X)
    b = DiagonalNPEFF(**kw)
    Wb = b.fit_transform(X64)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(Wa, Wb)
    np.testing.assert_array_equal(a.transform(X64), a.transform(X))


def test_unsorted_indices():
    X = _noisy(0)
    Xu = X.copy()
    for i in range(Xu.shape[0]):  # reverse every row's entries
        s, e = Xu.indptr[i], Xu.indptr[i + 1]
        Xu.indices[s:e] = Xu.indices[s:e][::-1].copy()
        Xu.data[s:e] = Xu.data[s:e][::-1].copy()
    Xu.has_sorted_indices = False
    kw = dict(n_components=4, random_state=0, max_iter=15)
    a, b = DiagonalNPEFF(**kw).fit(X), DiagonalNPEFF(**kw).fit(Xu)
    np.testing.assert_allclose(a.components_, b.components_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.transform(Xu), a.transform(X), rtol=1e-10, atol=1e-12)


def test_sklearn_pipeline_and_clone():
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler

    X = _noisy(0)
    est = DiagonalNPEFF(n_components=4, random_state=0, max_iter=10)
    assert clone(est).get_params() == est.get_params()
    W = make_pipeline(MaxAbsScaler(), est).fit_transform(X)
    assert W.shape == (X.shape[0], 4)


def test_module_constants_sane():
    assert diag_mod._PARTIAL_W_ITER >= 10 and diag_mod._FORGET_POWER > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean fit raises no warning
        DiagonalNPEFF(n_components=4, random_state=0).fit(_planted(0)[0])


@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_fit_with_frozen_components_keeps_them_bit_for_bit(solver):
    from sknpeff.datasets import make_planted_diagonal

    X, _, H = make_planted_diagonal(n_examples=300, n_params=800, n_components=6,
                                    support_size=100, random_state=0)
    base = DiagonalNPEFF(n_components=3, solver=solver, random_state=0).fit(X)
    est = DiagonalNPEFF(n_components=6, solver=solver, random_state=1, max_iter=100)
    W = est.fit_transform(X, frozen_components=base.components_)
    np.testing.assert_array_equal(est.components_[:3], base.components_)
    assert W.shape == (300, 6) and (W >= 0).all()
    # the free components take what the frozen ones miss
    assert est.reconstruction_err_ < 0.75 * base.reconstruction_err_
    with pytest.raises(ValueError, match="r0"):
        DiagonalNPEFF(n_components=3).fit(X, frozen_components=base.components_)
    with pytest.raises(ValueError, match="non-negative"):
        DiagonalNPEFF(n_components=6).fit(X, frozen_components=-base.components_)


def test_nndsvd_in_place_factor_equals_allocated(monkeypatch):
    """NNDSVD writes the factor into X.T @ Q's buffer on CPU; the result must equal the
    path that allocates a new array (taken when that buffer is not C-ordered)."""
    from sklearn.utils import check_random_state

    from sknpeff.backends import ColumnBlocks
    from sknpeff.datasets import make_planted_diagonal
    from sknpeff.decomposition._init import nndsvd

    X, _, _ = make_planted_diagonal(n_examples=200, n_params=900, n_components=6,
                                    support_size=120, random_state=3)
    est = DiagonalNPEFF(n_components=6, random_state=0, block_size=128)
    est._check_params()
    Xv = est._validate(X, reset=True, whom="fit")
    prob = est._prepare(Xv, fitting=True)
    W1, F1 = nndsvd(prob, 6, check_random_state(0))
    real = ColumnBlocks.rmatmul
    monkeypatch.setattr(ColumnBlocks, "rmatmul",
                        lambda self, R: [np.asfortranarray(p) for p in real(self, R)])
    W2, F2 = nndsvd(prob, 6, check_random_state(0))
    np.testing.assert_array_equal(W1, W2)
    for a, b in zip(F1, F2, strict=True):
        assert a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)


def test_checkpoint_resume_matches_uninterrupted_fit(tmp_path, monkeypatch):
    from sknpeff.datasets import make_planted_diagonal

    X, _, _ = make_planted_diagonal(n_examples=150, n_params=600, n_components=5,
                                    support_size=80, random_state=0, dtype=np.float64)
    X2, _, _ = make_planted_diagonal(n_examples=150, n_params=600, n_components=5,
                                     support_size=80, random_state=1, dtype=np.float64)
    ckpt = tmp_path / "fit.npz"
    kw = dict(n_components=5, random_state=0, tol=0)
    resumed, straight = check_checkpoint_resume(DiagonalNPEFF, X, X2, ckpt, kw, n_curve=30)
    np.testing.assert_allclose(resumed.components_, straight.components_, rtol=1e-6,
                               atol=1e-12)
    # Ctrl-C saves the state reached, and says so
    import sknpeff.decomposition._solvers as dmod  # where the iteration computes the loss

    real, calls = dmod.diag_loss, {"n": 0}

    def interrupt_on_7th(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dmod, "diag_loss", interrupt_on_7th)
    ckpt2 = tmp_path / "interrupted.npz"
    with pytest.raises(KeyboardInterrupt), pytest.warns(
            RuntimeWarning, match="interrupted after 6 iterations.*checkpoint"):
        DiagonalNPEFF(max_iter=30, checkpoint_path=ckpt2, **kw).fit(X)
    with np.load(ckpt2) as f:
        assert int(f["n_iter"]) == 6
    # a checkpoint of an older format (its fingerprint lacks the format number) is
    # refused, not resumed with monitored values of another meaning
    with np.load(ckpt2) as f:
        old = {k: f[k] for k in f.files}
    old["fingerprint"] = old["fingerprint"][:-1]
    np.savez(ckpt2, **old)
    with pytest.raises(ValueError, match="another sknpeff version"):
        DiagonalNPEFF(max_iter=30, checkpoint_path=ckpt2, **kw).fit(X)


# ------------------------------------------------------- one contract for both estimators
def test_loss_and_score_match_dense_formula():
    X = _noisy(1)
    est = DiagonalNPEFF(n_components=6, min_nnz_per_column=12, random_state=0, max_iter=20)
    W = est.fit_transform(X)
    assert 0 < len(est.kept_columns_) < X.shape[1]
    dense = _dense_loss(X, W, est.components_)  # pruned columns included
    assert est.loss(X, W) == pytest.approx(dense, rel=1e-9)
    assert est.reconstruction_err_ ** 2 == pytest.approx(est.loss(X, W), rel=1e-9)
    Wt = est.transform(X[:50])
    assert est.loss(X[:50]) == pytest.approx(_dense_loss(X[:50], Wt, est.components_),
                                             rel=1e-9)
    assert est.score(X[:50]) == -est.loss(X[:50])
    with pytest.raises(ValueError, match="W must have shape"):
        est.loss(X, W[:, :2])
    with pytest.raises(NotFittedError):
        DiagonalNPEFF().loss(X)
    assert len(est.loss_curve_) == est.n_iter_ == 20


def test_transform_reads_components():
    X = _noisy(2)
    est = DiagonalNPEFF(n_components=5, random_state=0, max_iter=30)
    W = est.fit(X).transform(X)
    assert (W[:, 2] > 0).any()
    est.components_[2] = 0.0  # components_ is the only copy: transform follows it
    W2 = est.transform(X)
    assert (W2[:, 2] == 0).all() and not np.allclose(W2, W)
    # on partitions too (the blocked path splits components_ at each call)
    est3 = DiagonalNPEFF(n_components=5, random_state=0, max_iter=30, block_size=256,
                         backend=NumpyBackend(n_partitions=3)).fit(X)
    est3.components_[2] = 0.0
    assert (est3.transform(X)[:, 2] == 0).all()


def test_transform_max_iter():
    X = _noisy(3)
    kw = dict(n_components=5, random_state=0, max_iter=40, tol=0)
    a = DiagonalNPEFF(**kw).fit(X)  # None: max_iter coefficient steps
    b = DiagonalNPEFF(transform_max_iter=40, **kw).fit(X)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    c = DiagonalNPEFF(transform_max_iter=1, **kw).fit(X)
    np.testing.assert_array_equal(c.components_, a.components_)  # the fit is the same
    assert not np.allclose(c.transform(X), a.transform(X))
    with pytest.raises(ValueError, match="transform_max_iter"):
        DiagonalNPEFF(transform_max_iter=-1).fit(X)


def test_frozen_components_is_a_fit_parameter():
    X, _, _ = make_planted_diagonal(n_examples=200, n_params=600, n_components=5,
                                    support_size=80, random_state=0)
    base = DiagonalNPEFF(n_components=2, random_state=0, max_iter=30).fit(X)
    est = DiagonalNPEFF(n_components=5, random_state=0, max_iter=30)
    assert est.fit(X, frozen_components=base.components_) is est
    np.testing.assert_array_equal(est.components_[:2], base.components_)
    with pytest.raises(ValueError, match="frozen_components must have shape"):
        est.fit(X, frozen_components=base.components_[:, :10])
    with pytest.raises(ValueError, match="finite"):
        est.fit(X, frozen_components=np.full_like(base.components_, np.nan))


# ------------------------------------------------- as scikit-learn's NMF at the same tol
def _rel_residual(X, W, H):
    D = X.toarray().astype(np.float64)
    return float(np.linalg.norm(D - W.astype(np.float64) @ H.astype(np.float64))
                 / np.linalg.norm(D))


def _exact_random(seed, n=200, m=300, r=5, sparse=False):
    """Random non-negative data of exact rank r (dense or sparse factors)."""
    rng = np.random.default_rng(seed)
    W, H = rng.random((n, r)), rng.random((r, m))
    if sparse:
        W *= rng.random((n, r)) < 0.3
        H *= rng.random((r, m)) < 0.2
    return sp.csr_matrix(W @ H), r


@pytest.mark.parametrize("data, solver", [("planted", "cd"), ("planted", "mu"),
                                          ("random", "cd"), ("sparse", "cd"),
                                          ("sparse", "mu")])
def test_default_tol_residual_at_most_sklearn_nmf(data, solver):
    """At the same tol, the fit ends at a residual no larger than scikit-learn's NMF
    with the same solver and init (up to a 10% margin): tol buys at least as much."""
    from sklearn.decomposition import NMF

    if data == "planted":
        X, _, H = _planted(0, n=300, m=1500, r=6, support=150, dtype=np.float64)
        X, r = sp.csr_matrix(X), 6
    else:
        X, r = _exact_random(0, sparse=data == "sparse")
    ours = DiagonalNPEFF(n_components=r, solver=solver, random_state=0, max_iter=3000)
    W = ours.fit_transform(X)
    nmf = NMF(n_components=r, solver=solver, init="nndsvda", random_state=0, max_iter=3000)
    W_sk = nmf.fit_transform(X)
    assert ours.tol == nmf.tol == 1e-4 and ours.stop_reason_ == "tol"
    mine = _rel_residual(X, W, ours.components_)
    theirs = _rel_residual(X, W_sk, nmf.components_)
    assert mine <= 1.1 * theirs + 1e-6, (mine, theirs, ours.n_iter_, nmf.n_iter_)


@pytest.mark.parametrize("data", ["planted", "noisy"])
def test_partial_fit_epochs_within_two_percent_of_full_fit(data):
    """Ten passes of partial_fit over five mini-batches end within 2% of a full fit's
    error (MiniBatchNMF's use: several epochs over the batches)."""
    X = _planted(3, n=300, m=1500, r=6, support=150, dtype=np.float64)[0] \
        if data == "planted" else _noisy(3, n=300, m=1500, r=6)
    X = sp.csr_matrix(X)
    kw = dict(n_components=6, random_state=0)
    full = DiagonalNPEFF(max_iter=1000, **kw)
    err_full = _rel_residual(X, full.fit_transform(X), full.components_)
    est = DiagonalNPEFF(**kw)
    rng = np.random.default_rng(0)
    for _ in range(10):
        perm = rng.permutation(X.shape[0])
        for s in range(0, X.shape[0], 60):
            est.partial_fit(X[perm[s:s + 60]])
    err_stream = _rel_residual(X, est.transform(X), est.components_)
    if data == "planted":  # exact data: both near zero
        assert err_full < 1e-4 and err_stream < 1e-4
    else:
        assert err_stream <= 1.02 * err_full, (err_stream, err_full)


def test_hals_violation_is_the_projected_gradient_sum():
    """The violation HALS reports is scikit-learn cd's: per coordinate, just before its
    update, |gradient|, or only its negative part where the entry is zero."""
    rng = np.random.default_rng(3)
    F = rng.random((30, 4))
    F[rng.random(F.shape) < 0.3] = 0.0
    M = rng.random((10, 4))
    G, T = M.T @ M, rng.random((30, 4))
    ref, Fr = 0.0, F.copy()
    for k in range(4):
        for i in range(30):
            grad = Fr[i] @ G[:, k] - T[i, k]
            ref += abs(min(0.0, grad) if Fr[i, k] == 0 else grad)
            Fr[i, k] = max(Fr[i, k] - grad / G[k, k], 0.0)
    out = []
    upd.diag_hals_update(np, F, T, G, violation=out)
    assert len(out) == 1 and float(out[0]) == pytest.approx(ref, rel=1e-10)
    np.testing.assert_allclose(F, Fr, rtol=1e-12, atol=1e-14)


def test_cd_stops_where_sklearn_cd_rule_says(tmp_path):
    """solver='cd' stops at the first iteration whose violation (the loop's monitored
    series, saved in checkpoints) is at most tol times the first one's."""
    X, _, _ = _planted(0, n=300, m=1500, r=6, support=150, dtype=np.float64)
    ckpt = tmp_path / "c.npz"
    est = DiagonalNPEFF(n_components=6, random_state=0, tol=1e-3, checkpoint_path=ckpt,
                        checkpoint_every=1).fit(X)
    with np.load(ckpt) as f:
        v = f["monitored"]
    assert est.stop_reason_ == "tol" and v.size == est.n_iter_ > 1
    assert v[-1] <= 1e-3 * v[0] and np.all(v[:-1] > 1e-3 * v[0])
    # the violation is the projected gradient, not the loss
    assert not np.allclose(v, est.loss_curve_)
