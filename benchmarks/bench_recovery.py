"""Sparse recovery of projected components: time, residuals, support sizes, planted cosines.

For the planted-experts model (:func:`sknpeff.datasets.make_gated_experts`) and the
digits CNN, a LowRankNPEFF is fitted on projected PEFs (as in
``bench_projected_pipeline.py``), and :func:`~sknpeff.pef.recover_components` brings its
components back to parameter space: wall time, ``||R g - h|| / ||h||`` per component,
the support sizes (against ``d``: a support of ``d`` or more fits any ``h`` and is not
refit), then planted sparse ``g`` with ``d / s`` in ``--ratios`` recovered through the
same operator (median and smallest ``|cos|`` with the planted ``g``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_recovery.py [--alphas 1e-3 1e-2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from sknpeff import LowRankNPEFF, PEFTransformer
from sknpeff.datasets import make_gated_experts, train_digits_cnn
from sknpeff.pef import recover_components


def fitted(model, X, n_slots, K, n_components, seed):
    d = 2 * K // n_slots  # the bytes of K top-K entries
    pef = PEFTransformer(model, kind="low_rank", n_values=d, n_classes=n_slots,
                         compression="projection", batch_size=128,
                         projection_seed=seed).fit(X)
    est = LowRankNPEFF(n_components=n_components, n_classes=n_slots, max_iter=100,
                       random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(pef.compute(X).pefs)
    return est


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--ratios", type=float, nargs="+", default=[20, 10, 5],
                    help="d / s of the planted components")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, sample, _ = make_gated_experts(random_state=0)
    X, _ = sample(1500, random_state=1)
    cases = [("experts", fitted(model, X, 3, 400, 8, 0))]
    model, split = train_digits_cnn(random_state=0, epochs=10, label_smoothing=0.1)
    cases.append(("digits", fitted(model, split.X_train, 10, 2048, 16, 0)))
    for name, est in cases:
        R = est.projection_
        d = R.n_components
        for alpha in args.alphas:
            t0 = time.perf_counter()
            G, res = recover_components(est, alpha=alpha, return_residuals=True)
            dt = time.perf_counter() - t0
            nnz = np.diff(G.indptr)
            print(f"{name:8} d={d} n_params={R.n_params} k={G.shape[0]} alpha={alpha:g}: "
                  f"{dt:6.2f} s, residual mean {res.mean():.4f} max {res.max():.4f}, "
                  f"support {nnz.min()}-{nnz.max()} ({(nnz >= d).sum()} rows >= d)")
        rng = np.random.default_rng(0)
        for ratio in args.ratios:
            s = max(1, int(d / ratio))
            P = np.zeros((8, R.n_params))
            for k in range(8):
                P[k, rng.choice(R.n_params, s, replace=False)] = rng.standard_normal(s)
            t0 = time.perf_counter()
            G = recover_components(R.apply(P), R).toarray()
            dt = time.perf_counter() - t0
            cos = np.abs((G * P).sum(1)) / np.maximum(
                np.linalg.norm(G, axis=1) * np.linalg.norm(P, axis=1), 1e-300)
            print(f"{name:8} planted s={s} (d/s={ratio:g}): {dt:6.2f} s, |cos| median "
                  f"{np.median(cos):.4f} min {cos.min():.4f}")


if __name__ == "__main__":
    main()
