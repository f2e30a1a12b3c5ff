"""LowRankNPEFF: recovery, exact formulas, streaming, partitions, validation."""

import pickle
import re
import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse as sp

from sknpeff.backends import ColumnBlocks, NumpyBackend
from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import LowRankNPEFF
from sknpeff.decomposition._updates import (
    lowrank_curvature,
    lowrank_grad_matrix,
    lowrank_loss,
    lowrank_sq_proj,
    lowrank_weighted_rows,
)
from tests._helpers import check_checkpoint_resume, matched_cos, sparse_slot_pefs


def dense_pefs(X, n_classes):
    """F_i as dense float64 matrices (tiny problems only)."""
    D = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    n, w = D.shape
    A = D.reshape(n, n_classes, w // n_classes)
    return np.einsum("ijp,ijq->ipq", A, A)


def dense_loss(F, W, G):
    rec = np.einsum("ik,kp,kq->ipq", W, G, G)
    return float(((F - rec) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_recovery_default_settings(seed):
    X, W, G = make_planted_lowrank(random_state=seed)
    est = LowRankNPEFF(n_components=8, n_classes=3, random_state=seed)
    Wf = est.fit_transform(X)
    assert matched_cos(G, est.components_).min() >= 0.98
    assert Wf.shape == (X.shape[0], 8) and (Wf >= 0).all()
    assert Wf.dtype == np.float32 and est.components_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1.0, rtol=1e-5)
    assert est.reconstruction_err_ < 1e-2 * np.sqrt(X.shape[0])


def test_loss_and_gradient_match_dense_float64_formulas():
    rng = np.random.default_rng(0)
    n, c, m, r = 7, 3, 11, 4
    X = sp.random(n, c * m, density=0.5, format="csr", random_state=1, dtype=np.float64)
    X.data -= 0.5  # signed a_ij
    F = dense_pefs(X, c)
    W = rng.uniform(size=(n, r))
    G = rng.standard_normal((r, m))
    A = sp.csr_matrix(X.toarray().reshape(n * c, m))
    blocks = ColumnBlocks(A, NumpyBackend(), block_size=4)
    parts = blocks.split_factor(G.T)
    P = blocks.matmul(parts)
    Q = blocks.gram(parts)
    N = lowrank_sq_proj(np, P, c)
    const = float(sum((Fi ** 2).sum() for Fi in F))
    assert lowrank_loss(np, const, W, N, Q) == pytest.approx(dense_loss(F, W, G), rel=1e-10)
    # analytic gradient: grad/4 = Ft B - A^T R, transposed back to (r, m)
    R = lowrank_weighted_rows(np, W, P, c)
    grad = 4 * (G.T @ lowrank_grad_matrix(np, W, Q) - A.T @ R).T
    num = np.zeros_like(G)
    h = 1e-6
    for k in range(r):
        for p in range(m):
            Gp, Gm = G.copy(), G.copy()
            Gp[k, p] += h
            Gm[k, p] -= h
            num[k, p] = (dense_loss(F, W, Gp) - dense_loss(F, W, Gm)) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-6)


def test_curvature_bound_dominates_hessian():
    """The step size's curvature bound is >= the loss's curvature along every g_k."""
    rng = np.random.default_rng(3)
    n, c, m, r = 6, 2, 9, 3
    X = sp.random(n, c * m, density=0.6, format="csr", random_state=2) - 0.3 * sp.random(
        n, c * m, density=0.6, format="csr", random_state=5)
    F = dense_pefs(X, c)
    W = rng.uniform(size=(n, r))
    G = rng.standard_normal((r, m))
    L = lowrank_curvature(np, W, G @ G.T)
    h = 1e-4
    for k in range(r):
        for _ in range(5):
            d = rng.standard_normal(m)
            d /= np.linalg.norm(d)
            Gp, Gm = G.copy(), G.copy()
            Gp[k] += h * d
            Gm[k] -= h * d
            curv = (dense_loss(F, W, Gp) - 2 * dense_loss(F, W, G) + dense_loss(F, W, Gm)) / h**2
            assert curv <= L[k] * (1 + 1e-6)


def test_fit_matches_dense_loss_and_reported_error():
    X, _, _ = make_planted_lowrank(n_examples=40, n_params=60, n_components=3,
                                   support_size=12, random_state=0, dtype=np.float64)
    est = LowRankNPEFF(n_components=3, n_classes=3, random_state=0, max_iter=30, tol=0)
    W = est.fit_transform(X)
    F = dense_pefs(X, 3)
    loss = dense_loss(F, W, est.components_)
    assert est.reconstruction_err_ ** 2 == pytest.approx(loss, rel=1e-6, abs=1e-9)
    assert len(est.loss_curve_) == est.n_iter_ == 30
    # the coefficients re-solved for the final components can only lower the objective
    assert loss <= est.loss_curve_[-1] * (1 + 1e-9)
    assert est.loss(X, W) == pytest.approx(loss, rel=1e-6, abs=1e-9)


def test_loss_decreases_monotonically_on_planted_data():
    X, _, _ = make_planted_lowrank(random_state=5, dtype=np.float64)
    est = LowRankNPEFF(n_components=8, n_classes=3, random_state=5, max_iter=150, tol=0)
    est.fit(X)
    lc = np.asarray(est.loss_curve_)
    # the adaptive step may overshoot once before halving; allow no sustained increase
    assert lc[-1] < 1e-3 * lc[0]
    assert (np.diff(lc) <= 1e-9 * lc[0]).mean() > 0.9


def test_reference_schedule_is_available_and_descends():
    X, _, _ = make_planted_lowrank(n_examples=100, n_params=300, n_components=4,
                                   support_size=30, random_state=0)
    est = LowRankNPEFF(n_components=4, n_classes=3, init="random", learning_rate=1e-3,
                       solver="mu", max_iter=50, tol=0, random_state=0)
    est.fit(X)
    assert est.loss_curve_[-1] < est.loss_curve_[0]


def test_transform_reproduces_training_coefficients():
    X, _, _ = make_planted_lowrank(random_state=1)
    est = LowRankNPEFF(n_components=8, n_classes=3, random_state=1)
    W = est.fit_transform(X)
    W2 = est.transform(X)
    np.testing.assert_allclose(W2, W, atol=1e-3 * W.max())


def test_partitions_equal_single_partition():
    X, _, _ = make_planted_lowrank(n_examples=200, n_params=2000, random_state=2)
    kw = dict(n_components=8, n_classes=3, random_state=2, max_iter=40, tol=0,
              block_size=256)
    est1 = LowRankNPEFF(**kw, backend=NumpyBackend(n_partitions=1))
    W1 = est1.fit_transform(X.astype(np.float64))
    est3 = LowRankNPEFF(**kw, backend=NumpyBackend(n_partitions=3))
    W3 = est3.fit_transform(X.astype(np.float64))
    np.testing.assert_allclose(W3, W1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est3.components_, est1.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(est3.transform(X.astype(np.float64)),
                               est1.transform(X.astype(np.float64)), rtol=1e-5, atol=1e-7)


def test_scipy_and_torch_kernels_agree():
    X, _, _ = make_planted_lowrank(n_examples=100, n_params=500, random_state=3,
                                   dtype=np.float64)
    kw = dict(n_components=8, n_classes=3, random_state=3, max_iter=20, tol=0)
    a = LowRankNPEFF(**kw, backend=NumpyBackend(use_torch=False)).fit_transform(X)
    b = LowRankNPEFF(**kw, backend=NumpyBackend(use_torch=True)).fit_transform(X)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_partial_fit_streaming_within_5_percent_of_full_fit():
    X, _, _ = make_planted_lowrank(n_examples=600, random_state=4)
    full = LowRankNPEFF(n_components=8, n_classes=3, random_state=4).fit(X)
    full_loss = full.loss(X)
    stream = LowRankNPEFF(n_components=8, n_classes=3, random_state=4)
    rng = np.random.default_rng(0)
    for _epoch in range(8):
        order = rng.permutation(X.shape[0])
        for s in range(0, X.shape[0], 100):
            stream.partial_fit(X[order[s:s + 100]])
    stream_loss = stream.loss(X)
    total = float(X.shape[0])  # sum_i ||F_i||^2 for normalized PEFs
    # within 5% of the full fit's loss, measured relative to the data's energy when the
    # full fit is (numerically) exact
    assert stream_loss <= full_loss * 1.05 + 0.05 * 1e-2 * total
    assert stream.n_steps_ == 48


def test_determinism_and_pickle(tmp_path):
    X, _, _ = make_planted_lowrank(n_examples=100, n_params=400, random_state=0)
    a = LowRankNPEFF(n_components=5, n_classes=3, random_state=7, max_iter=20)
    b = LowRankNPEFF(n_components=5, n_classes=3, random_state=7, max_iter=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Wa, Wb = a.fit_transform(X), b.fit_transform(X)
    np.testing.assert_array_equal(Wa, Wb)
    np.testing.assert_array_equal(a.components_, b.components_)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.transform(X), a.transform(X))
    joblib.dump(a, tmp_path / "est.joblib")
    d = joblib.load(tmp_path / "est.joblib")
    np.testing.assert_array_equal(d.transform(X), a.transform(X))


def test_dtypes_dense_input_and_inputs_not_modified():
    X, _, _ = make_planted_lowrank(n_examples=60, n_params=90, n_components=3,
                                   support_size=20, random_state=0)
    before = (X.data.copy(), X.indices.copy(), X.indptr.copy())
    est = LowRankNPEFF(n_components=3, n_classes=3, random_state=0, max_iter=10, tol=0)
    W32 = est.fit_transform(X)
    for arr, old in zip((X.data, X.indices, X.indptr), before, strict=True):
        np.testing.assert_array_equal(arr, old)
    assert W32.dtype == np.float32
    X64 = X.astype(np.float64)
    W64 = est.fit_transform(X64)
    assert W64.dtype == np.float64 and est.components_.dtype == np.float64
    Wd = est.fit_transform(X64.toarray())
    np.testing.assert_allclose(Wd, W64, rtol=1e-10)
    np.testing.assert_allclose(est.fit_transform(X64.tocsc()), W64, rtol=1e-10)


def test_empty_rows_get_zero_coefficients():
    X, _, _ = make_planted_lowrank(n_examples=80, n_params=200, n_components=4,
                                   support_size=30, random_state=1)
    X = X.tolil()
    X[[3, 17]] = 0
    X = X.tocsr()
    est = LowRankNPEFF(n_components=4, n_classes=3, random_state=0)
    W = est.fit_transform(X)
    assert np.isfinite(W).all()
    np.testing.assert_array_equal(W[[3, 17]], 0)
    Wt = est.transform(X)
    np.testing.assert_array_equal(Wt[[3, 17]], 0)


def test_pruned_columns_map_back_to_parameters():
    X, _, G = make_planted_lowrank(n_examples=100, n_params=500, n_components=4,
                                   support_size=20, random_state=2)
    est = LowRankNPEFF(n_components=4, n_classes=3, random_state=2).fit(X)
    support = np.flatnonzero(np.abs(G).sum(axis=0))
    np.testing.assert_array_equal(est.kept_columns_, support)
    assert est.components_.shape == (4, 500)
    assert not est.components_[:, np.setdiff1d(np.arange(500), support)].any()


def test_int32_block_boundary_uses_same_blocks():
    """Blocks are cut so each holds < max_block_nnz values (int32 on huge inputs)."""
    X, _, _ = make_planted_lowrank(n_examples=50, n_params=300, random_state=0,
                                   dtype=np.float64)
    A = sp.csr_matrix(X.toarray().reshape(150, 300))
    cap = 400
    blocks = ColumnBlocks(A, NumpyBackend(), block_size=4096, max_block_nnz=cap)
    assert len(blocks.blocks) > 1
    # a block holds at most `cap` values unless it is one column (never cut)
    assert all(b.nnz <= cap or b.stop - b.start == 1 for b in blocks.blocks)
    assert sum(b.nnz for b in blocks.blocks) == A.nnz
    G = np.random.default_rng(0).standard_normal((300, 5))
    np.testing.assert_allclose(blocks.matmul(blocks.split_factor(G)), A @ G, rtol=1e-12)
    # int64 input indices give the same result
    A64 = A.copy()
    A64.indices = A64.indices.astype(np.int64)
    A64.indptr = A64.indptr.astype(np.int64)
    b64 = ColumnBlocks(A64, NumpyBackend(), max_block_nnz=cap)
    np.testing.assert_allclose(b64.matmul(b64.split_factor(G)), A @ G, rtol=1e-12)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(n_components=0), "n_components"),
        (dict(n_classes=0), "n_classes"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate="fast"), "learning_rate"),
        (dict(init="svd"), "init"),
        (dict(tol=-1), "tol"),
        (dict(max_iter=1.5), "max_iter"),
        (dict(solver="x"), "solver"),
    ],
)
def test_bad_parameters(params, match):
    X = sp.random(5, 6, density=0.5, format="csr", random_state=0)
    with pytest.raises(ValueError, match=match):
        LowRankNPEFF(**params).fit(X)


