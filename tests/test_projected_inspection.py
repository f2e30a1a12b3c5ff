"""Expansion, per-layer inspection and the report on fits of randomly projected PEFs.

The reference is planted: sparse parameter-space components ``g_k`` whose entries lie in
known layers of a small model, and PEFs that are exact sums of ``w g_k g_k^T``. Their
projections ``R a`` are fitted (or just projected), and every per-layer answer must name
the planted layers.
"""

import re
from collections import OrderedDict

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.pipeline import Pipeline

from sknpeff import GuidedPerturber, PEFTransformer
from sknpeff.datasets import make_planted_diagonal
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from sknpeff.expansion import ComponentExpander
from sknpeff.inspection import (
    pseudo_fisher_cosines,
    report,
    top_parameters_by_component,
    top_parameters_by_layer,
)
from sknpeff.io import load_pefs, save_pefs
from sknpeff.layout import ParameterLayout
from sknpeff.pef import Projection, recover_components
from sknpeff.perturbation._estimators import unwrap
from sknpeff.perturbation._projected import find_projection
from sknpeff.utils import tag_pef_matrix
from tests._helpers import matched_cos

# short fits on purpose (errors, slices): their convergence is not what is tested
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

D = 400  # rows of R: a few times s log(n_params / s) for s = 16, n_params = 2060
RP = {"max_iter": 300, "n_stages": 4}  # recovery: shorter than the default, enough here
N_SLOTS = 2
# per planted component, its layers and their shares of its squared mass
PLANTED = [
    {"enc.weight": 1.0},
    {"mid.weight": 1.0},
    {"head.weight": 1.0},
    {"enc.bias": 0.7, "head.bias": 0.3},
]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(
        enc=torch.nn.Linear(40, 30), act=torch.nn.ReLU(), mid=torch.nn.Linear(30, 20),
        act2=torch.nn.ReLU(), head=torch.nn.Linear(20, 10))).eval()


def _planted_components(layout, seed=0):
    """Unit-norm ``g_k`` with 16 entries in all, each layer holding its planted share."""
    rng = np.random.default_rng(seed)
    G = np.zeros((len(PLANTED), layout.n_params))
    for k, layers in enumerate(PLANTED):
        for name, share in layers.items():
            t = layout.names.index(name)
            n_entries = 16 if len(layers) == 1 else (10 if share > 0.5 else 5)
            idx = layout.offsets[t] + rng.choice(layout.sizes[t], n_entries, replace=False)
            vals = rng.standard_normal(n_entries)
            G[k, idx] = vals * np.sqrt(share) / np.linalg.norm(vals)
    return G


def _pefs(G, components, n, seed):
    """``n`` low-rank PEFs (``N_SLOTS`` slots) of examples using one or two of
    ``components``: slot ``j`` is ``sqrt(w_j) g_{k_j}``, so ``F = sum_j w_j g g^T``."""
    rng = np.random.default_rng(seed)
    m = G.shape[1]
    A = np.zeros((n, N_SLOTS, m))
    for i in range(n):
        ks = rng.choice(components, size=rng.integers(1, N_SLOTS + 1), replace=False)
        for j, k in enumerate(ks):
            A[i, j] = np.sqrt(rng.uniform(0.5, 1.5)) * G[k]
    return A


def _project(A, R):
    """Tagged projected PEFs: every slot of ``A`` through ``R``, as PEFTransformer does."""
    n = A.shape[0]
    P = np.asarray(R.apply(torch.from_numpy(A.reshape(n * N_SLOTS, -1))))
    return tag_pef_matrix(P.reshape(n, -1).astype(np.float32), "low_rank", N_SLOTS,
                          R.description())


def _fit(P, r, seed=0, max_iter=200):
    return LowRankNPEFF(r, n_classes=N_SLOTS, random_state=seed, max_iter=max_iter).fit(P)


def _same(a, b):
    """Two top-parameter lists: the same names in the same order, the same shares (up to
    rounding: dense and sparse sums)."""
    assert [[n for n, _ in row] for row in a] == [[n for n, _ in row] for row in b]
    np.testing.assert_allclose([s for row in a for _, s in row],
                               [s for row in b for _, s in row], rtol=1e-9, atol=1e-12)


