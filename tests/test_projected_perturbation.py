"""GuidedPerturber on fits of randomly projected PEFs (components recovered through R)."""

import copy

import numpy as np
import pytest
from sklearn.pipeline import Pipeline, make_pipeline

from sknpeff import GuidedPerturber, LowRankNPEFF, PEFTransformer
from sknpeff.datasets import make_gated_experts
from sknpeff.pef import Projection


@pytest.fixture(scope="module")
def fitted():
    model, sample, _ = make_gated_experts(random_state=0)
    X, _ = sample(200, random_state=0)
    pt = PEFTransformer(model, kind="low_rank", compression="projection", n_values=512,
                        projection_seed=1)
    pipe = make_pipeline(pt, LowRankNPEFF(n_components=4, n_classes=3, random_state=0,
                                          max_iter=40, tol=1e-2))
    W = pipe.fit_transform(X)
    return model, X, pipe, W


@pytest.fixture(scope="module")
def recovered(fitted):
    model, X, pipe, W = fitted
    return GuidedPerturber(pipe, model)


def _planted(proj, r=4, s=4, seed=0):
    """Sparse parameter-space components and their exact projections ``R g``."""
    rng = np.random.default_rng(seed)
    G = np.zeros((r, proj.n_params))
    for k in range(r):
        G[k, rng.choice(proj.n_params, s, replace=False)] = rng.normal(size=s)
    return G, np.asarray(proj.apply(G))


def test_direction_matches_known_parameter_space_components(fitted):
    model, X, pipe, W = fitted
    proj = pipe[0].projection_
    G, H = _planted(proj)
    est = copy.copy(pipe[-1])
    est.components_ = H.astype(np.float32)
    projected = Pipeline([("pef", pipe[0]), ("npeff", est)])
    # the reference: a top-K-shaped estimator holding the exact g_k
    exact = copy.copy(pipe[-1])
    exact.components_ = G
    exact.projection_ = None  # the fitted estimator records its PEFs' projection
    gp = GuidedPerturber(projected, model, max_cosine=0.9)
    ref = GuidedPerturber(exact, model, layout=pipe[0].layout_, max_cosine=0.9)
    assert gp.projection_ is not None and ref.projection_ is None
    assert np.all(gp.recovery_residuals_ < 0.02)
    for j in range(G.shape[0]):
        a, b = gp.perturbation(j), ref.perturbation(j)
        assert np.linalg.norm(a) == pytest.approx(0.1)
        assert abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    # the adjoint R^T h is no recovery: far from g
    naive = np.asarray(proj.adjoint(H))[0]
    assert abs(naive @ G[0]) / (np.linalg.norm(naive) * np.linalg.norm(G[0])) < 0.9
    # the same through an explicit projection= on the bare estimator, and kl_ratios agree
    gp2 = GuidedPerturber(projected[-1], model, projection=proj.description())
    np.testing.assert_allclose(gp2.perturbation(1), gp.perturbation(1), atol=1e-12)
    ka = gp.kl_ratios(X, W, n_top=16, random_state=0).kl_ratio
    kb = ref.kl_ratios(X, W, n_top=16, random_state=0).kl_ratio
    np.testing.assert_allclose(ka, kb, rtol=0.05)


def test_projected_pipeline_end_to_end(fitted):
    model, X, pipe, W = fitted
    gp = GuidedPerturber(pipe, model, magnitude="auto", recovery_params={"alpha": 1e-2})
    assert gp.parameter_components_.shape == (4, pipe[0].n_params_)
    G = gp.parameter_components_
    assert gp._components() is G  # recovered once, cached
    res = gp.kl_ratios(X, n_top=16, random_state=0)
    assert gp.parameter_components_ is G  # kl_ratios re-validates without recovering again
    assert np.all(np.isfinite(res.kl_ratio))
    top = np.array([res[j].top_kl for j in range(4)])
    assert np.all((top > 0.04) & (top < 0.25))  # magnitude="auto" reached kl_target


