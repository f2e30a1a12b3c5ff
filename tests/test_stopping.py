"""Tests of the stopping rules shared by DiagonalNPEFF and LowRankNPEFF: ``coef_tol``
(coefficient stability) and ``stop_reason_``."""

import numpy as np
import pytest

from sknpeff.backends import NumpyBackend
from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from sknpeff.decomposition._base import COEF_CHECKS, mean_column_cosine
from sknpeff.utils import InvalidParameterError
from tests._helpers import matched_cos

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _diag(seed=0):
    return make_planted_diagonal(n_examples=300, n_params=1500, n_components=6,
                                 support_size=150, random_state=seed)


def _lowrank(seed=0):
    return make_planted_lowrank(n_examples=200, n_params=1000, n_classes=3, n_components=5,
                                support_size=80, random_state=seed)


def test_mean_column_cosine_matches_dense_formula():
    rng = np.random.default_rng(0)
    A, B = rng.random((20, 4)), rng.random((20, 4))
    A[:, 2] = 0.0
    B[:, 2] = 0.0  # both zero: identical
    B[:, 3] = 0.0  # one zero: orthogonal
    ref = [A[:, k] @ B[:, k] / np.linalg.norm(A[:, k]) / np.linalg.norm(B[:, k])
           for k in range(2)]
    assert mean_column_cosine(np, A, B) == pytest.approx((sum(ref) + 1.0 + 0.0) / 4)
    assert mean_column_cosine(np, A, 3.0 * A) == pytest.approx(1.0)  # scale-free


def test_coef_tol_stops_mu_early_with_the_same_components():
    """Multiplicative updates crawl on the loss long after the components settle (the
    paper's observation): coefficient stability stops far sooner, same components."""
    X, _, H = _diag()
    kw = dict(n_components=6, solver="mu", random_state=0, max_iter=400)
    ref = DiagonalNPEFF(**kw).fit(X)
    est = DiagonalNPEFF(coef_tol=1e-3, **kw).fit(X)
    assert ref.stop_reason_ in ("tol", "max_iter")
    assert est.stop_reason_ == "coef_tol"
    assert est.n_iter_ <= ref.n_iter_ / 2
    assert est.n_iter_ >= 10 * (COEF_CHECKS + 1) - 9  # needs COEF_CHECKS passes in a row
    assert len(est.loss_curve_) == est.n_iter_
    assert matched_cos(ref.components_, est.components_).min() >= 0.95
    assert matched_cos(H, est.components_).min() >= 0.95


def test_coef_tol_lowrank():
    X, _, G = _lowrank()
    kw = dict(n_components=5, n_classes=3, random_state=0, tol=0, max_iter=300)
    ref = LowRankNPEFF(**kw).fit(X)
    est = LowRankNPEFF(coef_tol=1e-3, **kw).fit(X)
    assert ref.stop_reason_ == "max_iter" and ref.n_iter_ == 300
    assert est.stop_reason_ == "coef_tol" and est.n_iter_ < 300
    assert matched_cos(ref.components_, est.components_).min() >= 0.95
    assert matched_cos(G, est.components_).min() >= 0.95


def test_coef_tol_waits_for_the_lowrank_warm_up():
    """During the G-only warm-up W does not move: that is not convergence."""
    X, _, _ = _lowrank()
    est = LowRankNPEFF(n_components=5, n_classes=3, random_state=0, tol=0, max_iter=10,
                       n_iter_g_only=60, coef_tol=0.5).fit(X)
    assert est.n_iter_ > 60


def test_coef_tol_compares_with_ten_iterations_earlier(monkeypatch):
    """The rule stops at the first check where COEF_CHECKS comparisons in a row pass,
    with the cosine computed between W and W ten iterations earlier."""
    import sknpeff.decomposition._base as base

    seen = []
    real = base.mean_column_cosine

    def spy(xp, A, B):
        value = real(xp, A, B)
        seen.append(value)
        return value

    monkeypatch.setattr(base, "mean_column_cosine", spy)
    X, _, _ = _diag(1)
    est = DiagonalNPEFF(n_components=6, solver="mu", random_state=0, tol=0, max_iter=300,
                        coef_tol=1e-3).fit(X)
    passed = [1.0 - c <= 1e-3 for c in seen]
    assert est.stop_reason_ == "coef_tol"
    assert all(passed[-COEF_CHECKS:]) and not all(passed[-COEF_CHECKS - 1:])
    # checks at iterations 1, 11, 21, ...: the first has nothing to compare with
    assert est.n_iter_ == 10 * len(seen) + 1


def test_stop_reasons():
    X, _, _ = _diag()
    assert DiagonalNPEFF(n_components=6, random_state=0, max_iter=5).fit(X).stop_reason_ \
        == "max_iter"
    assert DiagonalNPEFF(n_components=6, random_state=0).fit(X).stop_reason_ == "tol"
    assert DiagonalNPEFF(n_components=6, random_state=0, max_iter=0).fit(X).stop_reason_ \
        == "max_iter"


def test_stop_reason_interrupted(monkeypatch):
    import sknpeff.decomposition._diagonal as diag_mod

    calls = {"n": 0}
    real = diag_mod.diagonal_step

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(diag_mod, "diagonal_step", interrupting)
    est = DiagonalNPEFF(n_components=6, random_state=0)
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning):
        est.fit(_diag()[0])
    assert est.stop_reason_ == "interrupted" and est.n_iter_ == 3


@pytest.mark.parametrize("bad", [-0.1, 1.5, "x"])
@pytest.mark.parametrize("Est", [DiagonalNPEFF, LowRankNPEFF])
def test_bad_coef_tol(Est, bad):
    with pytest.raises(InvalidParameterError, match="coef_tol"):
        Est(n_components=2, coef_tol=bad).fit(np.ones((4, 6)))


def test_coef_tol_off_is_bit_identical():
    X, _, _ = _diag()
    kw = dict(n_components=6, random_state=0, max_iter=40, tol=0,
              backend=NumpyBackend())
    a = DiagonalNPEFF(**kw).fit(X)
    b = DiagonalNPEFF(coef_tol=None, **kw).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    # a coef_tol that never passes changes nothing either
    c = DiagonalNPEFF(coef_tol=0.0, **kw).fit(X)
    np.testing.assert_array_equal(a.components_, c.components_)
