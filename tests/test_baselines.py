"""Baselines (sknpeff.baselines) and the concept statistics (sknpeff.inspection)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from sknpeff.baselines import (
    ActivationKMeans,
    ActivationSAE,
    GradientClustering,
    angular_affinity,
)
from sknpeff.baselines._gradients import iter_log_prob_gradients
from sknpeff.datasets import make_gated_experts
from sknpeff.inspection import concept_purity, multi_factor_recall


def _mlp(seed=0, n_in=4, n_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 8), nn.Tanh(), nn.Linear(8, n_out)).eval()


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert not model.training


@pytest.fixture(scope="module")
def single_concept():
    """Gated experts whose examples use exactly one expert: clusters have one answer."""
    model, sample, _ = make_gated_experts(concepts_per_example=(1, 1), random_state=0)
    X, c = sample(240, random_state=1)
    return model, X, c


# -- the gated experts' additions ------------------------------------------------------------


def test_gated_experts_concepts_per_example_and_gated_hidden():
    model, sample, _ = make_gated_experts(concepts_per_example=(1, 3), random_state=0)
    X, c = sample(3000, random_state=0)
    counts = c.sum(1)
    assert counts.min() == 1 and counts.max() == 3
    np.testing.assert_allclose(np.bincount(counts)[1:] / 3000, [1 / 3] * 3, atol=0.03)
    np.testing.assert_allclose(c.mean(0), [2 / 6] * 6, atol=0.03)  # concepts uniform
    np.testing.assert_array_equal(X[:, :6].numpy(), c)
    # the default still draws independent bits (other examples rely on it)
    _, plain, _ = make_gated_experts(random_state=0)
    assert plain(3000, random_state=0)[1].sum(1).min() == 0
    # the output is still base + sum_e b_e * expert_e(x); gated_hidden sees b_e * hidden
    seen = []
    handle = model.gated_hidden.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = model(X[:50])
    handle.remove()
    with torch.no_grad():
        ref = model.base(X[:50])
        for e, ex in enumerate(model.experts):  # the forward before gated_hidden existed
            ref = ref + X[:50, e : e + 1] * ex(X[:50])
        hid = torch.cat([torch.tanh(ex[0](X[:50])) * X[:50, e : e + 1]
                         for e, ex in enumerate(model.experts)], 1)
    assert torch.equal(out, ref)
    torch.testing.assert_close(seen[0], hid)
    with pytest.raises(ValueError, match="concepts_per_example"):
        make_gated_experts(concepts_per_example=(2, 1))
    with pytest.raises(ValueError, match="concepts_per_example"):
        make_gated_experts(concepts_per_example=3)


# -- per-example gradients -------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["predicted", "true"])
def test_gradients_match_an_autograd_loop(labels):
    model = _mlp()
    X = torch.randn(11, 4)
    y = np.arange(11) % 3 if labels == "true" else None
    before = _state(model)
    G = torch.cat(list(iter_log_prob_gradients(model, X, y, batch_size=4)))
    _assert_untouched(model, before)
    for i in range(11):
        logits = model(X[i : i + 1])[0]
        lab = int(logits.argmax()) if y is None else int(y[i])
        grads = torch.autograd.grad(torch.log_softmax(logits, 0)[lab], list(model.parameters()))
        ref = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(G[i], ref, rtol=1e-5, atol=1e-6)


def test_gradients_text_batches_use_the_loop():
    # a list of strings cannot go through vmap: the per-example loop gives the same
    model = _mlp(n_in=2)
    texts = ["ab", "abc", "a", "bbbb", "ba"]

    def forward(m, batch):
        feats = torch.tensor([[len(t), t.count("b")] for t in batch], dtype=torch.float32)
        return m(feats)

    G = torch.cat(list(iter_log_prob_gradients(model, texts, forward=forward, batch_size=2)))
    Gref = torch.cat(list(iter_log_prob_gradients(
        model, torch.tensor([[len(t), t.count("b")] for t in texts], dtype=torch.float32))))
    torch.testing.assert_close(G, Gref, rtol=1e-5, atol=1e-6)


def test_one_logit_is_bernoulli():
    model = _mlp(n_out=1)
    X = torch.randn(6, 4)
    G = torch.cat(list(iter_log_prob_gradients(model, X)))
    for i in range(6):
        z = model(X[i : i + 1])[0, 0]
        lp = torch.nn.functional.logsigmoid(z if z > 0 else -z)
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lp, list(model.parameters()))])
        torch.testing.assert_close(G[i], ref, rtol=1e-5, atol=1e-6)


# -- GradientClustering -------------------------------------------------------------------------


def test_angular_affinity_formula():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((5, 3))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    ref = [[1 - np.arccos(np.clip(a @ b, -1, 1)) / np.pi for b in A] for a in A]
    np.testing.assert_allclose(angular_affinity(A, A), ref, atol=1e-12)


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_gradient_clustering_is_sklearn_on_the_unit_gradients(single_concept, method):
    model, X, c = single_concept
    before = _state(model)
    gc = GradientClustering(model, n_components=6, method=method, random_state=0).fit(X)
    _assert_untouched(model, before)
    # by hand: autograd-loop gradients, unit rows, the fitted projection, unit rows again
    G = []
    for i in range(len(X)):
        logits = model(X[i : i + 1])[0]
        lp = torch.log_softmax(logits, 0)[int(logits.argmax())]
        G.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            lp, list(model.parameters()))]).double().numpy())
    U = np.array(G)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    U = gc.projection_.transform(U)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    seed = type(gc.clusterer_)(**gc.clusterer_.get_params())  # same seeds and settings
    ref = seed.fit(angular_affinity(U, U) if method == "spectral" else U)
    assert adjusted_rand_score(ref.labels_, gc.labels_) == 1.0
    W = gc.transform(X)
    assert W.shape == (240, 6) and (W >= 0).all() and (W <= 1).all()
    assert ((W > 0).sum(axis=1) == 1).all()
    # the coefficient is the angular affinity to the own cluster's unit mean direction
    C = np.stack([U[gc.labels_ == j].mean(0) for j in range(6)])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    A = angular_affinity(U, C)
    np.testing.assert_allclose(W.max(1), A[np.arange(240), W.argmax(1)], atol=1e-9)
    if method == "spectral":  # held-out rule: the cluster of highest affinity
        np.testing.assert_array_equal(W.argmax(1), A.argmax(1))
    soft = GradientClustering(model, n_components=6, method=method, coefficients="soft",
                              random_state=0).fit(X).transform(X)
    np.testing.assert_allclose(soft, A, atol=1e-9)
    # one expert per example: clusters' top examples mostly share an expert (gradients
    # also split by predicted class, so not perfectly)
    pur = concept_purity(W, c)
    assert pur.purity > pur.random_purity + 0.3


def test_gradient_clustering_unprojected_and_true_labels(single_concept):
    model, X, c = single_concept
    y = model(X).argmax(1).numpy()
    a = GradientClustering(model, n_components=6, n_projections=None, target="true",
                           random_state=0).fit(X, y)
    assert a.projection_ is None and a.cluster_centers_.shape == (6, a.layout_.n_params)
    b = GradientClustering(model, n_components=6, n_projections=None,
                           random_state=0).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)  # true = predicted labels here
    with pytest.raises(ValueError, match="target='true' needs the labels y"):
        a.transform(X)
    assert a.transform(X, y).shape == (240, 6)


def test_gradient_clustering_bad_input():
    model = _mlp()
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        GradientClustering(model, method="dbscan").fit(X)
    with pytest.raises(ValueError, match="n_samples=10 should be >= n_components=12"):
        GradientClustering(model, n_components=12).fit(X)
    with pytest.raises(ValueError, match="training mode"):
        GradientClustering(copy.deepcopy(model).train()).fit(X)
    with pytest.raises(ValueError, match="y must hold labels in"):
        GradientClustering(model, n_components=2, target="true").fit(X, np.full(10, 7))
    with pytest.raises(ValueError, match="X has 5 features"):
        GradientClustering(model, n_components=2).fit(X).transform(np.zeros((3, 5)))


# -- ActivationKMeans ---------------------------------------------------------------------------


def test_activation_kmeans_matches_sklearn_on_the_hooked_layer(single_concept):
    model, X, c = single_concept
    before = _state(model)
    km = ActivationKMeans(model, "gated_hidden", n_components=6, random_state=0).fit(X)
    _assert_untouched(model, before)
    # the activations, computed by hand: experts' hidden activations times their bits
    with torch.no_grad():
        Z = torch.cat([torch.tanh(e[0](X)) * X[:, i : i + 1]
                       for i, e in enumerate(model.experts)], 1).double().numpy()
    ref = KMeans(n_clusters=6, n_init=10, random_state=0).fit(Z)
    assert adjusted_rand_score(ref.labels_, km.labels_) == 1.0
    W = km.transform(X)
    d2 = ((Z[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)
    s = ref.inertia_ / len(Z)
    np.testing.assert_allclose(km.scale_, s, rtol=1e-6)
    expect = np.where(d2 == d2.min(1, keepdims=True), np.exp(-d2 / km.scale_), 0.0)
    np.testing.assert_allclose(W, expect, rtol=1e-6, atol=1e-12)
    # top examples of a cluster are its members, nearest first
    j = 0
    order = np.argsort(-W[:, j])[: (km.labels_ == j).sum()]
    assert set(order) == set(np.flatnonzero(km.labels_ == j))
    assert np.all(np.diff(d2[order, j]) >= -1e-9)


class _Seq(nn.Module):
    """Tokens -> embeddings (batch, positions, features) -> mean -> logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 5)
        self.act = nn.ReLU()
        self.out = nn.Linear(5, 2)

    def forward(self, ids):
        return self.out(self.act(self.emb(ids)).mean(1))


