"""Sparse recovery of projected components: the operator it runs on, the l1 solution it
converges to, the refit, and the sparse sign block's explicit form."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch import nn

from sknpeff.layout import ParameterLayout
from sknpeff.pef import Projection, recover_components
from sknpeff.pef._recovery import _Operator


def _projection(d=120, seed=0):
    # Kronecker blocks for every matrix: the larger Linear's stays factored, the smaller
    # one's is explicit, biases and norm scales go to the sparse sign block
    model = nn.Sequential(nn.Linear(60, 40), nn.LayerNorm(40), nn.Linear(40, 5))
    return Projection.for_layout(ParameterLayout.from_model(model), d, seed=seed,
                                 min_kronecker_size=0)


def _dense(R):
    """The (d, n_params) matrix of R, column by column through ``apply``."""
    return R.apply(torch.eye(R.n_params, dtype=torch.float64)).T.numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_block_products_match_its_definition(dtype):
    R = _projection()
    b = R.sparse
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, b.size, generator=gen, dtype=dtype)
    y = torch.randn(3, b.dim, generator=gen, dtype=dtype)
    rows, vals = R.sparse_factors("cpu", dtype)
    S = torch.zeros(b.dim, b.size, dtype=torch.float64)  # column q: vals[:, q] at rows[:, q]
    S[rows, torch.arange(b.size).expand_as(rows)] = vals.double()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                             atol=1e-5)
    torch.testing.assert_close(R.sparse_apply(x).double(), x.double() @ S.T, **tol)
    torch.testing.assert_close(R.sparse_adjoint(y).double(), y.double() @ S, **tol)
    assert R.sparse_apply(x).dtype == dtype and R.sparse_adjoint(y).dtype == dtype
    # a batch row by row gives the same rows (sums in a fixed order)
    assert torch.equal(R.sparse_apply(x[1:2]), R.sparse_apply(x)[1:2])
    # gradients flow through the block (the scatter form)
    xg = x.clone().requires_grad_(True)
    R.sparse_apply(xg).sum().backward()
    torch.testing.assert_close(xg.grad.double(), S.sum(0).expand(3, -1), **tol)
    # the torch CSR pair (other devices) holds the same matrix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: sparse CSR is beta
        s, st = R._sparse_matrices("cpu", dtype, "torch")
        np.testing.assert_array_equal(s.to_dense().double().numpy(), S.numpy())
        np.testing.assert_array_equal(st.to_dense().double().numpy(), S.T.numpy())


def test_recovery_operator_is_the_projection():
    R = _projection()
    op = _Operator(R)
    assert op.factored and op.rt is not None  # both kinds of block are exercised
    M = _dense(R)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, R.n_params, generator=gen, dtype=torch.float64)
    y = torch.randn(4, R.n_components, generator=gen, dtype=torch.float64)
    # vectors are columns there
    np.testing.assert_allclose(op.apply(x.T.contiguous()).numpy(), M @ x.numpy().T,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(op.adjoint(y.T.contiguous()).numpy(), M.T @ y.numpy().T,
                               rtol=1e-12, atol=1e-12)
    idx = torch.tensor([0, 5, 2399, 2400, 2450, R.n_params - 1, 3])
    np.testing.assert_array_equal(op.columns(idx), M[:, idx.numpy()])
    # the per-parameter curvature is ||R_b||^2 of the parameter's block
    for b in R.blocks:
        cols = np.flatnonzero(np.abs(M[b.offset : b.offset + b.dim]).sum(0) > 0)
        top = np.linalg.norm(M[b.offset : b.offset + b.dim][:, cols], 2) ** 2
        np.testing.assert_allclose(op.curvature[cols].numpy(), top, rtol=1e-9)


def test_l1_solution_is_the_lasso_minimizer():
    # without pruning or refit, the result is the l1-regularized least squares solution
    # (compared with coordinate descent on the dense matrix)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 3))
    R = Projection.for_layout(ParameterLayout.from_model(model), 40, seed=2)
    M = _dense(R)
    h = np.random.default_rng(0).standard_normal((2, 40))
    alpha = 0.05
    got = recover_components(h, R, alpha=alpha, refit=False, prune=1e-12, tol=1e-12,
                             max_iter=40000, n_stages=4).toarray()
    for k in range(2):
        lam = alpha * np.abs(M.T @ h[k]).max()
        ref = Lasso(alpha=lam / 40, fit_intercept=False, tol=1e-14, max_iter=200000).fit(
            M, h[k]).coef_
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got[k], ref, atol=1e-5 * scale)


def test_refit_is_least_squares_on_the_support():
    R = _projection(d=150)
    M = _dense(R)
    rng = np.random.default_rng(3)
    G = np.zeros((3, R.n_params))
    for k in range(3):
        G[k, rng.choice(R.n_params, 6, replace=False)] = rng.standard_normal(6)
    H = G @ M.T + 0.01 * rng.standard_normal((3, 150))  # noisy: the refit is not exact
    rec, res = recover_components(H, R, return_residuals=True)
    rec = rec.toarray()
    for k in range(3):
        supp = np.flatnonzero(rec[k])
        assert 0 < len(supp) < 150
        # least squares on the support: the residual is orthogonal to its columns and
        # as small as numpy's
        r = M @ rec[k] - H[k]
        assert np.abs(M[:, supp].T @ r).max() < 1e-9 * np.linalg.norm(H[k])
        ls = np.linalg.lstsq(M[:, supp], H[k], rcond=None)[0]
        np.testing.assert_allclose(np.linalg.norm(r), np.linalg.norm(M[:, supp] @ ls - H[k]),
                                   rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(res[k], np.linalg.norm(M @ rec[k] - H[k])
                                   / np.linalg.norm(H[k]), rtol=1e-10)


def test_planted_recovery_with_factored_blocks():
    # d/s >= 20 with a factored Kronecker block among the blocks: found exactly
    R = _projection(d=160, seed=4)
    rng = np.random.default_rng(5)
    s = 8
    G = np.zeros((4, R.n_params))
    for k in range(4):
        G[k, rng.choice(R.n_params, s, replace=False)] = rng.standard_normal(s)
    rec = recover_components(R.apply(G), R).toarray()
    cos = np.abs((rec * G).sum(1)) / (np.linalg.norm(rec, axis=1) * np.linalg.norm(G, axis=1))
    assert np.all(cos >= 0.99)
