"""ComponentExpander: frozen components bit for bit, specialisation, sklearn contract."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.decomposition import NMF
from sklearn.exceptions import NotFittedError

from sknpeff.datasets import make_planted_lowrank
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from sknpeff.expansion import ComponentExpander


@pytest.fixture(scope="module")
def planted():
    X, W, G = make_planted_lowrank(n_examples=400, n_params=1200, n_classes=3,
                                   n_components=6, support_size=80, random_state=0)
    base = LowRankNPEFF(n_components=4, n_classes=3, random_state=0).fit(X)
    # the specialised set: the examples using the two planted components the base misses
    best = np.abs(G @ base.components_.T).max(axis=1)
    missing = np.argsort(best)[:2]
    assert best[missing].max() < 0.5  # 4 components cannot hold 6
    special = np.flatnonzero((W[:, missing] > 0).any(axis=1))
    return X, W, G, base, special


def test_frozen_components_bit_for_bit_and_loss_lower(planted):
    X, _, _, base, special = planted
    before = base.components_.copy()
    params_before = base.get_params()
    Xs = X[special]
    exp = ComponentExpander(base, n_new_components=2, random_state=0)
    W = exp.fit_transform(Xs)
    r0 = before.shape[0]
    assert exp.components_.shape == (r0 + 2, X.shape[1] // 3)
    assert exp.components_.dtype == before.dtype
    assert np.array_equal(exp.components_[:r0].view(np.uint32), before.view(np.uint32))
    assert np.array_equal(exp.frozen_, [True] * r0 + [False] * 2) and exp.n_frozen_ == r0
    assert exp.n_components_ == r0 + 2 and exp.n_features_in_ == X.shape[1]
    # the user's estimator is untouched
    assert np.array_equal(base.components_, before) and base.get_params() == params_before
    assert base.n_components == r0
    # the new components lower the loss on the specialised set
    old = base.loss(Xs)
    new = exp.estimator_.loss(Xs)
    assert new < 1e-2 * old, (new, old)
    assert W.shape == (len(special), r0 + 2) and (W >= 0).all()
    Wt = exp.transform(Xs)
    assert Wt.shape == W.shape
    np.testing.assert_allclose(exp.estimator_.loss(Xs, Wt), new, rtol=1e-3)
    assert exp.score(Xs) == pytest.approx(-exp.estimator_.loss(Xs))
    # new components are unit norm and differ from the frozen ones
    np.testing.assert_allclose(np.linalg.norm(exp.components_[r0:], axis=1), 1.0, rtol=1e-5)
    cos = np.abs(exp.components_[r0:] @ before.T)
    assert cos.max() < 0.9


def test_new_components_recover_missing_planted(planted):
    X, _, G, base, special = planted

    exp = ComponentExpander(base, n_new_components=2, random_state=0).fit(X[special])
    # every planted component is now matched; the two missing ones by the new components
    assert np.abs(G @ exp.components_.T).max(axis=1).min() > 0.98
    assert np.abs(G @ base.components_.T).max(axis=1).min() < 0.5


def test_sklearn_params_and_clone(planted):
    _, _, _, base, _ = planted
    exp = ComponentExpander(base, 3, max_iter=50, random_state=1)
    p = exp.get_params(deep=False)
    assert p == {"estimator": base, "n_new_components": 3, "max_iter": 50, "random_state": 1}
    deep = exp.get_params()
    assert deep["estimator__n_classes"] == 3
    c = clone(exp)
    assert c.get_params(deep=False)["max_iter"] == 50 and c.estimator is not base
    exp.set_params(n_new_components=2, tol=0.0)
    assert exp.n_new_components == 2 and exp.get_params()["tol"] == 0.0
    assert "ComponentExpander" in repr(exp)
    with pytest.raises(NotFittedError):
        exp.transform(np.zeros((1, 3600)))


def test_validation_errors(planted):
    X, _, _, base, special = planted
    with pytest.raises(ValueError, match="n_new_components"):
        ComponentExpander(base, 0).fit(X)
    with pytest.raises(ValueError, match="n_new_components"):
        ComponentExpander(base, 1.5).fit(X)
    with pytest.raises(NotFittedError):
        ComponentExpander(LowRankNPEFF(4, n_classes=3), 2).fit(X)
    with pytest.raises(ValueError, match="n_components"):
        ComponentExpander(base, 2, n_components=9).fit(X)
    with pytest.raises(ValueError, match="not_a_param"):
        ComponentExpander(base, 2, not_a_param=1).fit(X)
    nmf = NMF(2).fit(np.abs(np.random.default_rng(0).random((10, 5))))
    with pytest.raises(ValueError, match="frozen_components"):
        ComponentExpander(nmf, 2).fit(X)
    with pytest.raises(ValueError, match="frozen_components|features"):
        ComponentExpander(base, 2).fit(X[:, :300])  # PEFs of another width


def test_diagonal_expansion():
    from sknpeff.datasets import make_planted_diagonal

    X, _, H = make_planted_diagonal(n_examples=300, n_params=1000, n_components=6,
                                    support_size=80, random_state=0)
    base = DiagonalNPEFF(n_components=4, random_state=0).fit(X)
    before = base.components_.copy()
    Wb = base.transform(X)
    rec = np.asarray(((X.toarray() - Wb @ base.components_) ** 2).sum(axis=1)).ravel()
    special = np.sort(np.argsort(-rec)[:100])
    exp = ComponentExpander(base, n_new_components=2, random_state=0).fit(X[special])
    assert np.array_equal(exp.components_[:4], before)
    assert np.array_equal(base.components_, before)
    assert (exp.components_ >= 0).all()
    Xs = X[special].toarray()
    old = ((Xs - base.transform(X[special]) @ before) ** 2).sum()
    new = ((Xs - exp.transform(X[special]) @ exp.components_) ** 2).sum()
    assert new < old


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_frozen_components_that_do_not_survive_the_dtype_are_refused(planted):
    X, _, _, _, special = planted
    X64 = X.astype(np.float64)
    base64 = LowRankNPEFF(n_components=4, n_classes=3, random_state=0, max_iter=30).fit(X64)
    with pytest.raises(ValueError, match="float64"):
        ComponentExpander(base64, 1, max_iter=5).fit(X[special])  # float32 PEFs
    # float32 frozen components in float64 PEFs are exact
    base32 = LowRankNPEFF(n_components=4, n_classes=3, random_state=0, max_iter=30).fit(X)
    exp = ComponentExpander(base32, 1, max_iter=5).fit(X64[special])
    assert np.array_equal(exp.components_[:4], base32.components_.astype(np.float64))


def test_score_works_with_either_base():
    from sknpeff.datasets import make_planted_diagonal

    X, _, _ = make_planted_diagonal(n_examples=150, n_params=500, n_components=4,
                                    support_size=60, random_state=0)
    base = DiagonalNPEFF(n_components=2, random_state=0, max_iter=30).fit(X)
    exp = ComponentExpander(base, n_new_components=2, random_state=0, max_iter=30).fit(X)
    assert exp.score(X) == pytest.approx(-exp.estimator_.loss(X))
    assert exp.score(X) > base.score(X)  # more components, lower loss


@pytest.mark.parametrize("kind", ["diagonal", "low_rank"])
def test_ctrl_c_in_fit_keeps_state_warns_and_reraises(kind, monkeypatch):
    """A real SIGINT inside an iteration: the fitted state is kept and announced, and
    KeyboardInterrupt reaches the caller (a script fitting in a loop stops)."""
    import signal

    import sknpeff.decomposition._solvers as solvers
    from sknpeff.datasets import make_planted_diagonal

    if kind == "diagonal":
        X, _, _ = make_planted_diagonal(n_examples=120, n_params=400, n_components=4,
                                        support_size=60, random_state=0)
        est, name = DiagonalNPEFF(n_components=4, random_state=0, max_iter=50), "diag_loss"
        base = DiagonalNPEFF(n_components=2, random_state=0, max_iter=10, tol=0).fit(X)
    else:
        X, _, _ = make_planted_lowrank(n_examples=120, n_params=400, n_classes=3,
                                       n_components=4, support_size=40, random_state=0)
        est = LowRankNPEFF(n_components=4, n_classes=3, random_state=0, max_iter=50)
        name = "lowrank_loss"
        base = LowRankNPEFF(n_components=2, n_classes=3, random_state=0, max_iter=10,
                            tol=0).fit(X)
    real, calls = getattr(solvers, name), {"n": 0}

    def sigint_on_5th(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does
        return real(*args, **kwargs)

    monkeypatch.setattr(solvers, name, sigint_on_5th)
    fits = 0
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="interrupted"):
        for _ in range(3):  # the loop stops at the first Ctrl-C
            est.fit(X)
            fits += 1
    assert fits == 0
    assert 0 < est.n_iter_ < 50 and len(est.loss_curve_) == est.n_iter_
    assert est.transform(X).shape == (X.shape[0], 4)  # the kept state is usable
    # the expander keeps the interrupted expansion too, and re-raises
    calls["n"] = 0
    exp = ComponentExpander(base, n_new_components=2, random_state=0, max_iter=50)
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="interrupted"):
        exp.fit(X)
    assert np.array_equal(exp.components_[:2], base.components_.astype(X.dtype))
    assert exp.transform(X).shape == (X.shape[0], 4)


def test_new_components_are_not_seeded_on_frozen_ones():
    """A specialised set that still holds examples of the frozen components: the new
    components go to the planted ones the frozen set misses, for every seed."""
    X, W, G = make_planted_lowrank(n_examples=600, n_params=1200, n_classes=3,
                                   n_components=4, support_size=80, n_active=(1, 1),
                                   random_state=0)
    first = np.flatnonzero((W[:, 2:] == 0).all(axis=1))  # examples of g0, g1 only
    base = LowRankNPEFF(n_components=2, n_classes=3, random_state=0).fit(X[first])
    assert np.sort(np.abs(G[:2] @ base.components_.T).max(axis=1)).min() > 0.99
    for seed in (0, 1, 2):
        exp = ComponentExpander(base, n_new_components=2, random_state=seed).fit(X)
        cos = np.abs(G[2:] @ exp.components_[2:].T)  # (missing planted, new)
        assert cos.max(axis=1).min() > 0.99, (seed, cos)