def test_bad_input():
    X = sp.random(5, 7, density=0.5, format="csr", random_state=0)
    with pytest.raises(ValueError, match="n_classes"):
        LowRankNPEFF(n_classes=3).fit(X)
    Xd = X.toarray()
    Xd[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LowRankNPEFF(n_classes=7).fit(Xd)
    est = LowRankNPEFF(n_components=2, n_classes=7, max_iter=5, tol=0).fit(X)
    with pytest.raises(ValueError, match="features"):
        est.transform(sp.random(3, 14, density=0.5, format="csr"))
    with pytest.raises(ValueError):
        LowRankNPEFF().fit(np.array([["a", "b"]]))


def test_checkpoint_resume_matches_uninterrupted_fit(tmp_path):
    X, _, _ = make_planted_lowrank(n_examples=120, n_params=400, n_components=4,
                                   support_size=40, random_state=0, dtype=np.float64)
    X2, _, _ = make_planted_lowrank(n_examples=120, n_params=400, n_components=4,
                                    support_size=40, random_state=1, dtype=np.float64)
    kw = dict(n_components=4, n_classes=3, random_state=0, tol=0)
    check_checkpoint_resume(LowRankNPEFF, X, X2, tmp_path / "fit.npz", kw, n_curve=30)


def _interrupt_on_call(monkeypatch, name, at):
    """Make sknpeff.decomposition._solvers.<name> (what one iteration calls) raise
    KeyboardInterrupt (as Ctrl-C would) on its `at`-th call."""
    import sknpeff.decomposition._solvers as lr

    real = getattr(lr, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lr, name, wrapped)


def test_ctrl_c_keeps_state_and_saves_checkpoint(tmp_path, monkeypatch):
    X, _, _ = make_planted_lowrank(n_examples=120, n_params=400, n_components=4,
                                   support_size=40, random_state=0)
    ckpt = tmp_path / "fit.npz"
    est = LowRankNPEFF(n_components=4, n_classes=3, random_state=0, tol=0, max_iter=50,
                       checkpoint_path=ckpt)
    # twice per iteration (after the W step, at the end): the 15th call is in the 8th
    _interrupt_on_call(monkeypatch, "lowrank_loss", 15)
    with pytest.raises(KeyboardInterrupt), pytest.warns(
            RuntimeWarning, match="interrupted after 7 iterations.*checkpoint"
            r" \(loss [0-9.e+-]+, coefficients re-solved; ") as rec:
        est.fit_transform(X)  # the state is kept, and Ctrl-C still stops the caller
    monkeypatch.undo()
    W = est.transform(X)
    assert est.n_iter_ == 7 and np.isfinite(W).all()
    # the message names the kept state's exact loss (reconstruction_err_ squared) beside
    # the lowest of the loop, and says whether the kept state is the best so far
    msg = str(rec[0].message)
    assert len(est.loss_curve_) == 7
    kept = float(re.search(r"\(loss ([0-9.e+-]+), coefficients re-solved", msg).group(1))
    assert kept == pytest.approx(est.reconstruction_err_ ** 2, rel=1e-6)
    best = min(est.loss_curve_)
    assert f"lowest {best:.6e}" in msg or f"fit, {best:.6e}" in msg
    assert ("the best state so far" in msg) == (kept <= best)
    assert kept <= best  # the re-solved coefficients of the latest state: the best here
    with np.load(ckpt) as f:
        assert int(f["n_iter"]) == 7
    assert est.loss(X, W) == pytest.approx(kept, rel=1e-5)


def test_interrupt_warning_compares_kept_loss_with_the_fit():
    """The kept (latest) state's loss, beside the lowest loss of the loop; said to be the
    best only when it is not above any loss of the fit."""
    est = LowRankNPEFF(n_components=2, n_classes=1)
    est._interrupted = (3, [5.0, 4.0, 4.5], False)
    with pytest.warns(RuntimeWarning) as rec:
        est._warn_if_interrupted(4.2)
    msg = str(rec[0].message)
    assert "interrupted after 3 iterations; the state fitted so far is kept (loss " \
        "4.200000e+00" in msg
    assert "above the lowest loss of the fit, 4.000000e+00 at iteration 2" in msg
    assert "checkpoint" not in msg and "best state so far" not in msg
    est._interrupted = (3, [5.0, 4.0, 4.5], True)
    with pytest.warns(RuntimeWarning) as rec:
        est._warn_if_interrupted(3.9)
    msg = str(rec[0].message)
    assert "saved to the checkpoint" in msg and "the best state so far" in msg
    assert "lowest 4.000000e+00 at iteration 2" in msg
    est._interrupted = (0, [], False)  # interrupted in the first iteration
    with pytest.warns(RuntimeWarning, match=r"after 0 iterations.*\(loss 7.0+e\+00, "
                      r"coefficients re-solved\)\.$"):
        est._warn_if_interrupted(7.0)
    with warnings.catch_warnings():  # nothing to say without an interrupt
        warnings.simplefilter("error")
        est._warn_if_interrupted(1.0)


def test_ctrl_c_mid_sweep_leaves_consistent_state(monkeypatch):
    X, _, _ = make_planted_lowrank(n_examples=60, n_params=300, n_components=4,
                                   support_size=40, random_state=0, dtype=np.float64)
    est = LowRankNPEFF(n_components=4, n_classes=3, random_state=0, tol=0, max_iter=50,
                       block_size=16)
    n_blocks = -(-np.count_nonzero(np.abs(X).sum(axis=0).reshape(3, 300).sum(0)) // 16)
    assert n_blocks >= 4
    # block updates are called once per column block: this call is inside the 3rd sweep
    _interrupt_on_call(monkeypatch, "lowrank_g_update", 2 * n_blocks + n_blocks // 2)
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="interrupted"):
        est.fit_transform(X)
    monkeypatch.undo()
    W = est.transform(X)  # as the interrupted fit solved them, up to rounding
    # coefficients and reported loss belong to the components actually returned
    F = dense_pefs(X, 3)
    assert est.reconstruction_err_ ** 2 == pytest.approx(dense_loss(F, W, est.components_),
                                                          rel=1e-6)


@pytest.mark.parametrize("sorted_rows", [True, False])
@pytest.mark.parametrize("min_nnz", [1, 3])
def test_reshape_and_prune_matches_dense(monkeypatch, sorted_rows, min_nnz):
    import sknpeff.decomposition._data as base

    monkeypatch.setattr(base, "CHUNK_NNZ", 7)  # many row chunks, rows of every length
    n, c, m = 13, 3, 20
    X = sp.random(n, c * m, density=0.3, format="csr", random_state=1).tolil()
    X[4] = 0
    X[5, m:2 * m] = 0  # an empty slot between two non-empty ones
    X = X.tocsr()
    if not sorted_rows:  # scramble the order within each row
        rng = np.random.default_rng(0)
        for i in range(n):
            s, e = X.indptr[i], X.indptr[i + 1]
            p = rng.permutation(e - s)
            X.indices[s:e], X.data[s:e] = X.indices[s:e][p], X.data[s:e][p]
        X.has_sorted_indices = False
    before = (X.data.copy(), X.indices.copy())
    D = X.toarray().reshape(n * c, m)

    def compacted(cols):
        """Each example's slots with a value in ``cols``, in order, padded to the most."""
        slots = [D[i * c:(i + 1) * c, cols] for i in range(n)]
        slots = [S[(S != 0).any(axis=1)] for S in slots]
        k = max(1, max(len(S) for S in slots))
        return np.concatenate([np.vstack([S, np.zeros((k - len(S), len(cols)))])
                               for S in slots])

    expect = np.flatnonzero((D != 0).sum(axis=0) >= min_nnz)
    for compact in (False, True):
        A, kept = base.reshape_and_prune(X, c, None, min_nnz, np.float64, compact=compact)
        np.testing.assert_array_equal(kept, expect)
        np.testing.assert_array_equal(A.toarray(),
                                      compacted(expect) if compact else D[:, expect])
        A2, _ = base.reshape_and_prune(X, c, np.array([1, 5, 7]), 1, np.float32,
                                       compact=compact)
        np.testing.assert_allclose(A2.toarray(), compacted([1, 5, 7]) if compact
                                   else D[:, [1, 5, 7]], rtol=1e-6)
    assert not np.array_equal(compacted(expect), D[:, expect])  # the layouts differ
    np.testing.assert_array_equal(X.data, before[0])
    np.testing.assert_array_equal(X.indices, before[1])


# ------------------------------------------------------- one contract for both estimators
def test_w_solver_is_deprecated_for_solver():
    X, _, _ = make_planted_lowrank(n_examples=60, n_params=200, n_components=3,
                                   support_size=30, random_state=0)
    kw = dict(n_components=3, n_classes=3, random_state=0, max_iter=15, tol=0)
    new = LowRankNPEFF(solver="mu", **kw)
    W_new = new.fit_transform(X)
    old = LowRankNPEFF(w_solver="mu", **kw)
    with pytest.warns(FutureWarning, match=r"'w_solver' was renamed to 'solver'.*0\.3.*"
                                           r"solver='mu'"):
        W_old = old.fit_transform(X)
    np.testing.assert_array_equal(W_old, W_new)
    np.testing.assert_array_equal(old.components_, new.components_)
    np.testing.assert_array_equal(old.transform(X), new.transform(X))
    assert old.get_params()["w_solver"] == "mu" and old.solver == "cd"  # params untouched
    with pytest.raises(ValueError, match="both w_solver='mu' and solver='cd'|both"):
        LowRankNPEFF(w_solver="mu", solver="mu", **kw).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name alone: no warning
        LowRankNPEFF(solver="mu", **kw).fit(X)


def test_transform_reads_components_and_none_transform_max_iter():
    X, _, _ = make_planted_lowrank(n_examples=80, n_params=200, n_components=3,
                                   support_size=30, random_state=0)
    est = LowRankNPEFF(n_components=3, n_classes=3, random_state=0, max_iter=40, tol=0)
    W = est.fit(X).transform(X)
    assert (W[:, 1] > 0).any()
    est.components_[1] = 0.0  # components_ is the only copy: transform follows it
    W2 = est.transform(X)
    assert (W2[:, 1] == 0).all() and not np.allclose(W2, W)
    assert est.loss(X, W2) == pytest.approx(est.loss(X), rel=1e-9)  # W2 = transform(X)
    # transform_max_iter=None: max_iter coefficient steps, as DiagonalNPEFF's default
    a = LowRankNPEFF(n_components=3, n_classes=3, random_state=0, max_iter=40, tol=0,
                     transform_max_iter=None).fit(X)
    b = LowRankNPEFF(n_components=3, n_classes=3, random_state=0, max_iter=40, tol=0,
                     transform_max_iter=40).fit(X)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))