def _planted_top(k):
    return max(PLANTED[k], key=PLANTED[k].get)


@pytest.fixture(scope="module")
def setup():
    model = _model()
    inputs = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    pt = PEFTransformer(model, kind="low_rank", compression="projection", n_values=D,
                        projection_seed=0).fit(inputs)
    layout, R = pt.layout_, pt.projection_
    G = _planted_components(layout)
    A = _pefs(G, [0, 1, 2, 3], 160, seed=1)
    P = _project(A, R)
    est = _fit(P, 4)
    return model, pt, layout, R, G, A, P, est


@pytest.fixture(scope="module")
def recovered(setup):
    """The fitted components recovered in parameter space (dense rows)."""
    return recover_components(setup[-1], **RP).toarray()


def _match(H, R, G):
    """For each fitted projected component, the planted one it is (by |cos| with R g)."""
    RG = np.asarray(R.apply(torch.from_numpy(G)))
    C = np.abs(H @ RG.T) / np.outer(np.linalg.norm(H, axis=1), np.linalg.norm(RG, axis=1))
    return C.argmax(axis=1), C.max(axis=1)


# ---------------------------------------------------------------- top parameters
def test_top_parameters_of_projected_vectors(setup):
    model, pt, layout, R, G, *_ = setup
    H = np.asarray(R.apply(torch.from_numpy(G)))
    # the projection as the transformer holding it, or its description with layout=None
    # (the projection's); component 3 lies in two layers
    for k, projection, lay in ((2, pt, layout), (3, R.description(), None)):
        tops = top_parameters_by_layer(H[k], lay, k=len(layout.names), projection=projection,
                                       recovery_params=RP)
        assert tops[0][0] == _planted_top(k)
        for name, share in PLANTED[k].items():
            assert dict(tops)[name] == pytest.approx(share, abs=0.03)
    # a parameter-space vector is read as it is, with or without the projection
    assert top_parameters_by_layer(G[3], layout, projection=R) == \
        top_parameters_by_layer(G[3], layout)
    with pytest.raises(ValueError, match=f"length {layout.n_params} .* or {D} .*got 7"):
        top_parameters_by_layer(np.ones(7), layout, projection=R)
    with pytest.raises(ValueError, match="projection=<PEFTransformer>.projection_"):
        top_parameters_by_layer(H[0], layout)  # projected, but no projection given
    with pytest.raises(ValueError, match="recovery_params may not set"):
        top_parameters_by_layer(H[0], layout, projection=R,
                                recovery_params={"projection": R})
    with pytest.raises(ValueError, match="recovery_params: .*no_such"):
        top_parameters_by_layer(H[0], layout, projection=R, recovery_params={"no_such": 1})
    with pytest.raises(ValueError, match="projection must be"):
        top_parameters_by_layer(H[0], layout, projection="R")
    with pytest.raises(ValueError, match="layout must be given"):
        top_parameters_by_layer(G[0], None)
    other = ParameterLayout(["w"], [(7,)])
    with pytest.raises(ValueError, match="projection acts on 2060 parameters"):
        top_parameters_by_layer(np.ones(7), other, projection=R)


def test_top_parameters_by_component_of_a_projected_fit(setup, recovered):
    model, pt, layout, R, G, A, P, est = setup
    assert est.projection_.description() == R.description()
    which, cos = _match(est.components_, R, G)
    assert sorted(which) == [0, 1, 2, 3] and cos.min() > 0.98
    # layout=None: the projection's (found on the estimator)
    tops = top_parameters_by_component(est, k=len(layout.names), recovery_params=RP)
    assert len(tops) == 4
    for j, k in enumerate(which):
        assert tops[j][0][0] == _planted_top(k)
        for name, share in PLANTED[k].items():
            assert dict(tops[j])[name] == pytest.approx(share, abs=0.03)
    # against the recovered components read one by one
    _same(tops, [top_parameters_by_layer(g, layout, k=len(layout.names)) for g in recovered])
    # a GuidedPerturber: its recovered parameter_components_ and layout_
    gp = GuidedPerturber(est, model, recovery_params=RP)
    _same(top_parameters_by_component(gp, k=2), [t[:2] for t in tops])
    with pytest.raises(ValueError, match="already in parameter space"):
        top_parameters_by_component(gp, projection=R)
    bare = LowRankNPEFF(4, n_classes=N_SLOTS, max_iter=5).fit(np.asarray(P)[:40])  # untagged
    with pytest.raises(ValueError, match="layout must be given"):
        top_parameters_by_component(bare)
    with pytest.raises(ValueError, match="projection=<PEFTransformer>.projection_"):
        top_parameters_by_component(bare, layout)
    with pytest.raises(ValueError, match="LowRankNPEFF or DiagonalNPEFF"):
        top_parameters_by_component(object(), layout)