def _pool_ref(a, pool):
    """Reference pooling over axis 1 of a NumPy or torch array."""
    if pool == "last":
        return a[:, -1]
    if pool == "mean":
        return a.mean(1)
    return a.amax(1) if isinstance(a, torch.Tensor) else a.max(1)


@pytest.mark.parametrize("pool", ["mean", "max", "last"])
def test_sequence_activations_are_pooled_over_positions(pool):
    model = _Seq().eval()
    ids = torch.randint(0, 10, (30, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        A = torch.relu(model.emb(ids))
    Z = _pool_ref(A, pool).double().numpy()
    km = ActivationKMeans(model, "act", n_components=3, pool=pool, random_state=0).fit(ids)
    ref = KMeans(n_clusters=3, n_init=10, random_state=0).fit(Z)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-5, atol=1e-7)
    # the SAE encodes every position, then pools its latents
    sae = ActivationSAE(model, "act", n_components=4, pool=pool, max_iter=5,
                        random_state=0).fit(ids)
    F = np.maximum((A.double().numpy() * sae.scale_ - sae.b_dec_) @ sae.W_enc_.T + sae.b_enc_,
                   0)
    ref_W = _pool_ref(F, pool)
    np.testing.assert_allclose(sae.transform(ids), ref_W, rtol=1e-5, atol=1e-6)


def test_activation_layer_errors():
    model = _mlp()
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="layer 'nope' is not a module"):
        ActivationKMeans(model, "nope", n_components=2).fit(X)
    with pytest.raises(ValueError, match="layer must be a module name"):
        ActivationKMeans(model, [], n_components=2).fit(X)
    with pytest.raises(ValueError, match="pool must be one of"):
        ActivationSAE(model, "1", pool="sum").fit(X)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="ran 2 times"):
        ActivationKMeans(Twice().eval(), "lin", n_components=2).fit(X)
    with pytest.raises(ValueError, match="NaN or inf"):
        ActivationKMeans(model, "1", n_components=2).fit(torch.full((5, 4), float("nan")))


