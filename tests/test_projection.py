"""Random-projection PEFs: the operator, the projected engine path, stores, recovery."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from sknpeff import PEFTransformer
from sknpeff.io import PEFWriter, iter_row_batches, load_pefs, save_pefs
from sknpeff.layout import ParameterLayout
from sknpeff.pef import Projection, recover_components
from sknpeff.pef import _projection as projection_module
from sknpeff.utils import InvalidParameterError, pef_projection, pef_tag

from ._pef_reference import ConvNet, lrm_rows, make_model, naive_a


def _layers():
    """One module per layer type, with the shapes its rule sees."""
    return {
        "linear": nn.Linear(7, 5),
        "conv1d": nn.Conv1d(3, 4, 3),
        "conv2d_groups": nn.Conv2d(4, 6, 3, groups=2),
        "embedding": nn.Embedding(11, 6),
        "layernorm": nn.LayerNorm(6),
        "batchnorm": nn.BatchNorm2d(5),
        "generic": nn.MultiheadAttention(6, 2),
    }


@pytest.fixture(params=["kronecker", "sparse"])
def small_kronecker(request, monkeypatch):
    """Runs a test twice: every weight matrix in a Kronecker block (as large layers
    are), and with the default, where small matrices share the sparse sign block."""
    if request.param == "kronecker":
        monkeypatch.setattr(projection_module, "MIN_KRONECKER_SIZE", 0)
    return request.param


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("d", [3, 20])
@pytest.mark.parametrize("min_size", [0, None])
def test_adjoint_exact_per_layer_type(name, d, min_size):
    layout = ParameterLayout.from_model(_layers()[name])
    d = min(d, layout.n_params)
    R = Projection.for_layout(layout, d, seed=7, min_kronecker_size=min_size)
    assert R.n_components == d
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, layout.n_params, generator=gen, dtype=torch.float64)
    y = torch.randn(4, d, generator=gen, dtype=torch.float64)
    lhs = (R.apply(x) * y).sum(1)
    rhs = (x * R.adjoint(y)).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12 * float(lhs.abs().max()))
    # numpy in, numpy out; one vector at a time agrees with a batch
    np.testing.assert_allclose(R.apply(x[0].numpy()), R.apply(x)[0].numpy(), rtol=1e-13)


def test_adjoint_is_the_transpose_of_the_matrix():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    R = Projection.for_layout(ParameterLayout.from_model(model), 9, seed=0,
                              min_kronecker_size=0)
    eye = torch.eye(R.n_params, dtype=torch.float64)
    M = R.apply(eye).T  # the (d, n_params) matrix: column q = R e_q
    # row r of R^T applied to the identity is R^T e_r, the r-th row of M
    np.testing.assert_allclose(R.adjoint(torch.eye(9, dtype=torch.float64)).numpy(),
                               M.numpy(), rtol=0, atol=1e-14)


def test_unbiased_isometry_in_expectation(small_kronecker):
    # E[R^T R] = I: averaged over seeds, R^T R e_q has mean e_q
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    layout = ParameterLayout.from_model(model)
    eye = torch.eye(layout.n_params, dtype=torch.float64)
    acc = torch.zeros_like(eye)
    n = 400
    for s in range(n):
        R = Projection.for_layout(layout, 16, seed=s)
        acc += R.adjoint(R.apply(eye))
    mean = acc / n
    # Kronecker entries are products of chi-squares (heavy tails): loose bounds
    assert float((mean - eye).abs().max()) < 0.4
    assert abs(float(mean.diagonal().mean()) - 1.0) < 0.12
    off = mean - torch.diag(mean.diagonal())
    assert abs(float(off.sum())) / off.numel() < 0.01


def test_projection_pickles_and_copies():
    import pickle

    layout = ParameterLayout.from_model(ConvNet())
    R = Projection.for_layout(layout, 50, seed=3, min_kronecker_size=0)
    x = torch.randn(2, layout.n_params, dtype=torch.float64)
    y = R.apply(x)  # fills the factor cache
    for R2 in (pickle.loads(pickle.dumps(R)), copy.deepcopy(R)):
        assert R2.description() == R.description()
        assert torch.equal(R2.apply(x), y)


def test_small_matrices_share_the_sparse_block_large_ones_are_kronecker():
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 10))
    layout = ParameterLayout.from_model(model)
    blocks = Projection.for_layout(layout, 512).description()["blocks"]
    assert [b["param"] for b in blocks if b["type"] == "kronecker"] == ["0.weight"]
    sparse = [b for b in blocks if b["type"] == "sparse_sign"]
    assert sparse[0]["params"] == ["0.bias", "1.weight", "1.bias"]
    every = Projection.for_layout(layout, 512, min_kronecker_size=0).description()
    assert sum(b["type"] == "kronecker" for b in every["blocks"]) == 2
    with pytest.raises(InvalidParameterError, match="min_kronecker_size"):
        Projection.for_layout(layout, 512, min_kronecker_size=-1)


def test_rank_one_gradients_keep_their_length_in_a_small_layer():
    """A per-example gradient of a linear layer is rank one; its squared length after the
    projection has relative variance about 2 / d in the sparse block, against about
    2 / d_out + 2 / d_in in a Kronecker block (why small layers avoid Kronecker blocks)."""
    layout = ParameterLayout.from_model(nn.Linear(32, 16))
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 1, generator=gen, dtype=torch.float64)
         @ torch.randn(1, 32, generator=gen, dtype=torch.float64)).reshape(1, -1)
    x = torch.cat([x, torch.zeros(1, 16, dtype=torch.float64)], 1)  # no bias gradient
    spread = {}
    for min_size in (None, 0):
        ratios = [float(Projection.for_layout(layout, 64, seed=s, min_kronecker_size=min_size)
                        .apply(x).square().sum() / x.square().sum()) for s in range(300)]
        spread[min_size] = float(np.var(ratios))
    assert spread[None] < 3 / 64 < 0.25 < spread[0]


def test_description_round_trip_and_seed():
    model = ConvNet()
    layout = ParameterLayout.from_model(model)
    R = Projection.for_layout(layout, 50, seed=3, min_kronecker_size=0)
    desc = R.description()
    import json

    R2 = Projection.from_description(json.loads(json.dumps(desc)))
    x = torch.randn(2, layout.n_params, dtype=torch.float64)
    assert torch.equal(R.apply(x), R2.apply(x))
    assert not torch.allclose(Projection.for_layout(layout, 50, seed=4, min_kronecker_size=0)
                              .apply(x), R.apply(x))
    # float32 and float64 draw the same operator
    np.testing.assert_allclose(R.apply(x.float()).numpy(), R.apply(x).numpy(), rtol=1e-4,
                               atol=1e-4)
    kinds = {b["type"] for b in desc["blocks"]}
    assert kinds == {"kronecker", "sparse_sign"}
    with pytest.raises(ValueError, match="format"):
        Projection.from_description({"seed": 1})


def _make(name, seed=0):
    """(model, X) in float32, as the naive-reference tests build them."""
    model, X, _ = make_model(name, torch.float32, seed)
    return model, X


@pytest.mark.filterwarnings("ignore:per-layer rules do not apply")
@pytest.mark.parametrize("name", ["mlp", "conv", "seq", "tied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projected_rows_equal_projected_naive_gradients(name, dtype, small_kronecker):
    model, X = _make(name)
    model = model.to(dtype)
    if X.is_floating_point():
        X = X.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    out = "float64" if dtype == torch.float64 else "float32"
    tr = PEFTransformer(model, kind="low_rank", n_values=min(40, n_params),
                        compression="projection", projection_seed=5, dtype=out, batch_size=4)
    res = tr.fit(X).compute(X)
    m64 = copy.deepcopy(model).double()
    xs = [(x.double() if x.is_floating_point() else x)[None] for x in X]
    rows, norms = lrm_rows(naive_a(m64, xs))
    want = tr.projection_.apply(rows.reshape(-1, n_params)).reshape(len(X), -1)
    got = np.asarray(res.pefs)
    assert got.shape == (len(X), tr.n_features_out_) == (len(X), tr.n_classes_ * 40)
    assert got.dtype == np.dtype(out)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert np.abs(res.norms - norms).max() <= tol * norms.max()
    # the description travels with the PEFs
    assert res.metadata["projection"] == tr.projection_.description()
    assert pef_projection(res.pefs) == tr.projection_.description()
    assert pef_tag(res.pefs) == ("low_rank", tr.n_classes_)


def test_projection_options_and_errors():
    model, X = _make("mlp")
    with pytest.raises(InvalidParameterError, match="kind='low_rank'"):
        PEFTransformer(model, compression="projection", n_values=8).fit(X)
    with pytest.raises(InvalidParameterError, match="compression"):
        PEFTransformer(model, kind="low_rank", compression="gaussian").fit(X)
    with pytest.raises(InvalidParameterError, match="at most the number"):
        PEFTransformer(model, kind="low_rank", compression="projection",
                       n_values=10**6).fit(X)
    tr = PEFTransformer(model, kind="low_rank", compression="projection", n_values=12,
                        n_classes=2, normalize=False).fit(X)
    res = tr.compute(X)
    # unnormalized: ||sum_j (R a_j)(R a_j)^T|| tracks the exact norm (not equal to it)
    Y = np.asarray(res.pefs).reshape(len(X), 2, 12)
    assert np.all(np.isfinite(Y)) and np.abs(Y).max() > 0
    floor = float(np.median(res.norms))
    tr2 = PEFTransformer(model, kind="low_rank", compression="projection", n_values=12,
                         n_classes=2, min_norm=floor).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = tr2.compute(X)
    empty = np.abs(np.asarray(low.pefs)).sum(1) == 0
    np.testing.assert_array_equal(empty, low.norms < floor)
    # transform gives the dense rows; same seed, same rows
    np.testing.assert_array_equal(tr.transform(X), tr.transform(X))


def test_projecting_projected_pefs_is_refused(tmp_path):
    model, X = _make("mlp")
    tr = PEFTransformer(model, kind="low_rank", compression="projection", n_values=16,
                        n_classes=2).fit(X)
    res = tr.compute(X)
    R = tr.projection_
    with pytest.raises(ValueError, match="already randomly projected"):
        R.apply(res)
    save_pefs(tmp_path / "p", res)
    loaded = load_pefs(tmp_path / "p")
    with pytest.raises(ValueError, match="already randomly projected"):
        R.apply(loaded.pefs)
    # a top-K store projected by the same operator slot by slot is fine
    topk = PEFTransformer(model, kind="low_rank", n_values=10**6, n_classes=2).fit(X)
    dense = topk.compute(X).pefs.toarray().reshape(-1, R.n_params)
    assert R.apply(dense).shape == (2 * len(X), 16)


def test_projected_store_round_trip(tmp_path):
    model, X = _make("conv")
    tr = PEFTransformer(model, kind="low_rank", compression="projection", n_values=30,
                        batch_size=4).fit(X)
    direct = tr.compute(X)
    streamed = tr.compute(X, out=tmp_path / "s")
    assert isinstance(streamed.pefs, np.ndarray) and not sp.issparse(streamed.pefs)
    np.testing.assert_array_equal(np.asarray(streamed.pefs), np.asarray(direct.pefs))
    np.testing.assert_array_equal(streamed.norms, direct.norms)
    assert streamed.metadata["projection"] == tr.projection_.description()
    assert pef_projection(streamed.pefs) == tr.projection_.description()
    R = Projection.from_description(streamed.metadata["projection"])
    x = torch.randn(tr.n_params_, dtype=torch.float64)
    assert torch.equal(R.apply(x), tr.projection_.apply(x))
    blocks = list(iter_row_batches(streamed, 4))
    np.testing.assert_array_equal(np.vstack(blocks), np.asarray(direct.pefs))
    # a projected batch is refused by a sparse store and by a store of another projection
    with pytest.raises(ValueError, match="randomly projected"):
        with PEFWriter(tmp_path / "t", n_cols=tr.n_features_out_) as w:
            w.append(direct)
    other = Projection.for_layout(tr.layout_, 30, seed=99).description()
    with pytest.raises(ValueError, match="another random projection"):
        with PEFWriter(tmp_path / "u", n_cols=tr.n_features_out_, projection=other) as w:
            w.append(direct)


def _planted(R, n, s, seed):
    rng = np.random.default_rng(seed)
    G = np.zeros((n, R.n_params))
    for k in range(n):
        G[k, rng.choice(R.n_params, s, replace=False)] = rng.standard_normal(s)
    return G


def _cos(a, b):
    return np.abs((a * b).sum(1)) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def test_recovery_of_planted_sparse_vectors():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 6))
    layout = ParameterLayout.from_model(model)
    s = 4
    d = int(8 * s * np.log(layout.n_params / s))  # a few times s log(m/s)
    R = Projection.for_layout(layout, d, seed=0)
    G = _planted(R, 3, s, seed=1)
    H = R.apply(G)
    rec, res = recover_components(H, R, return_residuals=True)
    assert rec.shape == (3, layout.n_params)
    assert np.all(_cos(rec.toarray(), G) >= 0.95)
    assert np.all(res < 0.05)
    # the adjoint is no recovery
    assert np.median(_cos(R.adjoint(H), G)) < 0.6
    # n_nonzero caps the support; an estimator-like object with kept_columns_ works
    capped = recover_components(H, R, n_nonzero=s, max_iter=200)
    assert np.diff(capped.indptr).max() <= s

    class Fitted:
        components_ = H[:, 1:]
        kept_columns_ = np.arange(1, d)
        projection_ = R.description()

    H0 = H.copy()
    H0[:, 0] = 0.0
    np.testing.assert_allclose(recover_components(Fitted(), max_iter=100).toarray(),
                               recover_components(H0, R, max_iter=100).toarray(), atol=1e-12)
    with pytest.raises(ValueError, match="columns"):
        recover_components(H[:, :-1], R)
    with pytest.raises(ValueError, match="no projection found"):
        recover_components(H)


def _forms():
    """Every Contribution form with random factors, and the parameter's (O, I)."""
    gen = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    from sknpeff.pef.rules import Contribution

    c, B = 3, 2
    return {
        "dense": (Contribution.dense(r(c, B, 6 * 5)), (6, 5)),
        "outer": (Contribution.outer(r(c, B, 6), r(B, 5)), (6, 5)),
        "product": (Contribution.product(r(B, c, 1, 6, 7), r(B, 1, 1, 7, 5)), (6, 5)),
        "grouped": (Contribution.product(r(B, c, 2, 3, 7), r(B, 1, 2, 7, 5)), (6, 5)),
        # a sequence Linear's: left a transposed view of (L, O) cotangents, short L
        "product_seq": (Contribution.product(r(B, c, 1, 2, 6).transpose(3, 4),
                                             r(B, 1, 1, 2, 5)), (6, 5)),
        "per_class": (Contribution.per_class_product([r(B, 6, 7) for _ in range(c)],
                                                     r(B, 7, 5)), (6, 5)),
        "scatter": (Contribution.scatter(r(c, B, 4, 5), torch.tensor([[0, 2, 2, 5],
                                                                      [1, 1, 3, 0]]), 6),
                    (6, 5)),
    }