def test_top_parameters_by_component_unprojected():
    layout = ParameterLayout(["a", "b", "c"], [(30, 4), (50,), (10, 3)])
    # low rank: each component against its own row, read one by one
    G = _planted_components(ParameterLayout(
        ["enc.weight", "enc.bias", "mid.weight", "mid.bias", "head.weight", "head.bias"],
        [(30, 40), (30,), (20, 30), (20,), (10, 20), (10,)]))[:, :200]
    A = _pefs(G, [0, 1, 2, 3], 60, seed=0)
    X = tag_pef_matrix(sp.csr_matrix(A.reshape(60, -1)), "low_rank", N_SLOTS)
    lr = LowRankNPEFF(3, n_classes=N_SLOTS, random_state=0, max_iter=30).fit(X)
    _same(top_parameters_by_component(lr, layout, k=2),
          [top_parameters_by_layer(g, layout, k=2) for g in lr.components_])
    # diagonal: mass = |h| by default
    Xd, _, _ = make_planted_diagonal(n_examples=60, n_params=200, n_components=3,
                                     support_size=20, random_state=0)
    dg = DiagonalNPEFF(3, random_state=0, max_iter=30).fit(Xd)
    _same(top_parameters_by_component(dg, layout, k=3),
          [top_parameters_by_layer(h, layout, k=3, squared=False) for h in dg.components_])
    _same(top_parameters_by_component(dg, layout, squared=True),
          [top_parameters_by_layer(h, layout) for h in dg.components_])
    with pytest.raises(ValueError, match=r"shape \(3, 200\) but the layout has 7"):
        top_parameters_by_component(lr, ParameterLayout(["w"], [(7,)]))


# ---------------------------------------------------------------------- report
def test_report_of_a_projected_fit(setup, recovered, tmp_path):
    model, pt, layout, R, G, A, P, est = setup
    W = est.transform(P)
    tops = top_parameters_by_component(est, layout, k=1, recovery_params=RP)
    out = report(tmp_path / "r.html", W=W, components=est.components_,
                 top_parameters=tops, overview=False, k=4)
    page = open(out, encoding="utf-8").read()
    which, _ = _match(est.components_, R, G)
    for j, k in enumerate(which):
        # component j's section lists its planted top layer (and only the top one: k=1)
        section = page[page.index(f'id="c{j}"'):]
        nxt = section.find(f'id="c{j + 1}"')
        section = section if nxt < 0 else section[:nxt]
        listed = set(re.findall(r"(?:enc|mid|head)\.(?:weight|bias)", section))
        assert listed == {_planted_top(k)}, (j, listed)
    assert "mid.bias" not in page
    # the similarity of projected components (what the report shows for them)
    # approximates that of the parameter-space ones: E[R^T R] = I
    C_proj = pseudo_fisher_cosines(est.components_)
    C_true = pseudo_fisher_cosines(G)[np.ix_(which, which)]
    assert np.abs(C_proj - C_true).max() < 0.05
    C_rec = pseudo_fisher_cosines(recovered)
    assert np.abs(C_rec - C_true).max() < 0.01


