"""Sigmoid outputs (a binary classifier with one logit, multi-label heads): exact
Bernoulli Fishers against a naive loop, and KL divergences of Bernoulli outputs."""

import numpy as np
import pytest
import torch
from torch import nn

from sknpeff import DiagonalNPEFF, GuidedPerturber, LowRankNPEFF, PEFTransformer
from sknpeff.utils import InvalidParameterError


def _model(n_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, n_out)).double().eval()


def _naive_bernoulli(model, X):
    """Dense (n, K, m) a_c = sqrt(s_c (1 - s_c)) grad z_c, slots by decreasing weight."""
    ps = list(model.parameters())
    out = []
    for x in X:
        z = model(x[None])[0]
        s = torch.sigmoid(z).detach()
        w = s * (1 - s)
        rows = []
        for c in torch.argsort(w, descending=True, stable=True).tolist():
            g = torch.autograd.grad(z[c], ps, retain_graph=True)
            rows.append(torch.sqrt(w[c]) * torch.cat([t.reshape(-1) for t in g]))
        out.append(torch.stack(rows).detach().numpy())
    return np.stack(out)


@pytest.mark.parametrize("n_out", [1, 3])
def test_sigmoid_pefs_exact(n_out):
    model = _model(n_out)
    X = torch.randn(8, 5, dtype=torch.float64)
    A = _naive_bernoulli(model, X)  # (n, K, m)
    output = "auto" if n_out == 1 else "sigmoid"
    lr = PEFTransformer(model, kind="low_rank", n_values=10**6, dtype="float64",
                        output=output).fit(X)
    assert lr.output_ == "sigmoid" and lr.n_classes_ == n_out
    res = lr.compute(X)
    S = np.einsum("ncm,ndm->ncd", A, A)
    norms = np.sqrt((S ** 2).sum((1, 2)))
    np.testing.assert_allclose(res.norms, norms, rtol=1e-10)
    want = A.reshape(len(X), -1) / np.sqrt(norms)[:, None]
    np.testing.assert_allclose(res.pefs.toarray(), want, rtol=1e-9, atol=1e-14)
    z = model(X).detach().numpy()
    if n_out == 1:
        np.testing.assert_array_equal(res.predictions, (z[:, 0] > 0).astype(int))
    diag = PEFTransformer(model, kind="diagonal", n_values=10**6, dtype="float64",
                          output=output).fit(X).compute(X)
    f = (A ** 2).sum(1)
    np.testing.assert_allclose(diag.pefs.toarray(), f / np.linalg.norm(f, axis=1)[:, None],
                               rtol=1e-9, atol=1e-14)


def test_one_logit_equals_two_softmax_logits():
    """sigmoid(z) is the softmax of [0, z]: the same Fisher, with one vector, not two."""
    model = _model(1)
    X = torch.randn(6, 5, dtype=torch.float64)
    one = PEFTransformer(model, kind="low_rank", n_values=10**6, dtype="float64").fit(X)
    two = PEFTransformer(model, kind="low_rank", n_values=10**6, dtype="float64",
                         forward=lambda m, b: torch.cat([torch.zeros_like(m(b)), m(b)], 1)
                         ).fit(X)
    r1, r2 = one.compute(X), two.compute(X)
    assert r1.pefs.shape[1] == one.n_params_ and r2.pefs.shape[1] == 2 * two.n_params_
    np.testing.assert_allclose(r1.norms, r2.norms, rtol=1e-10)
    A1 = r1.pefs.toarray()
    A2 = r2.pefs.toarray().reshape(len(X), 2, -1)
    F1 = np.einsum("ni,nj->nij", A1, A1)
    F2 = np.einsum("nci,ncj->nij", A2, A2)
    np.testing.assert_allclose(F1, F2, atol=1e-12)
    np.testing.assert_array_equal(r1.predictions, r2.predictions)


def test_min_class_prob_refused_for_sigmoid():
    model = _model(1)
    X = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(InvalidParameterError, match="min_class_prob applies to softmax"):
        PEFTransformer(model, kind="low_rank", min_class_prob=0.1).fit(X)
    with pytest.raises(InvalidParameterError, match="output must be one of"):
        PEFTransformer(model, output="probit").fit(X)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_guided_perturbation_of_a_binary_classifier(kind):
    """KL divergences of Bernoulli outputs (not a softmax over one logit, which is 0)."""
    model = _model(1, seed=1)
    X = torch.randn(120, 5, dtype=torch.float64)
    pt = PEFTransformer(model, kind=kind, n_values=40).fit(X)
    res = pt.compute(X)
    est = (LowRankNPEFF(n_components=3, n_classes=1, random_state=0, max_iter=50)
           if kind == "low_rank" else DiagonalNPEFF(n_components=3, random_state=0))
    W = est.fit_transform(res.pefs)
    gp = GuidedPerturber(est, model, layout=pt.layout_)
    if kind == "diagonal":
        gp.fit(X, W, random_state=0)
    kl = gp.kl_divergence(X, 0)
    with gp.perturbed(0) as _:
        z1 = model(X).detach()
    z0 = model(X).detach()
    s0, s1 = torch.sigmoid(z0), torch.sigmoid(z1)
    want = (s0 * (torch.log(s0) - torch.log(s1))
            + (1 - s0) * (torch.log1p(-s0) - torch.log1p(-s1)))[:, 0].numpy()
    np.testing.assert_allclose(kl, want, rtol=1e-6, atol=1e-15)
    assert kl.max() > 0
    r = gp.kl_ratio(X, 0, W=W, n_top=10, random_state=0,
                    labels=(z0[:, 0] > 0).long().numpy())
    assert np.isfinite(r.kl_ratio) and r.accuracy_change is not None