def test_reconstruction_err_and_loss_include_pruned_parameters():
    X, _, _ = make_planted_lowrank(n_examples=60, n_params=120, n_components=3,
                                   support_size=40, random_state=2, dtype=np.float64)
    est = LowRankNPEFF(n_components=3, n_classes=3, random_state=0, max_iter=30, tol=0,
                       min_nnz_per_column=4)
    W = est.fit_transform(X)
    assert 0 < est.kept_columns_.size < 120  # something with values was pruned
    dense = dense_loss(dense_pefs(X, 3), W, est.components_)
    assert est.reconstruction_err_ ** 2 == pytest.approx(dense, rel=1e-9)
    assert est.loss(X, W) == pytest.approx(dense, rel=1e-9)
    assert est.score(X) == -est.loss(X)
    assert len(est.loss_curve_) == est.n_iter_ == 30


def test_slot_count_mismatch_is_refused_at_fit():
    """PEFs carry their kind and slot count: a misread layout fails at fit, naming both."""
    import torch

    from sknpeff import DiagonalNPEFF, PEFTransformer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 5)).eval()
    X = torch.randn(20, 4)
    pefs = PEFTransformer(model, kind="low_rank", n_values=50).fit(X).transform(X)
    for n in (1, 10):
        with pytest.raises(ValueError, match=rf"n_classes={n}\) but the PEFs have 5 class"):
            LowRankNPEFF(n_components=2, n_classes=n).fit(pefs)
    LowRankNPEFF(n_components=2, n_classes=5, max_iter=5).fit(pefs)
    with pytest.raises(ValueError, match="holds low_rank PEFs.*use LowRankNPEFF"):
        DiagonalNPEFF(n_components=2).fit(pefs)
    diag = PEFTransformer(model, kind="diagonal", n_values=50).fit(X).transform(X)
    with pytest.raises(ValueError, match="holds diagonal PEFs.*use DiagonalNPEFF"):
        LowRankNPEFF(n_components=2, n_classes=1).fit(diag)


