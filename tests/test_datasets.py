"""Tests for sknpeff.datasets."""

import numpy as np
import pytest
import scipy.sparse as sp

from sknpeff.datasets import make_planted_diagonal, make_planted_lowrank


def _dense_pef(X, i, n_classes, n_params):
    A = X[i].toarray().reshape(n_classes, n_params)
    return A.T @ A


@pytest.mark.parametrize("normalize", [True, False])
def test_planted_lowrank_exact(normalize):
    n, m, c, r = 12, 40, 3, 5
    X, W, G = make_planted_lowrank(
        n_examples=n,
        n_params=m,
        n_classes=c,
        n_components=r,
        support_size=8,
        normalize=normalize,
        random_state=0,
        dtype=np.float64,
    )
    assert sp.isspmatrix_csr(X) and X.shape == (n, c * m) and X.dtype == np.float64
    assert X.has_sorted_indices and np.all(X.data != 0)
    assert W.shape == (n, r) and G.shape == (r, m)
    assert np.all(W >= 0)
    np.testing.assert_allclose(np.linalg.norm(G, axis=1), 1.0, atol=1e-12)
    assert np.all((G != 0).sum(axis=1) == 8)
    n_act = (W > 0).sum(axis=1)
    assert n_act.min() >= 1 and n_act.max() <= 3
    for i in range(n):
        F = _dense_pef(X, i, c, m)
        F_planted = (G.T * W[i]) @ G
        np.testing.assert_allclose(F, F_planted, atol=1e-6)
        if normalize:
            assert abs(np.linalg.norm(F) - 1.0) < 1e-6
    # The stored vectors are mixed: not simply the (scaled) planted components.
    A0 = X[0].toarray().reshape(c, m)
    k = np.flatnonzero(W[0])
    cos = np.abs(A0 @ G[k].T) / (np.linalg.norm(A0, axis=1)[:, None] + 1e-30)
    assert not np.all(np.isclose(cos.max(axis=1)[np.linalg.norm(A0, axis=1) > 0], 1.0))


def test_planted_lowrank_defaults_and_determinism():
    X, W, G = make_planted_lowrank(random_state=3)
    assert X.shape == (600, 9000) and X.dtype == np.float32
    assert W.dtype == np.float32 and G.dtype == np.float32
    X2, W2, G2 = make_planted_lowrank(random_state=3)
    assert (X != X2).nnz == 0
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(G, G2)
    X3, _, _ = make_planted_lowrank(random_state=4)
    assert (X != X3).nnz > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_active": (1, 4)}, "n_active"),
        ({"n_active": (3, 2)}, "n_active"),
        ({"n_active": 2}, "n_active"),
        ({"support_size": 5000}, "support_size"),
        ({"n_examples": 0}, "n_examples"),
        ({"dtype": np.int32}, "dtype"),
    ],
)
def test_planted_lowrank_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_planted_lowrank(**kwargs)


@pytest.mark.parametrize("normalize", [True, False])
def test_planted_diagonal_exact(normalize):
    X, W, H = make_planted_diagonal(
        n_examples=30,
        n_params=60,
        n_components=6,
        support_size=10,
        normalize=normalize,
        random_state=1,
        dtype=np.float64,
    )
    assert sp.isspmatrix_csr(X) and X.shape == (30, 60)
    assert X.has_sorted_indices and np.all(X.data > 0)
    assert np.all(W >= 0) and np.all(H >= 0)
    np.testing.assert_allclose(np.linalg.norm(H, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(X.toarray(), W @ H, atol=1e-12)
    n_act = (W > 0).sum(axis=1)
    assert n_act.min() >= 1 and n_act.max() <= 3
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(X.toarray(), axis=1), 1.0, atol=1e-12)


def test_planted_diagonal_defaults_and_determinism():
    X, W, H = make_planted_diagonal(random_state=0)
    assert X.shape == (800, 4000) and X.dtype == np.float32
    X2, W2, H2 = make_planted_diagonal(random_state=0)
    assert (X != X2).nnz == 0
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(H, H2)
    with pytest.raises(ValueError, match="n_active"):
        make_planted_diagonal(n_components=2, n_active=(1, 3))


# ------------------------------------------------------------------------------------------
# Digits
# ------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")

from sknpeff.datasets import (  # noqa: E402
    load_digits_split,
    make_digits_cnn,
    make_gated_experts,
    train_digits_cnn,
)


@pytest.fixture(scope="module")
def trained_digits():
    return train_digits_cnn(random_state=0)


def test_load_digits_split():
    split = load_digits_split(test_size=0.25, random_state=0)
    assert split.X_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert tuple(split.X_train.shape[1:]) == (1, 8, 8)
    assert split.X_train.shape[0] + split.X_test.shape[0] == 1797
    assert split.X_test.shape[0] == 450
    assert float(split.X_train.min()) >= 0.0 and float(split.X_train.max()) <= 1.0
    assert float(split.X_train.max()) == 1.0
    again = load_digits_split(test_size=0.25, random_state=0)
    assert torch.equal(split.X_test, again.X_test)
    assert torch.equal(split.y_test, again.y_test)
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=1.5)


