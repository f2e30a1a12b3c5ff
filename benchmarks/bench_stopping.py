"""Early stopping on coefficient stability (``coef_tol``) against the loss rule alone.

For DiagonalNPEFF and LowRankNPEFF on planted data and on the PEFs of the digits CNN
(the demo's model, ``python -m sknpeff demo``), fits once with the loss rule alone
(default ``tol``; the reference) and once per ``coef_tol``, and prints the iterations
and seconds of each fit, why it stopped, and how close its result is to the reference:
the smallest and mean |cos| of Hungarian-matched components and the share of them at
0.95 or more, the mean cosine of the matched coefficient columns, and the relative
change of the final loss.

Run: ``python benchmarks/bench_stopping.py [--quick]`` (about a minute; ``--quick``
skips the CNN).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning

from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF

COEF_TOLS = (1e-2, 1e-3, 1e-4)


def matched(ref_H, H, ref_W, W):
    """Matched |cos| of the components, and the mean cosine of the matched W columns."""
    a = ref_H / np.maximum(np.linalg.norm(ref_H, axis=1, keepdims=True), 1e-30)
    b = H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), 1e-30)
    S = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(-S)
    comp = S[rows, cols]
    wa, wb = ref_W[:, rows], W[:, cols]
    num = np.sum(wa * wb, axis=0)
    den = np.linalg.norm(wa, axis=0) * np.linalg.norm(wb, axis=0)
    wcos = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
    return comp.min(), comp.mean(), float(np.mean(comp >= 0.95)), wcos.mean()


def fit(make, X, **kw):
    est = make(**kw)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = est.fit_transform(X)
    return est, W, time.perf_counter() - t0


def compare(name, make, X, kw):
    ref, W_ref, t_ref = fit(make, X, **kw)
    loss_ref = ref.reconstruction_err_ ** 2
    print(f"{name:34s} {'loss rule':>9s} {ref.n_iter_:6d} {t_ref:7.2f} {ref.stop_reason_:>9s}"
          f" {'1':>7s} {'1':>7s} {'100%':>6s} {'1':>7s} {0:+9.2e}", flush=True)
    for ct in COEF_TOLS:
        est, W, t = fit(make, X, coef_tol=ct, **kw)
        cmin, cmean, frac, wcos = matched(ref.components_, est.components_, W_ref, W)
        dl = (est.reconstruction_err_ ** 2 - loss_ref) / max(loss_ref, 1e-300)
        print(f"{name:34s} {ct:9.0e} {est.n_iter_:6d} {t:7.2f} {est.stop_reason_:>9s} "
              f"{cmin:7.4f} {cmean:7.4f} {frac:6.0%} {wcos:7.4f} {dl:+9.2e}", flush=True)


def digits_pefs(kind):
    from sknpeff.datasets import train_digits_cnn
    from sknpeff.pef import PEFTransformer

    model, split = train_digits_cnn(random_state=0, epochs=30, label_smoothing=0.1)
    kw = {"n_values": 2048} if kind == "low_rank" else {}
    pef = PEFTransformer(model, kind=kind, batch_size=128, **kw).fit(split.X_train)
    return pef.compute(split.X_train).pefs, pef


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print(f"{'data / estimator':34s} {'coef_tol':>9s} {'n_iter':>6s} {'seconds':>7s} "
          f"{'stop':>9s} {'min cos':>7s} {'mean':>7s} {'>=.95':>6s} {'W cos':>7s} {'d loss':>9s}")
    X, _, _ = make_planted_diagonal(n_examples=800, n_params=4000, n_components=10,
                                    random_state=0)
    for solver in ("cd", "mu"):
        compare(f"planted diag, Diagonal {solver}", DiagonalNPEFF, X,
                dict(n_components=10, solver=solver, random_state=0, max_iter=1000))
    X, _, _ = make_planted_lowrank(n_examples=600, n_params=3000, n_classes=3,
                                   n_components=8, random_state=0)
    compare("planted low-rank, LowRank", LowRankNPEFF, X,
            dict(n_components=8, n_classes=3, random_state=0))
    if args.quick:
        return
    X, pef = digits_pefs("low_rank")
    compare("digits CNN LRM-PEFs, LowRank r=32", LowRankNPEFF, X,
            dict(n_components=32, n_classes=pef.n_classes_, random_state=0, max_iter=1000))
    X, _ = digits_pefs("diagonal")
    compare("digits CNN D-PEFs, Diagonal r=32", DiagonalNPEFF, X,
            dict(n_components=32, random_state=0, max_iter=1000))


if __name__ == "__main__":
    main()