# ------------------------------------------------ many class slots, most of them empty
def test_mostly_empty_slots_match_the_full_slot_layout(monkeypatch):
    """Dropping empty slots changes no result: the same fit as with one row of A per
    class slot (the layout before compaction), and the dense float64 loss."""
    import functools

    import sknpeff.decomposition._base as base
    from sknpeff import ComponentExpander
    from sknpeff.decomposition._data import reshape_and_prune

    n, c, m = 40, 300, 50
    # the last 5 parameters are rare (pruned); example 3 has no slot at all
    X = sparse_slot_pefs(n, c, m, max_filled=4, seed=0,
                         density=np.r_[np.full(m - 5, 0.5), np.full(5, 0.05)])
    X = sp.csr_matrix(sp.diags((np.arange(n) != 3).astype(float)) @ X)
    X.eliminate_zeros()
    kw = dict(n_components=3, n_classes=c, random_state=0, max_iter=25, tol=0,
              min_nnz_per_column=12)  # some columns with values are pruned
    results = {}
    for compact in (True, False):
        monkeypatch.setattr(base, "reshape_and_prune",
                            functools.partial(reshape_and_prune, compact=compact))
        est = LowRankNPEFF(**kw)
        W = est.fit_transform(X)
        online = LowRankNPEFF(**kw).partial_fit(X[:25]).partial_fit(X[25:])
        grown = ComponentExpander(est, n_new_components=1, max_iter=10).fit(X)
        results[compact] = (est, W, est.transform(X[::2]), est.loss(X, W),
                            online.components_, grown.components_)
    (new, W, Wt, loss, on, gr), (old, W0, Wt0, loss0, on0, gr0) = results[True], results[False]
    np.testing.assert_allclose(on, on0, rtol=1e-7, atol=1e-10)  # partial_fit
    np.testing.assert_allclose(gr, gr0, rtol=1e-7, atol=1e-10)  # frozen components
    assert 0 < new.kept_columns_.size < m
    np.testing.assert_allclose(new.loss_curve_, old.loss_curve_, rtol=1e-9)
    np.testing.assert_allclose(new.components_, old.components_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(W, W0, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(Wt, Wt0, rtol=1e-7, atol=1e-10)
    assert loss == pytest.approx(loss0, rel=1e-9)
    dense = dense_loss(dense_pefs(X, c), W, new.components_)
    assert loss == pytest.approx(dense, rel=1e-9)
    assert new.reconstruction_err_ ** 2 == pytest.approx(dense, rel=1e-9)
    assert (W[3] == 0).all()


def test_slot_gram_sq_matches_dense_frobenius_norms():
    from sknpeff.decomposition._data import reshape_and_prune
    from sknpeff.decomposition._low_rank import slot_gram_sq

    # dense slots (columns numbered example x parameter) and sparse ones (numbered by
    # the pairs stored)
    for m, density in ((15, 0.5), (400, 0.02)):
        X = sparse_slot_pefs(30, 20, m, max_filled=6, seed=1, density=density)
        F = dense_pefs(X, 20)
        expect = float((F ** 2).sum())
        most = max(np.unique(X[i].indices // m).size for i in range(30))
        for compact in (True, False):
            A, _ = reshape_and_prune(X, 20, np.arange(m), 1, np.float64, compact=compact)
            k = A.shape[0] // 30
            assert k == (most if compact else 20)
            for chunk in (1, 7, 1 << 22):  # chunks of one example and a few examples
                assert slot_gram_sq(A, k, chunk_nnz=chunk) == pytest.approx(expect,
                                                                            rel=1e-12)


def test_fifty_thousand_slots_cost_follows_the_stored_values(monkeypatch):
    """A vocabulary-sized n_classes with a few filled slots per example: A has one row
    per filled slot (padded to the fullest example), never n * n_classes rows, and no
    array of n * n_classes entries is allocated on the way (fit, transform, loss)."""
    import tracemalloc

    import sknpeff.decomposition._base as base

    n, c, m, filled = 40, 50_000, 30, 5
    X = sparse_slot_pefs(n, c, m, max_filled=filled, seed=2)
    most = int(max(len(np.unique(X[i].indices // m)) for i in range(n)))
    orig = base.reshape_and_prune
    shapes = []

    def spy(*args, **kwargs):
        A, kept = orig(*args, **kwargs)
        shapes.append(A.shape)
        assert A.shape[0] == n * most, f"{A.shape[0]} rows of A for {n} examples"
        return A, kept

    monkeypatch.setattr(base, "reshape_and_prune", spy)
    est = LowRankNPEFF(n_components=3, n_classes=c, random_state=0, max_iter=10, tol=0)
    tracemalloc.start()
    try:
        W = est.fit_transform(X)
        est.transform(X)
        loss = est.loss(X, W)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(shapes) >= 3
    # one int64 per (example, slot) would be 16 MB; the data itself is ~40 kB
    assert peak < 4 * 2 ** 20, f"peak traced memory {peak / 2 ** 20:.1f} MiB"
    F = np.zeros((n, m, m))  # dense float64 F_i from each example's filled slots
    for i in range(n):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        slots, row = np.unique(X.indices[lo:hi] // m, return_inverse=True)
        a = np.zeros((slots.size, m))
        a[row, X.indices[lo:hi] % m] = X.data[lo:hi]
        F[i] = a.T @ a
    assert loss == pytest.approx(dense_loss(F, W, est.components_), rel=1e-9)
