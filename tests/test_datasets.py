"""Tests for sknpeff.datasets."""

import numpy as np
import pytest
import scipy.sparse as sp

from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank


def _dense_pef(X, i, n_classes, n_params):
    A = X[i].toarray().reshape(n_classes, n_params)
    return A.T @ A


@pytest.mark.parametrize("normalize", [True, False])
def test_planted_lowrank_exact(normalize):
    n, m, c, r = 12, 40, 3, 5
    X, W, G = make_planted_lowrank(
        n_examples=n, n_params=m, n_classes=c, n_components=r, support_size=8,
        normalize=normalize, random_state=0, dtype=np.float64,
    )
    assert sp.isspmatrix_csr(X) and X.shape == (n, c * m) and X.dtype == np.float64
    assert X.has_sorted_indices and np.all(X.data != 0)
    assert W.shape == (n, r) and G.shape == (r, m)
    assert np.all(W >= 0)
    np.testing.assert_allclose(np.linalg.norm(G, axis=1), 1.0, atol=1e-12)
    assert np.all((G != 0).sum(axis=1) == 8)
    n_act = (W > 0).sum(axis=1)
    assert n_act.min() >= 1 and n_act.max() <= 3
    for i in range(n):
        F = _dense_pef(X, i, c, m)
        F_planted = (G.T * W[i]) @ G
        np.testing.assert_allclose(F, F_planted, atol=1e-6)
        if normalize:
            assert abs(np.linalg.norm(F) - 1.0) < 1e-6
    # The stored vectors are mixed: not simply the (scaled) planted components.
    A0 = X[0].toarray().reshape(c, m)
    k = np.flatnonzero(W[0])
    cos = np.abs(A0 @ G[k].T) / (np.linalg.norm(A0, axis=1)[:, None] + 1e-30)
    assert not np.all(np.isclose(cos.max(axis=1)[np.linalg.norm(A0, axis=1) > 0], 1.0))


def test_planted_lowrank_defaults_and_determinism():
    X, W, G = make_planted_lowrank(random_state=3)
    assert X.shape == (600, 9000) and X.dtype == np.float32
    assert W.dtype == np.float32 and G.dtype == np.float32
    X2, W2, G2 = make_planted_lowrank(random_state=3)
    assert (X != X2).nnz == 0
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(G, G2)
    X3, _, _ = make_planted_lowrank(random_state=4)
    assert (X != X3).nnz > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_active": (1, 4)}, "n_active"),
        ({"n_active": (3, 2)}, "n_active"),
        ({"n_active": 2}, "n_active"),
        ({"support_size": 5000}, "support_size"),
        ({"n_examples": 0}, "n_examples"),
        ({"dtype": np.int32}, "dtype"),
    ],
)
def test_planted_lowrank_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_planted_lowrank(**kwargs)


@pytest.mark.parametrize("normalize", [True, False])
def test_planted_diagonal_exact(normalize):
    X, W, H = make_planted_diagonal(
        n_examples=30, n_params=60, n_components=6, support_size=10,
        normalize=normalize, random_state=1, dtype=np.float64,
    )
    assert sp.isspmatrix_csr(X) and X.shape == (30, 60)
    assert X.has_sorted_indices and np.all(X.data > 0)
    assert np.all(W >= 0) and np.all(H >= 0)
    np.testing.assert_allclose(np.linalg.norm(H, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(X.toarray(), W @ H, atol=1e-12)
    n_act = (W > 0).sum(axis=1)
    assert n_act.min() >= 1 and n_act.max() <= 3
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(X.toarray(), axis=1), 1.0, atol=1e-12)


def test_planted_diagonal_defaults_and_determinism():
    X, W, H = make_planted_diagonal(random_state=0)
    assert X.shape == (800, 4000) and X.dtype == np.float32
    X2, W2, H2 = make_planted_diagonal(random_state=0)
    assert (X != X2).nnz == 0
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(H, H2)
    with pytest.raises(ValueError, match="n_active"):
        make_planted_diagonal(n_components=2, n_active=(1, 3))
