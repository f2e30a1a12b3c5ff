"""DiagonalNPEFF against scikit-learn's NMF and MiniBatchNMF on the same data.

D-NPEFF is NMF with the Frobenius loss, so at the same ``tol`` a fit should buy at least
the residual scikit-learn's NMF buys, and streaming (``partial_fit`` over mini-batches,
several passes) should end close to a full fit. For each data set the script prints
``n_iter`` (passes over the data for the streaming rows), seconds and the relative
residual ``||X - W H||_F / ||X||_F`` (``W`` re-fitted with the components frozen for
the streamed models, as ``transform`` fits it) of:

- ``DiagonalNPEFF`` full fits (``solver="cd"`` and ``"mu"``, ``init="nndsvda"``),
- ``sklearn.decomposition.NMF`` (``solver="cd"`` and ``"mu"``, ``init="nndsvda"``),
- ``DiagonalNPEFF.partial_fit`` over 5 mini-batches, ``--epochs`` passes (shuffled),
- ``sklearn.decomposition.MiniBatchNMF`` with the same batch size and passes
  (``max_iter=epochs``, its early stopping off).

All at scikit-learn's default ``tol=1e-4``. Data: planted D-PEFs
(:func:`sknpeff.datasets.make_planted_diagonal`, exact), the same plus sparse noise,
random non-negative data of exact rank ``r`` (dense factors, a slowly converging
problem), and that plus dense noise. Timings are noisy on a loaded machine: compare
rows of one run.

Run: ``python benchmarks/bench_nmf_sklearn.py [--epochs 10]`` (about a minute).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import NMF, MiniBatchNMF
from sklearn.exceptions import ConvergenceWarning

from sknpeff.datasets import make_planted_diagonal
from sknpeff.decomposition import DiagonalNPEFF

TOL = 1e-4
MAX_ITER = 3000
N_BATCHES = 5


def datasets():
    X, _, _ = make_planted_diagonal(n_examples=400, n_params=2000, n_components=8,
                                    support_size=200, random_state=0, dtype=np.float64)
    yield "planted (exact)", sp.csr_matrix(X), 8
    rng = np.random.default_rng(0)
    noise = sp.random(400, 2000, density=0.02, random_state=0,
                      data_rvs=lambda k: rng.uniform(0, 0.05, k))
    yield "planted + sparse noise", sp.csr_matrix(X + noise), 8
    rs = np.random.RandomState(0)
    W, H = rs.rand(300, 6), rs.rand(6, 500)
    yield "random rank 6 (exact)", sp.csr_matrix(W @ H), 6
    yield "random rank 6 + noise", sp.csr_matrix(W @ H + 0.3 * rs.rand(300, 500)), 6


def rel_residual(X, W, H):
    D = X.toarray()
    return float(np.linalg.norm(D - W @ H) / np.linalg.norm(D))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def stream_npeff(X, r, epochs, batch):
    est = DiagonalNPEFF(n_components=r, random_state=0, tol=TOL)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        perm = rng.permutation(X.shape[0])
        for s in range(0, X.shape[0], batch):
            est.partial_fit(X[perm[s:s + batch]])
    return est


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"tol={TOL}, max_iter={MAX_ITER}; streaming: {N_BATCHES} batches x "
          f"{args.epochs} passes")
    print(f"{'data':24s} {'method':30s} {'n_iter':>7s} {'seconds':>8s} {'rel. resid':>11s}"
          f" {'/ full cd':>9s}")
    for name, X, r in datasets():
        batch = -(-X.shape[0] // N_BATCHES)
        rows = []
        for solver in ("cd", "mu"):
            est = DiagonalNPEFF(n_components=r, solver=solver, tol=TOL, max_iter=MAX_ITER,
                                random_state=0)
            W, t = timed(est.fit_transform, X)
            rows.append((f"DiagonalNPEFF {solver}", est.n_iter_, t,
                         rel_residual(X, W, est.components_)))
        for solver in ("cd", "mu"):
            nmf = NMF(n_components=r, solver=solver, init="nndsvda", tol=TOL,
                      max_iter=MAX_ITER, random_state=0)
            W, t = timed(nmf.fit_transform, X)
            rows.append((f"sklearn NMF {solver}", nmf.n_iter_, t,
                         rel_residual(X, W, nmf.components_)))
        est, t = timed(stream_npeff, X, r, args.epochs, batch)
        rows.append(("DiagonalNPEFF partial_fit", args.epochs, t,
                     rel_residual(X, est.transform(X), est.components_)))
        mb = MiniBatchNMF(n_components=r, batch_size=batch, max_iter=args.epochs,
                          init="nndsvda", tol=0, max_no_improvement=None, random_state=0)
        _, t = timed(mb.fit, X)
        rows.append(("sklearn MiniBatchNMF", mb.n_iter_, t,
                     rel_residual(X, mb.transform(X), mb.components_)))
        ref = rows[0][3]
        for method, n_iter, t, err in rows:
            ratio = err / ref if ref > 1e-12 else float("nan")
            print(f"{name:24s} {method:30s} {n_iter:7d} {t:8.2f} {err:11.3e} {ratio:9.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