@pytest.mark.parametrize("form", list(_forms()))
def test_contribution_projection_and_gram_match_the_written_block(form):
    cb, (O, I) = _forms()[form]
    gen = torch.Generator().manual_seed(1)
    p_out = torch.randn(3, O, generator=gen, dtype=torch.float64)
    p_in = torch.randn(2, I, generator=gen, dtype=torch.float64)
    gram = cb.exact_gram()
    got = cb.project(p_out, p_in)
    blk = cb.materialize()  # (c, B, O * I)
    c, B = blk.shape[:2]
    want = (p_out @ blk.reshape(c, B, O, I) @ p_in.T).reshape(c, B, -1).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    bt = blk.transpose(0, 1)
    torch.testing.assert_close(gram, bt @ bt.transpose(1, 2), rtol=1e-12, atol=1e-12)
    # the weighted sum (the engine's exactness check) agrees with the block
    w = torch.rand(c, B, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cb.weighted_sum(w), torch.einsum("cbn,cb->n", blk, w))


def test_projected_rows_do_not_depend_on_threads_or_batches(small_kronecker):
    model, X = _make("conv")
    kw = dict(kind="low_rank", compression="projection", n_values=24, projection_seed=2)
    one = PEFTransformer(model, batch_size=2, **kw).fit(X).compute(X)
    two = PEFTransformer(model, batch_size=3, n_jobs=2, **kw).fit(X).compute(X)
    np.testing.assert_allclose(np.asarray(two.pefs), np.asarray(one.pefs), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(two.norms, one.norms, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["mlp", "conv", "seq"])
def test_cuda_projection_matches_cpu(name, small_kronecker):
    """The same seed gives the same operator on every device: projected rows agree."""
    model, X = _make(name)
    model = model.double()
    if X.is_floating_point():
        X = X.double()
    kw = dict(kind="low_rank", compression="projection", n_values=64, projection_seed=3,
              dtype="float64", batch_size=4)
    cpu = PEFTransformer(model, **kw).fit(X).compute(X)
    gpu = PEFTransformer(copy.deepcopy(model).cuda(), **kw).fit(X).compute(X)
    np.testing.assert_allclose(np.asarray(gpu.pefs), np.asarray(cpu.pefs), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(gpu.norms, cpu.norms, rtol=1e-9)
