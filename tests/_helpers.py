"""Helpers shared by several test modules."""

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment


def matched_cos(truth, components):
    """|cos| of each true component with its Hungarian-matched fitted one (rows)."""
    a = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-30)
    b = components / np.maximum(np.linalg.norm(components, axis=1, keepdims=True), 1e-30)
    S = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(-S)
    return S[rows, cols]


def check_checkpoint_resume(Estimator, X, X_other, ckpt, kw, n_curve):
    """A fit stopped at iteration 20 with a checkpoint and resumed to 30 matches an
    uninterrupted 30-iteration fit; a checkpoint of other data is refused.

    Returns the resumed and the uninterrupted estimator for further checks."""
    import pytest

    straight = Estimator(max_iter=30, **kw)
    W_straight = straight.fit_transform(X)
    Estimator(max_iter=20, checkpoint_path=ckpt, checkpoint_every=5, **kw).fit(X)
    assert ckpt.exists()
    with np.load(ckpt) as f:
        assert int(f["n_iter"]) == 20
    resumed = Estimator(max_iter=30, checkpoint_path=ckpt, checkpoint_every=5, **kw)
    W_resumed = resumed.fit_transform(X)
    assert resumed.n_iter_ == 30 and len(resumed.loss_curve_) == n_curve
    np.testing.assert_allclose(resumed.loss_curve_, straight.loss_curve_, rtol=1e-7)
    np.testing.assert_allclose(W_resumed, W_straight, rtol=1e-6, atol=1e-9)
    # a checkpoint of other data is refused, not silently used
    with pytest.raises(ValueError, match="checkpoint_path"):
        Estimator(max_iter=30, checkpoint_path=ckpt, **kw).fit(X_other)
    return resumed, straight


def sparse_slot_pefs(n, n_slots, m, max_filled, seed, density=0.5):
    """Low-rank PEF rows whose examples fill 1..max_filled of their n_slots class slots
    (at random positions, as a per-example class cut-off leaves them), float64."""
    rng = np.random.RandomState(seed)
    rows, cols, vals = [], [], []
    for i in range(n):
        for s in rng.choice(n_slots, rng.randint(1, max_filled + 1), replace=False):
            p = np.flatnonzero(rng.rand(m) < density)
            rows.append(np.full(p.size, i))
            cols.append(s * m + p)
            vals.append(rng.randn(p.size))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, n_slots * m))