def test_errors(fitted):
    model, X, pipe, W = fitted
    # the fitted estimator finds its projection itself (projection_, from the PEFs' tag)
    assert GuidedPerturber(pipe[-1], model).projection_ is not None
    bare = copy.copy(pipe[-1])
    bare.projection_ = None  # e.g. fitted on a slice of the PEFs, which drops the tag
    with pytest.raises(ValueError, match="projection=<PEFTransformer>.projection_"):
        GuidedPerturber(bare, model, layout=pipe[0].layout_)
    with pytest.raises(ValueError, match="projection must be"):
        GuidedPerturber(pipe[-1], model, projection="nope")
    other = Projection.for_layout(pipe[0].layout_, 128, seed=0)
    with pytest.raises(ValueError, match="projection has 128"):
        GuidedPerturber(pipe[-1], model, projection=other)
    with pytest.raises(ValueError, match="recovery_params may not set"):
        GuidedPerturber(pipe, model, recovery_params={"projection": None})
    with pytest.raises(ValueError, match="recovery_params"):
        GuidedPerturber(pipe, model, recovery_params={"no_such": 1})
    with pytest.raises(ValueError, match="recovery_params must be"):
        GuidedPerturber(pipe, model, recovery_params=[1])


def test_top_parameters_by_layer_of_recovered_components(fitted, recovered):
    from sknpeff.inspection import top_parameters_by_layer

    model, X, pipe, W = fitted
    gp = recovered
    layout = pipe[0].layout_
    g = gp.parameter_components_[0]
    shares = dict(top_parameters_by_layer(g, layout, k=len(layout.names)))
    # against a direct per-tensor sum of squares
    for name, off, size in zip(layout.names, layout.offsets, layout.sizes, strict=True):
        assert shares[name] == pytest.approx(np.sum(g[off:off + size] ** 2) / np.sum(g**2))
    with pytest.raises(ValueError, match="recover_components"):
        top_parameters_by_layer(pipe[-1].components_[0], layout)


def test_adjoint_recovery_acts_as_the_projected_component(fitted):
    model, X, pipe, W = fitted
    gp = GuidedPerturber(pipe, model, recovery="adjoint")
    assert gp.recovery_residuals_ is None
    proj, H = pipe[0].projection_, np.asarray(pipe[-1].components_, dtype=np.float64)
    # a . R^T h = (R a) . h for any per-parameter vector a
    A = np.random.default_rng(0).normal(size=(3, proj.n_params))
    np.testing.assert_allclose(A @ gp.parameter_components_.T,
                               np.asarray(proj.apply(A)) @ H.T, rtol=1e-9, atol=1e-9)
    assert np.linalg.norm(gp.perturbation(0)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="recovery"):
        GuidedPerturber(pipe, model, recovery="dense")


def test_auto_recovery_follows_parameters_per_dimension(fitted, monkeypatch):
    from sknpeff.perturbation import _projected

    model, X, pipe, W = fitted
    proj = pipe[0].projection_
    assert proj.n_params <= 16 * proj.n_components  # 981 parameters, d = 512
    auto = GuidedPerturber(pipe, model)
    assert auto.recovery == "auto" and auto.recovery_ == "sparse"
    sparse = GuidedPerturber(pipe, model, recovery="sparse")
    np.testing.assert_array_equal(auto.parameter_components_, sparse.parameter_components_)
    # a model with more parameters per projected dimension than the limit: the adjoint
    monkeypatch.setattr(_projected, "SPARSE_RECOVERY_MAX_RATIO", 1)
    big = GuidedPerturber(pipe, model)
    assert big.recovery_ == "adjoint" and big.recovery_residuals_ is None
    adjoint = GuidedPerturber(pipe, model, recovery="adjoint")
    np.testing.assert_array_equal(big.parameter_components_, adjoint.parameter_components_)
    # an explicit choice is kept whatever the ratio
    assert GuidedPerturber(pipe, model, recovery="sparse").recovery_ == "sparse"
    # top-K PEFs: no recovery
    top = PEFTransformer(model, kind="low_rank", n_values=64).fit(X)
    est = LowRankNPEFF(n_components=2, n_classes=top.n_classes_, max_iter=5,
                       random_state=0).fit(top.transform(X))
    assert GuidedPerturber(est, model, layout=top.layout_).recovery_ is None


def test_projection_and_layout_must_match(fitted):
    from sknpeff.layout import ParameterLayout

    model, X, pipe, W = fitted
    sub = ParameterLayout.from_model(model, params=list(pipe[0].layout_.names[1:]))
    with pytest.raises(ValueError, match="same PEFTransformer"):
        GuidedPerturber(pipe[-1], model, layout=sub, projection=pipe[0].projection_)


def test_projection_read_from_the_estimator(fitted, recovered):
    model, X, pipe, W = fitted
    est = copy.copy(pipe[-1])
    est.projection_ = pipe[0].projection_.description()  # as a fitted estimator may carry
    gp = GuidedPerturber(est, model)  # the layout comes with the projection
    np.testing.assert_array_equal(gp.perturbation(2),
                                  recovered.perturbation(2))