# -- ActivationSAE ------------------------------------------------------------------------------


def test_sae_learns_a_sparse_dictionary_of_the_experts():
    model, sample, _ = make_gated_experts(concepts_per_example=(1, 2), random_state=0)
    X, c = sample(600, random_state=1)
    before = _state(model)
    sae = ActivationSAE(model, "gated_hidden", n_components=6, max_iter=150,
                        random_state=0).fit(X)
    _assert_untouched(model, before)
    W = sae.transform(X)
    assert (W >= 0).all() and W.shape == (600, 6)
    # by hand: the scaled activations and the encoder's formula
    with torch.no_grad():
        Z = torch.cat([torch.tanh(e[0](X)) * X[:, i : i + 1]
                       for i, e in enumerate(model.experts)], 1).double().numpy()
    np.testing.assert_allclose(sae.scale_, np.sqrt(Z.shape[1]) / np.linalg.norm(Z, axis=1).mean(),
                               rtol=1e-5)
    F = np.maximum((Z * sae.scale_ - sae.b_dec_) @ sae.W_enc_.T + sae.b_enc_, 0)
    np.testing.assert_allclose(W, F, rtol=1e-4, atol=1e-5)
    # trained: the loss ends well below that of reconstructing every vector by the mean
    assert sae.loss_curve_[-1] < 0.9 * (Z * sae.scale_).var(axis=0).sum()
    assert sae.loss_curve_[-1] < sae.loss_curve_[0]
    # latents follow the experts, and an example of two experts lights up both often
    mfr, pur = multi_factor_recall(W, c), concept_purity(W, c)
    assert mfr.recall > mfr.random_recall + 0.1
    assert pur.purity > pur.random_purity + 0.3