# -------------------------------------------------------------------- expansion
@pytest.fixture(scope="module")
def expanded(setup):
    model, pt, layout, R, G, A, P, est = setup
    general = _project(_pefs(G, [0, 1], 80, seed=2), R)
    base = _fit(general, 2)
    # the specialised set: examples of the two planted components the base lacks
    special_A = _pefs(G, [2, 3], 80, seed=3)
    special = _project(special_A, R)
    exp = ComponentExpander(base, n_new_components=2, random_state=0, max_iter=200)
    exp.fit(special)
    return base, special_A, special, exp


def test_expansion_stays_in_the_projected_space(setup, expanded):
    model, pt, layout, R, G, A, P, est = setup
    base, special_A, special, exp = expanded
    assert exp.projection_ is exp.estimator_.projection_
    assert exp.projection_.description() == R.description()
    assert exp.components_.shape == (4, D)
    np.testing.assert_array_equal(exp.components_[:2], base.components_)
    # the frozen components are R g_0, R g_1; the new ones R g_2, R g_3
    which, cos = _match(exp.components_, R, G)
    assert set(which[:2]) == {0, 1} and set(which[2:]) == {2, 3} and cos.min() > 0.99
    W = exp.transform(P)
    assert W.shape == (160, 4) and np.all(np.isfinite(W))
    # the perturber finds R on the expander (and in a Pipeline of one) and recovers
    gp = GuidedPerturber(exp, model, recovery_params=RP)
    assert gp.projection_.description() == R.description()
    Gp = gp.parameter_components_
    assert Gp.shape == (4, layout.n_params)
    assert matched_cos(G, Gp).min() > 0.9
    assert np.linalg.norm(gp.perturbation(3)) == pytest.approx(0.1)
    pipe = Pipeline([("pef", pt), ("exp", exp)])
    for holder in (exp, pipe):
        found = find_projection(holder, unwrap(holder), None)
        assert found.description() == R.description()
    np.testing.assert_array_equal(
        GuidedPerturber(pipe, model, recovery_params=RP).perturbation(2),
        gp.perturbation(2))
    tops = top_parameters_by_component(gp, k=1)
    assert [t[0][0] for t in tops] == [_planted_top(k) for k in which]
    _same(top_parameters_by_component(pipe, k=1, recovery_params=RP), tops)


def test_expansion_refuses_other_pefs(setup, expanded, tmp_path):
    model, pt, layout, R, G, A, P, est = setup
    base, special_A, special, exp = expanded
    R2 = Projection.for_layout(layout, D, seed=1)
    other = _project(special_A, R2)
    with pytest.raises(ValueError, match=r"X holds PEFs projected by .*seed=1.*seed=0"):
        ComponentExpander(base, n_new_components=2).fit(other)
    # the projection travels through a store
    save_pefs(tmp_path / "other", other, kind="low_rank", n_classes=N_SLOTS)
    with pytest.raises(ValueError, match=r"X holds PEFs projected by .*seed=1.*seed=0"):
        ComponentExpander(base, n_new_components=2).fit(load_pefs(tmp_path / "other").pefs)
    save_pefs(tmp_path / "same", special, kind="low_rank", n_classes=N_SLOTS)
    stored = ComponentExpander(base, n_new_components=1, random_state=0, max_iter=20).fit(
        load_pefs(tmp_path / "same").pefs)
    assert stored.projection_.description() == R.description()
    unprojected = tag_pef_matrix(np.asarray(special).copy(), "low_rank", N_SLOTS)
    with pytest.raises(ValueError, match="X holds unprojected PEFs"):
        ComponentExpander(base, n_new_components=2).fit(unprojected)
    plain = _fit(unprojected, 2, max_iter=20)
    assert plain.projection_ is None
    with pytest.raises(ValueError, match="fitted on unprojected PEFs"):
        ComponentExpander(plain, n_new_components=1).fit(special)
    # an untagged slice is taken as given; the expansion keeps the base's projection
    sliced = ComponentExpander(base, n_new_components=1, random_state=0,
                               max_iter=20).fit(np.asarray(special)[:50])
    assert sliced.projection_.description() == R.description()
    assert sliced.estimator_.projection_ is sliced.projection_
    with pytest.raises(ValueError, match="projected by"):
        sliced.transform(other)
    # the base is untouched
    assert base.projection_.description() == R.description()