def test_make_digits_cnn_deterministic():
    state = torch.random.get_rng_state()
    a, b = make_digits_cnn(0), make_digits_cnn(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert sum(p.numel() for p in a.parameters()) == 3818
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = make_digits_cnn(1)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_train_digits_cnn_accuracy(trained_digits):
    model, split = trained_digits
    assert not model.training
    with torch.no_grad():
        acc = (model(split.X_test).argmax(1) == split.y_test).float().mean().item()
    assert acc >= 0.95
    assert split.test_accuracy == pytest.approx(acc)


def test_train_digits_cnn_deterministic(trained_digits):
    model, _ = trained_digits
    model2, _ = train_digits_cnn(random_state=0)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6)


def test_train_digits_cnn_bad_input():
    with pytest.raises(ValueError, match="epochs"):
        train_digits_cnn(epochs=0)
    with pytest.raises(ValueError, match="learning_rate"):
        train_digits_cnn(learning_rate=-1.0)


# ------------------------------------------------------------------------------------------
# Gated experts
# ------------------------------------------------------------------------------------------


def test_gated_experts_structure():
    model, sample, expert_params = make_gated_experts(random_state=0)
    assert not model.training
    names = dict(model.named_parameters())
    blocks = [set(v) for v in expert_params.values()]
    assert len(blocks) == 6
    for i, bi in enumerate(blocks):
        assert bi <= names.keys()
        for bj in blocks[i + 1 :]:
            assert not bi & bj
    shared = names.keys() - set().union(*blocks)
    assert shared == {"base.bias"}
    X, concepts = sample(50, random_state=0)
    assert X.dtype == torch.float32 and X.shape == (50, 16)
    assert concepts.shape == (50, 6) and set(np.unique(concepts)) <= {0, 1}
    np.testing.assert_array_equal(X[:, :6].numpy(), concepts)
    X2, c2 = sample(50, random_state=0)
    assert torch.equal(X, X2) and np.array_equal(concepts, c2)


def test_gated_experts_ground_truth():
    model, sample, expert_params = make_gated_experts(random_state=0)
    X, concepts = sample(600, random_state=1)
    with torch.no_grad():
        logits = model(X)
    for e, names in expert_params.items():
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names:
                    p.zero_()
            logits_zeroed = model(X)
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        on = concepts[:, e] == 1
        assert on.sum() > 50
        # Bit off: the expert is unused, outputs are bit-for-bit unchanged.
        assert torch.equal(logits_zeroed[~on], logits[~on])
        # Bit on: every output moves, and many predictions change.
        assert torch.all((logits_zeroed[on] != logits[on]).any(dim=1))
        changed = (logits_zeroed[on].argmax(1) != logits[on].argmax(1)).float().mean()
        assert changed > 0.15


def test_gated_experts_gradient_support():
    model, sample, expert_params = make_gated_experts(random_state=2)
    X, concepts = sample(8, random_state=3)
    for i in range(8):
        model.zero_grad()
        torch.log_softmax(model(X[i : i + 1]), dim=1)[0, 0].backward()
        for e, names in expert_params.items():
            grads = [dict(model.named_parameters())[n].grad for n in names]
            used = any(g is not None and bool(torch.any(g != 0)) for g in grads)
            assert used == bool(concepts[i, e])


def test_gated_experts_bad_input():
    with pytest.raises(ValueError, match="concept_prob"):
        make_gated_experts(concept_prob=1.5)
    with pytest.raises(ValueError, match="n_classes"):
        make_gated_experts(n_classes=1)


def _diagonal_pefs(model, X, n_classes):
    """Exact normalized D-PEFs of ``model`` on ``X`` (torch.func), and the flat offsets."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def log_prob(pr, x, j):
        return torch.log_softmax(functional_call(model, pr, (x[None],)), -1)[0, j]

    with torch.no_grad():
        probs = torch.softmax(model(X), -1)
    D = torch.zeros(X.shape[0], sum(p.numel() for p in params.values()), dtype=torch.float64)
    for j in range(n_classes):
        g = vmap(grad(log_prob), in_dims=(None, 0, None))(params, X, j)
        flat = torch.cat([g[n].reshape(X.shape[0], -1) for n in names], 1).double()
        D += probs[:, j : j + 1].double() * flat**2
    D = D.numpy()
    sizes = [params[n].numel() for n in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return D / np.linalg.norm(D, axis=1, keepdims=True), names, offsets, sizes


def test_gated_experts_components_align_with_experts():
    """NMF of the exact diagonal PEFs finds one component per expert (the known truth)."""
    from sklearn.decomposition import NMF

    from sknpeff.inspection import top_examples

    model, sample, expert_params = make_gated_experts(random_state=0)
    X, concepts = sample(600, random_state=1)
    D, names, offsets, sizes = _diagonal_pefs(model, X, 3)
    nmf = NMF(7, init="nndsvda", max_iter=500, random_state=0)
    W = nmf.fit_transform(D)
    H = nmf.components_
    top = top_examples(W, 16)
    for e, pnames in expert_params.items():
        block = np.zeros(D.shape[1], dtype=bool)
        for n in pnames:
            t = names.index(n)
            block[offsets[t] : offsets[t] + sizes[t]] = True
        share = H[:, block].sum(axis=1) / H.sum(axis=1)
        k = int(np.argmax(share))
        assert share[k] > 0.7, (e, share)
        assert np.all(concepts[top[k], e] == 1), e