# -- concept statistics --------------------------------------------------------------------------


def test_concept_purity_by_hand():
    C = np.zeros((8, 3), dtype=bool)
    C[[0, 1, 2], 0] = True
    C[[3, 4], 1] = True
    C[:7, 2] = True  # near-universal: never a label
    W = np.zeros((8, 2))
    W[[0, 1, 2], 0] = [3, 2, 1]
    W[[3, 4, 0], 1] = [3, 2, 1]
    res = concept_purity(W, C, n_top=3, max_base_rate=0.5)
    assert res.eligible.tolist() == [True, True, False]
    assert res.best_concept.tolist() == [0, 1]
    np.testing.assert_allclose(res.share, [1.0, 2 / 3])
    assert res.pure.tolist() == [True, False] and res.pure_fraction == 0.5
    # a component with fewer positive coefficients than n_top cannot be pure
    W2 = W.copy()
    W2[2, 0] = 0
    assert concept_purity(W2, C, n_top=3).share[0] == pytest.approx(2 / 3)
    # chance: random sets of 3 of 8 examples, best eligible share, by enumeration
    from itertools import combinations

    exact = np.mean([max(C[list(s), 0].mean(), C[list(s), 1].mean())
                     for s in combinations(range(8), 3)])
    res = concept_purity(W, C, n_top=3, n_random=4000, random_state=0)
    assert abs(res.random_purity - exact) < 0.02


def test_multi_factor_recall_by_hand_and_chance():
    rng = np.random.default_rng(0)
    n, k = 400, 4
    C = np.zeros((n, k), dtype=bool)
    for i in range(n):
        C[i, rng.choice(k, size=rng.integers(1, 3), replace=False)] = True
    additive = C * rng.uniform(1, 2, size=C.shape)
    res = multi_factor_recall(additive, C)
    assert res.recall == 1.0 and res.all_recovered == 1.0
    assert res.component_concepts.tolist() == [0, 1, 2, 3]
    assert res.n_examples == (C.sum(1) >= 2).sum()
    # two random components out of 4 with distinct labels hold a given pair w.p. 1/6,
    # each one of its concepts w.p. 1/2: chance recall 1/2, all recovered 1/6
    assert abs(res.random_recall - 0.5) < 0.03
    assert abs(res.random_all_recovered - 1 / 6) < 0.03
    # one cluster per example: at most one of two concepts
    hard = np.where(additive == additive.max(1, keepdims=True), additive, 0)
    res = multi_factor_recall(hard, C)
    assert res.recall == 0.5 and res.all_recovered == 0.0
    # allowing one extra component does not help a one-hot row
    assert multi_factor_recall(hard, C, n_extra=1).recall == 0.5
    np.testing.assert_array_equal(res.example_index, np.flatnonzero(C.sum(1) >= 2))


def test_concept_statistics_bad_input():
    W = np.ones((4, 2))
    C = np.eye(4, 2, dtype=bool)
    with pytest.raises(ValueError, match="concepts must have shape"):
        concept_purity(W, C[:3])
    with pytest.raises(ValueError, match="non-negative"):
        concept_purity(-W, C)
    with pytest.raises(ValueError, match="n_top must be"):
        concept_purity(W, C, n_top=9)
    with pytest.raises(ValueError, match="no example carries 2 or more"):
        multi_factor_recall(W, C, n_top=1)
    with pytest.raises(ValueError, match="concepts must be boolean"):
        concept_purity(W, C * 2)


# -- scikit-learn's checks ------------------------------------------------------------------------


class _AnyWidth(nn.Module):
    """Reads inputs of any width (two summary features), as scikit-learn's checks need."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(2, 4)
        self.act = nn.Tanh()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        x = x.to(self.hidden.weight.dtype)
        feats = torch.stack([x.mean(1), (x ** 2).mean(1)], dim=1)
        return self.out(self.act(self.hidden(feats)))


_MODEL = _AnyWidth().eval()


_ESTIMATORS = [
    GradientClustering(_MODEL, n_components=3, random_state=0),
    GradientClustering(_MODEL, n_components=3, method="kmeans", random_state=0),
    ActivationKMeans(_MODEL, "act", n_components=3, random_state=0),
    ActivationSAE(_MODEL, "act", n_components=3, max_iter=3, random_state=0),
]


def _expected_failed_checks(estimator):
    return {
        # joblib.hash of a torch module differs from that of its deepcopy even when
        # nothing touches it, so this check cannot tell; that the model is left alone
        # (state, gradients, hooks, mode) is tested above (_assert_untouched)
        "check_estimators_overwrite_params": "joblib.hash of a torch module is not "
                                             "stable under deepcopy",
    }


@parametrize_with_checks(_ESTIMATORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    with warnings.catch_warnings():
        # tiny random check data: disconnected affinity graphs, few distinct points
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


def test_layer_outputs_of_tuples_and_dicts():
    from sknpeff.baselines._base import layer_output_tensor

    t = torch.ones(2, 3)
    assert layer_output_tensor((t, (t, t))) is t
    assert layer_output_tensor({"hidden": t, "n": 3}) is t

    class Out:
        last_hidden_state = t

    assert layer_output_tensor(Out()) is t
    with pytest.raises(ValueError, match="holds no activations tensor"):
        layer_output_tensor(3, "x")

    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.lstm(x)[0][:, -1])

    model = LSTMNet().eval()
    X = torch.randn(12, 5, 3)
    with torch.no_grad():
        ref = model.lstm(X)[0].mean(1).double().numpy()
    km = ActivationKMeans(model, "lstm", n_components=2, random_state=0).fit(X)
    np.testing.assert_allclose(km.cluster_centers_,
                               KMeans(2, n_init=10, random_state=0).fit(ref).cluster_centers_,
                               rtol=1e-5, atol=1e-7)
