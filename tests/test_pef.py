"""Tests of sknpeff.pef.PEFTransformer against a naive per-example, per-class loop."""

import copy
import itertools
import pickle
import threading
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

import sknpeff.pef._engine as engmod
import sknpeff.pef._topk as topkmod
from sknpeff.layout import ParameterLayout
from sknpeff.pef import PEFResult, PEFTransformer
from sknpeff.pef._topk import select_topk
from sknpeff.pef.rules import Contribution
from sknpeff.utils import csr_from_parts

from ._pef_reference import (
    diag_rows,
    lrm_rows,
    make_model,
    naive_a,
    topk_dense,
)

RTOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def _reference(model, xs, kind, **kw):
    m64 = copy.deepcopy(model).double()
    xs64 = [x.double() if x.is_floating_point() else x for x in xs]
    A = naive_a(m64, xs64, **kw)
    return (lrm_rows if kind == "low_rank" else diag_rows)(A)


def _rel(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.filterwarnings("ignore:per-layer rules do not apply")
@pytest.mark.parametrize("name", ["mlp", "conv", "seq", "tied", "seqfirst"])
@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_naive_loop(name, kind, dtype):
    model, X, xs = make_model(name, dtype)
    out_dtype = "float64" if dtype == torch.float64 else "float32"
    tr = PEFTransformer(model, kind=kind, n_values=10**9, dtype=out_dtype, batch_size=4)
    res = tr.fit(X).compute(X)
    rows, norms = _reference(model, xs, kind)
    assert res.pefs.shape == (X.shape[0], tr.n_features_out_)
    got = res.pefs.toarray()
    assert got.dtype == np.dtype(out_dtype)
    assert _rel(got, rows) <= RTOL[dtype]
    assert np.abs(res.norms - norms).max() / norms.max() <= RTOL[dtype]
    if kind == "diagonal":
        assert res.pefs.data.min() >= 0


@pytest.mark.filterwarnings("ignore:.*zero PEF")
@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
@pytest.mark.parametrize("opts", [{"n_classes": 2}, {"min_class_prob": 0.3},
                                  {"n_classes": 3, "min_class_prob": 0.2}])
def test_class_selection(kind, opts):
    model, X, xs = make_model("mlp")
    tr = PEFTransformer(model, kind=kind, n_values=10**9, dtype="float64", **opts).fit(X)
    res = tr.compute(X)
    rows, norms = _reference(model, xs, kind, **opts)
    n_slots = opts.get("n_classes", 4)
    assert tr.n_classes_ == n_slots
    width = n_slots * tr.n_params_ if kind == "low_rank" else tr.n_params_
    assert res.pefs.shape == (X.shape[0], width)
    assert _rel(res.pefs.toarray(), rows) <= 1e-10
    assert np.allclose(res.norms, norms, rtol=1e-10)
    if kind == "low_rank" and "min_class_prob" in opts:
        # dropped classes leave their slots empty
        probs = torch.softmax(model(X), 1).detach().numpy()
        kept = (np.sort(probs, 1)[:, ::-1][:, :n_slots] >= opts["min_class_prob"]).sum(1)
        dense = res.pefs.toarray().reshape(X.shape[0], n_slots, tr.n_params_)
        for i, k in enumerate(kept):
            assert not dense[i, k:].any()
            assert dense[i, :k].any(axis=1).all()


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_topk_picks_largest_entries_of_normalized_row(kind, k):
    model, X, xs = make_model("conv")
    res = PEFTransformer(model, kind=kind, n_values=k, dtype="float64").fit(X).compute(X)
    rows, _ = _reference(model, xs, kind)
    want = topk_dense(rows, k)
    got = res.pefs.toarray()
    assert np.diff(res.pefs.indptr).max() <= k
    assert np.allclose(got, want, rtol=1e-10, atol=0)
    assert res.pefs.has_sorted_indices


class _WideNet(nn.Module):
    """Large enough rows (c * m ~ 5e5) for the block filter of the selection, with Linear
    inputs wider than a block and parameter regions that start inside blocks."""

    def __init__(self, k=7):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # 27 inputs per output: per-class products
        self.conv2 = nn.Conv2d(8, 16, 3, stride=3)  # 72: stacked; 3x3 outputs: P P^T Gram
        self.fc1 = nn.Linear(16 * 3 * 3, 130)
        self.fc2 = nn.Linear(130, k)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
@pytest.mark.parametrize("chunk", [None, 10**6])
@pytest.mark.parametrize("path", ["blocks", "fallback", "large_k"])
def test_topk_exact_on_wide_rows(kind, chunk, path, monkeypatch):
    # the block filter (its block maxima computed while assembling, analytically for
    # outer products, whose entries are computed only where the selection looks) must
    # give exactly the largest entries of the normalized rows; so must the paths that
    # read whole rows: a threshold estimated too high, and k close to the row length
    monkeypatch.setattr(engmod, "DEFER_MAX_FRAC", 2.0)  # Linear blocks always deferred
    torch.manual_seed(1)
    model = _WideNet().double().eval()
    X = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    xs = [X[i : i + 1] for i in range(X.shape[0])]
    k = 300 if kind == "low_rank" else 2000
    if path == "large_k":
        k = 12_000 if kind == "diagonal" else 90_000
    tr = PEFTransformer(model, kind=kind, n_values=k, dtype="float64", batch_size=5)
    if path == "fallback":
        # every subsampled entry is the largest of row 0: its threshold is too high
        top = int(np.abs(tr.fit(X).compute(X[:1]).pefs.toarray()[0]).argmax())
        if kind == "low_rank":  # to the internal, parameter-major column
            lay, c = tr.layout_, tr.n_classes_
            j, col = divmod(top, lay.n_params)
            p = int(np.searchsorted(np.asarray(lay.offsets), col, side="right")) - 1
            top = c * lay.offsets[p] + j * lay.sizes[p] + col - lay.offsets[p]
        real = torch.randint

        def biased(low, high, size, **kw):
            if size and size[0] > 100:
                return torch.full(size, top, dtype=torch.long)
            return real(low, high, size, **kw)

        monkeypatch.setattr(torch, "randint", biased)
    if chunk:
        tr._chunk_elements = chunk  # several row chunks per batch
    res = tr.fit(X).compute(X)
    rows, norms = _reference(model, xs, kind)
    if path != "large_k":
        assert rows.shape[1] > 2 * 32 * rows.shape[1] / k  # the subsampled (block) path
    np.testing.assert_allclose(res.pefs.toarray(), topk_dense(rows, k), rtol=1e-10, atol=0)
    np.testing.assert_allclose(res.norms, norms, rtol=1e-10)


def test_gram_without_reading_rows():
    gen = torch.Generator().manual_seed(5)
    Bc, c, O, L, K = 3, 4, 16, 9, 54
    lefts = [torch.randn(Bc, O, L, generator=gen, dtype=torch.float64) for _ in range(c)]
    right = torch.randn(Bc, L, K, generator=gen, dtype=torch.float64)
    cb = Contribution(lefts=lefts, right=right)
    assert cb.gram_is_cheap()
    assert not Contribution(lefts=[t[:, :, :1].expand(Bc, O, 1024) for t in lefts],
                               right=torch.zeros(Bc, 1024, 27)).gram_is_cheap()
    rows = torch.stack([torch.bmm(t, right) for t in lefts], 1).reshape(Bc, c, -1)
    want = torch.bmm(rows, rows.transpose(1, 2))
    torch.testing.assert_close(cb.gram(), want, rtol=1e-12, atol=1e-12)
    # the stacked form (Bc, c, G=1, O, L) @ (Bc, 1, 1, L, K) gives the same
    stacked = Contribution(left=torch.stack(lefts, 1)[:, :, None], right=right[:, None, None])
    assert stacked.gram_is_cheap()
    torch.testing.assert_close(stacked.gram(), want, rtol=1e-12, atol=1e-12)
    grouped = Contribution(left=torch.zeros(Bc, c, 2, O, L), right=torch.zeros(Bc, 1, 2, L, K))
    assert not grouped.gram_is_cheap()


_B = topkmod.BLOCK
# regions ("dense": written and scanned; "outer": Q x I outer products, deferred when the
# block maxima need not read them) of every kind of alignment: inside one block, across
# one boundary, whole blocks, outer products with rows wider than a block starting
# mid-block, and narrower ones (I < _BLOCK: written and read)
_ALIGNMENTS = [("dense", 5), ("dense", 100), ("dense", 3 * _B + 17), ("outer", (7, 200)),
               ("dense", 1), ("outer", (3, _B)), ("outer", (2, 3 * _B + 1)),
               ("dense", 2 * _B - 1), ("outer", (20, 50))]
_DEFERRED = [("dense", 37), ("outer", (5, 3 * _B + 1)), ("dense", _B + 3),
             ("outer", (9, _B)), ("outer", (4, 200)), ("outer", (6, 50)), ("dense", 11)]


def _assembled_rows(gen, layout, R=3, signed=True):
    """Rows assembled region by region as the engine does: ``full`` (everything written)
    and ``rows`` (NaN where a region is deferred to ``dfr``), block maxima in ``bm``."""
    n = sum(v if k == "dense" else v[0] * v[1] for k, v in layout)
    n_pad = -(-n // _B) * _B
    full = torch.zeros(R, n_pad, dtype=torch.float64)
    rows = torch.full((R, n_pad), float("nan"), dtype=torch.float64)
    rows[:, n:] = 0
    bm = topkmod.BlockMax(R, n_pad, torch.float64, "cpu", signed=signed)
    dfr = topkmod.Deferred(rows)
    lo = 0
    for kind, size in layout:
        if kind == "dense":
            v = torch.randn(R, size, generator=gen, dtype=torch.float64)
            v = v if signed else v.abs()
            full[:, lo : lo + size] = rows[:, lo : lo + size] = v
            bm.scan(rows, lo, lo + size)
            lo += size
            continue
        Q, I = size
        u = torch.randn(R, Q, generator=gen, dtype=torch.float64)
        x = torch.randn(R, I, generator=gen, dtype=torch.float64)
        if not signed:
            u, x = u.abs(), x.abs()
        full[:, lo : lo + Q * I] = (u[:, :, None] * x[:, None, :]).reshape(R, -1)
        if bm.outer_reads(lo, Q, I):
            rows[:, lo : lo + Q * I] = full[:, lo : lo + Q * I]
        else:
            dfr.add(lo, u, x)
        bm.outer(rows, lo, u.abs(), x.abs())
        lo += Q * I
    return full, rows, dfr, bm, n


@pytest.mark.parametrize("signed", [True, False])
def test_block_max_matches_a_pass_over_the_rows(signed):
    gen = torch.Generator().manual_seed(3)
    full, _, dfr, bm, _ = _assembled_rows(gen, _ALIGNMENTS, signed=signed)
    assert len(dfr.regions) == 3  # the others were read
    # the rows are non-negative when not signed
    assert torch.equal(bm.bmag.reshape(-1), full.reshape(-1, _B).abs().amax(1))


def test_deferred_regions_read_like_written_ones():
    gen = torch.Generator().manual_seed(5)
    full, rows, dfr, bm, n = _assembled_rows(gen, _DEFERRED)
    B = topkmod.BLOCK
    assert len(dfr.regions) == 3 and bool(torch.isnan(rows).any())
    # block maxima from the factors are those of the written rows
    assert torch.equal(bm.bmag.reshape(-1), full.reshape(-1, B).abs().amax(1))
    R, n_pad = rows.shape
    # entries anywhere (shared columns, per-row columns), whole blocks, and everything
    cols = torch.randint(0, n_pad, (1, 500), generator=gen)
    got = rows[:, cols[0]].clone()
    dfr.patch(got, cols)
    assert torch.equal(got, full[:, cols[0]])
    cols = torch.randint(0, n_pad, (R, 400), generator=gen)
    got = rows.gather(1, cols)
    dfr.patch(got, cols)
    assert torch.equal(got, full.gather(1, cols))
    blk_rows = torch.arange(R).repeat_interleave(n_pad // B)
    blk = torch.arange(n_pad // B).repeat(R)
    got = rows.reshape(-1, B).clone()
    dfr.patch_blocks(got, blk_rows, blk)
    assert torch.equal(got, full.reshape(-1, B))
    dfr.materialize()
    assert not dfr and torch.equal(rows, full)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("path", ["blocks", "entries", "fallback", "topk", "large_k"])
def test_selection_with_deferred_regions(signed, path, monkeypatch):
    # every path of the selection gives on deferred rows (NaN where not written) what it
    # gives on written ones: entries are computed where read, or the rows written first
    gen = torch.Generator().manual_seed(6)
    full, rows, dfr, bm, n = _assembled_rows(gen, _DEFERRED, signed=signed)
    k = 3000 if path == "large_k" else 200  # k < N / 2: a subsample estimates t
    state, method = None, "filter"
    if path == "entries":
        state = {"block_frac": 1.0, "calls": 1}
    elif path == "topk":
        method = "topk"
    elif path == "fallback":
        top = int(full[0].abs().argmax())
        monkeypatch.setattr(torch, "randint",
                            lambda low, high, size, **kw: torch.full(size, top, dtype=torch.long))
    sel = select_topk(rows, k, signed=signed, n_valid=n, state=state, method=method,
                       block_max=bm.bmag, deferred=dfr)
    for r in range(rows.shape[0]):
        want = set(torch.topk(full[r, :n].abs(), k).indices.tolist())
        assert set(sel[r][sel[r] >= 0].tolist()) == want
    if path in ("blocks", "large_k"):
        assert bool(torch.isnan(rows).any()) == (path == "blocks")  # only read where needed
    with pytest.raises(ValueError, match="block maxima"):
        select_topk(rows, k, signed=signed, deferred=topkmod.Deferred(rows))


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_deferred_outer_products_change_nothing(kind, monkeypatch):
    # the engine with Linear blocks left unwritten gives the PEFs of the one that writes them
    torch.manual_seed(2)
    model = _WideNet().eval()
    X = torch.randn(6, 3, 12, 12)
    monkeypatch.setattr(engmod, "DEFER_MAX_FRAC", 2.0)  # however many blocks it reads
    added = []
    real_add = topkmod.Deferred.add
    monkeypatch.setattr(topkmod.Deferred, "add",
                        lambda self, *a: (added.append(a[0]), real_add(self, *a))[1])
    res = {}
    for defer in (False, True):
        tr = PEFTransformer(model, kind=kind, n_values=400, batch_size=3)
        tr._defer_outer = defer
        res[defer] = tr.fit(X).compute(X)
        assert bool(added) == defer
    assert np.array_equal(res[True].pefs.indices, res[False].pefs.indices)
    assert np.array_equal(res[True].pefs.indptr, res[False].pefs.indptr)
    np.testing.assert_allclose(res[True].pefs.data, res[False].pefs.data, rtol=1e-6)
    np.testing.assert_allclose(res[True].norms, res[False].norms, rtol=1e-6)


def test_later_calls_reuse_the_first_calls_check(monkeypatch):
    # the one-batch check of the per-layer rules runs once per fitted model, not per call
    calls = []
    real = engmod.Engine._verify

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(engmod.Engine, "_verify", counting)
    model, X, xs = make_model("tied")
    tr = PEFTransformer(model, kind="low_rank", n_values=10**9, dtype="float64", batch_size=2)
    with pytest.warns(UserWarning, match="per-layer rules do not apply"):
        first = tr.fit(X).compute(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the generic path is remembered: no new warning
        second = tr.compute(X)
        third = tr.transform(X[:3])
    assert len(calls) == 1
    rows, _ = _reference(model, xs, "low_rank")
    for got in (first.pefs, second.pefs):
        assert _rel(got.toarray(), rows) <= RTOL[torch.float64]
    assert _rel(third.toarray(), rows[:3]) <= RTOL[torch.float64]
    with pytest.warns(UserWarning, match="per-layer rules do not apply"):
        tr.fit(X).compute(X)  # a new fit checks again
    assert len(calls) == 2
    # another transformer on another model is checked on its own
    other = PEFTransformer(make_model("mlp")[0], kind="low_rank", n_values=5)
    other.fit(make_model("mlp")[1]).compute(make_model("mlp")[1])
    assert len(calls) == 3


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_min_norm_empties_rows_below_the_floor(kind):
    model, X, _ = make_model("conv")
    tr = PEFTransformer(model, kind=kind, n_values=50, dtype="float64", batch_size=4).fit(X)
    ref = tr.compute(X)
    floor = float(np.median(ref.norms))
    low = ref.norms < floor
    assert 0 < low.sum() < len(low)
    tr.set_params(min_norm=floor)
    with pytest.warns(UserWarning, match=f"{low.sum()} example.*below min_norm"):
        res = tr.compute(X)
    np.testing.assert_array_equal(res.norms, ref.norms)  # the true norms are reported
    counts = np.diff(res.pefs.indptr)
    assert (counts[low] == 0).all()
    np.testing.assert_array_equal(res.pefs[~low].toarray(), ref.pefs[~low].toarray())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.set_params(min_norm=0.0).compute(X)  # 0: nothing is floored, nothing said


def test_unnormalized():
    model, X, xs = make_model("mlp")
    res = PEFTransformer(model, kind="low_rank", n_values=10**9, normalize=False,
                         dtype="float64").fit(X).compute(X)
    A = naive_a(model, xs)
    assert _rel(res.pefs.toarray(), A.reshape(len(xs), -1)) <= 1e-10


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_norms_equal_dense_fisher(kind):
    model, X, xs = make_model("mlp")
    res = PEFTransformer(model, kind=kind, n_values=5, dtype="float64").fit(X).compute(X)
    A = naive_a(model, xs)
    for i in range(len(xs)):
        F = A[i].T @ A[i]  # dense m x m Fisher
        want = np.linalg.norm(F) if kind == "low_rank" else np.linalg.norm(np.diag(F))
        assert res.norms[i] == pytest.approx(want, rel=1e-10)
    # the same Fisher straight from the definition E_y[g g^T]
    with torch.no_grad():
        p = torch.softmax(model(xs[0]), 1)[0]
    F0 = sum(p[j].item() * np.outer(A[0][r] / np.sqrt(p[j].item()), A[0][r] / np.sqrt(p[j].item()))
             for r, j in enumerate(torch.argsort(p, descending=True).tolist()))
    if kind == "low_rank":
        assert res.norms[0] == pytest.approx(np.linalg.norm(F0), rel=1e-10)


def test_selection_exact_against_torch_topk(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    # (k close to N: no subsample can estimate the threshold, e.g. 2048 of 3818)
    cases = [(5, 100_000, 300), (3, 50_000, 5000), (4, 1000, 2000), (2, 300, 7),
             (2, 3818, 2048), (2, 10_000, 6000)]
    # state=None: block filter; block_frac=1: the entry-wise path; "topk": the GPU's rule
    paths = [(None, "auto"), ({"block_frac": 1.0, "calls": 1}, "filter"), (None, "topk")]
    for (R, N, k), (state, method) in itertools.product(cases, paths):
        v = torch.randn(R, N, generator=gen) ** 3
        v[0, : N // 2] = 0  # many zeros
        v[1, :] = 0
        v[1, :5] = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.1])
        sel = select_topk(v, k, signed=True, state=state, method=method)
        for r in range(R):
            got = set(sel[r][sel[r] >= 0].tolist())
            mag = v[r].abs()
            n_nz = int((mag > 0).sum())
            kk = min(k, n_nz)
            want = set(torch.topk(mag, kk).indices.tolist()) if kk else set()
            assert got == want
    # non-negative rows
    f = torch.rand(3, 40_000, generator=gen)
    sel = select_topk(f, 100, signed=False)
    assert set(sel[2].tolist()) == set(torch.topk(f[2], 100).indices.tolist())
    # a threshold estimated too high must fall back to an exact topk
    v = torch.randn(2, 100_000, generator=gen)
    top = int(v[0].abs().argmax())
    real_randint = torch.randint

    def biased(low, high, size, **kw):
        return torch.full(size, top, dtype=torch.long)

    monkeypatch.setattr(torch, "randint", biased)
    sel = select_topk(v, 50, signed=True)
    monkeypatch.setattr(torch, "randint", real_randint)
    assert set(sel[0].tolist()) == set(torch.topk(v[0].abs(), 50).indices.tolist())
    with pytest.raises(ValueError, match="method must be"):
        select_topk(v, 50, signed=True, method="sort")


def _lowest_index_topk(row, k):
    """Reference: the k largest |entries| (nonzero), ties broken by the lowest index."""
    mag = np.abs(row)
    order = np.lexsort((np.arange(mag.size), -mag))  # by -|v|, then by index
    return set(int(i) for i in order[:k] if mag[i] > 0)


@pytest.mark.parametrize("signed", [True, False])
def test_selection_breaks_ties_by_index(signed):
    """Which of the entries tied at the cut-off are kept depends on the row alone (not on
    the random subsample, the path or the state), so n_jobs cannot change it."""
    gen = torch.Generator().manual_seed(3)
    R, N, k = 4, 60_000, 500
    v = torch.randn(R, N, generator=gen, dtype=torch.float64)
    v = torch.round(v * 4) / 4  # few distinct magnitudes: many exact ties everywhere
    if not signed:
        v = v.abs()
    v[3, :] = 0
    v[3, 7:20] = 1.0  # fewer nonzeros than k
    want = [_lowest_index_topk(v[r].numpy(), k) for r in range(R)]
    paths = [(None, "auto"), ({"block_frac": 1.0, "calls": 1}, "filter"), (None, "topk")]
    for seed, (state, method) in itertools.product(range(3), paths):
        g = torch.Generator().manual_seed(seed)
        sel = select_topk(v, k, signed=signed, generator=g, state=state, method=method)
        for r in range(R):
            assert set(sel[r][sel[r] >= 0].tolist()) == want[r], (seed, method, r)
    # k close to N (the whole-row path)
    sel = select_topk(v[:, :900], 600, signed=signed)
    for r in range(R):
        assert set(sel[r][sel[r] >= 0].tolist()) == _lowest_index_topk(v[r, :900].numpy(), 600)


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_gpu_selection_rule_on_cpu(kind, monkeypatch):
    """The engine as it runs on a GPU (one topk per row, no block maxima) gives the
    CPU's PEFs."""
    model, X, _ = make_model("conv", torch.float32)
    want = PEFTransformer(model, kind=kind, n_values=50).fit(X).compute(X)
    monkeypatch.setattr(topkmod, "_topk_is_faster", lambda device: True)
    monkeypatch.setattr(engmod, "BlockMax", None)  # must not be built
    got = PEFTransformer(model, kind=kind, n_values=50).fit(X).compute(X)
    assert np.allclose(got.norms, want.norms, rtol=1e-6)
    _assert_same_topk(got.pefs.toarray(), want.pefs.toarray(), atol=1e-6)


def test_input_types_agree():
    model, X, _ = make_model("mlp")
    tr = PEFTransformer(model, kind="low_rank", n_values=20, batch_size=4).fit(X)
    ref = tr.transform(X)
    for Xi in (X.numpy(), list(X), torch.utils.data.TensorDataset(X)):
        fw = (lambda m, b: m(b[0])) if isinstance(Xi, torch.utils.data.Dataset) else None
        t2 = clone(tr).set_params(forward=fw) if fw else tr
        out = t2.fit(Xi).transform(Xi)
        assert (out != ref).nnz == 0

    # dict inputs (tokenizer style), per-example dicts, a Dataset of dicts
    model, ids, _ = make_model("seq")
    mask = torch.ones_like(ids, dtype=torch.float64)
    mask[0, 3:] = 0
    batch = {"input_ids": ids, "mask": mask}
    tr = PEFTransformer(model, kind="diagonal", n_values=30, batch_size=3).fit(batch)
    ref = tr.transform(batch)
    items = [{"input_ids": ids[i], "mask": mask[i]} for i in range(ids.shape[0])]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    for Xi in (items, DS(), {k: v.numpy() for k, v in batch.items()}):
        assert (tr.transform(Xi) != ref).nnz == 0
    # forward= adapter
    fw = PEFTransformer(model, kind="diagonal", n_values=30,
                        forward=lambda m, b: m(b["input_ids"], mask=b["mask"])).fit(batch)
    assert (fw.transform(batch) != ref).nnz == 0


def test_compute_result_and_pipeline_shape():
    model, X, _ = make_model("mlp", torch.float32)
    tr = PEFTransformer(model, kind="low_rank", n_values=11)
    res = tr.fit(X).compute(X)
    assert isinstance(res, PEFResult)
    assert isinstance(res.pefs, sp.csr_matrix) and res.pefs.dtype == np.float32
    assert res.pefs.indices.dtype in (np.int32, np.int64)
    assert np.diff(res.pefs.indptr).max() <= 11
    with torch.no_grad():
        logits = model(X).numpy()
    assert np.allclose(res.logits, logits, atol=1e-6)
    assert (res.predictions == logits.argmax(1)).all()
    assert tr.n_features_out_ == tr.n_classes_ * tr.n_params_
    assert isinstance(tr.layout_, ParameterLayout) and tr.layout_.n_params == tr.n_params_
    assert tr.n_features_in_ == 6
    assert (tr.fit_transform(X) != res.pefs).nnz == 0
    # partial_fit records the layout once
    t2 = PEFTransformer(model, kind="diagonal").partial_fit(X[:2]).partial_fit(X[2:])
    assert t2.n_params_ == tr.n_params_
    # picklable when fitted
    t3 = pickle.loads(pickle.dumps(tr))
    assert (t3.transform(X) != res.pefs).nnz == 0


@pytest.mark.filterwarnings("ignore:.*zero PEF")
def test_in_a_pipeline():
    from sklearn.decomposition import TruncatedSVD
    from sklearn.pipeline import make_pipeline

    model, X, _ = make_model("mlp", torch.float32)
    pipe = make_pipeline(PEFTransformer(model, kind="low_rank", n_values=30),
                         TruncatedSVD(2, random_state=0))
    W = pipe.fit_transform(X)
    assert W.shape == (X.shape[0], 2)
    assert pipe.transform(X[:3]).shape == (3, 2)


@pytest.mark.filterwarnings("ignore:.*zero PEF")
def test_params_selection():
    model, X, xs = make_model("mlp")
    names = ["net.2.weight", "net.4.bias"]
    for params in (names, lambda n, p: n in names):
        tr = PEFTransformer(model, kind="low_rank", n_values=10**9, dtype="float64",
                            params=params).fit(X)
        assert tr.layout_.names == tuple(names)
        rows, _ = _reference(model, xs, "low_rank", params=names)
        assert _rel(tr.transform(X).toarray(), rows) <= 1e-10
    # frozen parameters can be selected by name; requires_grad is restored
    model.net[0].weight.requires_grad_(False)
    tr = PEFTransformer(model, params=["net.0.weight"], n_values=5).fit(X)
    tr.transform(X)
    assert not model.net[0].weight.requires_grad
    assert PEFTransformer(model).fit(X).layout_.names[0] == "net.0.bias"


def test_model_left_unchanged():
    model, X, _ = make_model("conv", torch.float32)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    for kind in ("low_rank", "diagonal"):
        PEFTransformer(model, kind=kind, n_values=9).fit(X).transform(X)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and p.requires_grad == flags[n]
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
    assert not model.training


def _threads_of_run_batch(monkeypatch) -> set:
    """Record the threads that run batches from now on."""
    seen = set()
    real = engmod.Engine.run_batch

    def spy(self, *args, **kwargs):
        seen.add(threading.get_ident())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(engmod.Engine, "run_batch", spy)
    return seen


@pytest.mark.parametrize("name", ["conv", "mlp", "tied"])
@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_n_jobs_gives_the_same_pefs(name, kind, monkeypatch):
    model, X, _ = make_model(name)
    kw = dict(kind=kind, n_values=40, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied model's generic-path warning
        want = PEFTransformer(model, **kw, n_jobs=None).fit(X).compute(X)
        n_threads = torch.get_num_threads()
        n_hooks = sum(len(m._forward_hooks) for m in model.modules())
        tr = PEFTransformer(model, **kw, n_jobs=3).fit(X)
        threads = _threads_of_run_batch(monkeypatch)
        # pauses inside every layer's forward interleave the threads' forward passes, so
        # each engine's hooks see the others' layers run (they must record their own only)
        pauses = [m.register_forward_pre_hook(lambda *_: time.sleep(0.002))
                  for m in model.modules() if not list(m.children())]
        for _ in range(2):  # the first call checks the rules on batch 1 alone
            got = tr.compute(X)
            assert np.allclose(got.norms, want.norms, rtol=1e-12)
            assert np.array_equal(got.logits, want.logits)
            # the same entries, ties at the cut-off included (broken by index)
            assert np.array_equal(got.pefs.indptr, want.pefs.indptr)
            assert np.array_equal(got.pefs.indices, want.pefs.indices)
            assert np.allclose(got.pefs.data, want.pefs.data, rtol=1e-12)
        for h in pauses:
            h.remove()
    assert torch.get_num_threads() == n_threads
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
    assert all(p.grad is None for p in model.parameters())
    if name == "tied":  # generic path (it swaps parameters): the calling thread alone
        assert threads == {threading.get_ident()}
    else:
        assert len(threads - {threading.get_ident()}) >= 2


def test_n_jobs_auto_is_the_default_and_caps_the_jobs(monkeypatch):
    """The default runs one batch per intra-op thread, at most four at once."""
    model, X, _ = make_model("mlp")
    X = np.concatenate([X] * 4)
    assert PEFTransformer(model).n_jobs == "auto"
    want = PEFTransformer(model, n_values=40, batch_size=2, n_jobs=None).fit(X).compute(X)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        tr = PEFTransformer(model, n_values=40, batch_size=2).fit(X)
        threads = _threads_of_run_batch(monkeypatch)
        pauses = [m.register_forward_pre_hook(lambda *_: time.sleep(0.002))
                  for m in model.modules() if not list(m.children())]
        got = tr.compute(X)
        for h in pauses:
            h.remove()
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(n_threads)
    assert np.array_equal(got.pefs.indices, want.pefs.indices)
    assert np.allclose(got.pefs.data, want.pefs.data, rtol=1e-12)
    workers = threads - {threading.get_ident()}
    assert 2 <= len(workers) <= 4


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_n_jobs_hands_a_generic_path_batch_back_to_one_thread(kind, monkeypatch):
    # a later batch that the per-layer rules cannot take (here the odd last one, whose
    # example goes through the model without its batch axis) moves parameters to the
    # generic path, which swaps the model's parameters: that must not happen while other
    # threads run forward passes, so the batch and those after it run on this thread
    model, X, _ = make_model("mlp")
    X = torch.cat([X, X[:2]])  # 11 examples: batches of 2, then one of 1

    def forward(m, batch):
        if batch.shape[0] == 1:
            return m(batch[0])[None]
        return m(batch)

    kw = dict(kind=kind, n_values=40, batch_size=2, forward=forward)
    with pytest.warns(UserWarning, match="per-layer rules do not apply"):
        want = PEFTransformer(model, **kw).fit(X).compute(X)
    tr = PEFTransformer(model, **kw, n_jobs=2).fit(X)
    tr.compute(X[:2])  # checked on a good batch: later calls start threaded
    moved = []
    real_move = engmod.Engine.move_to_fallback

    def move(self, pids):
        moved.append(threading.get_ident())
        return real_move(self, pids)

    monkeypatch.setattr(engmod.Engine, "move_to_fallback", move)
    threads = _threads_of_run_batch(monkeypatch)
    pauses = [m.register_forward_pre_hook(lambda *_: time.sleep(0.002))
              for m in model.modules() if not list(m.children())]
    with pytest.warns(UserWarning, match="per-layer rules do not apply"):
        got = tr.compute(X)
    for h in pauses:
        h.remove()
    assert moved == [threading.get_ident()]  # moved once, on the calling thread
    assert len(threads - {threading.get_ident()}) >= 1  # the batches before: threaded
    assert np.allclose(got.norms, want.norms, rtol=1e-12)
    assert np.array_equal(got.logits, want.logits)
    _assert_same_topk(got.pefs.toarray(), want.pefs.toarray(), atol=1e-12)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert all(p.grad is None for p in model.parameters())


def test_n_jobs_stops_cleanly(monkeypatch):
    model, X, _ = make_model("conv")
    X = torch.cat([X] * 4)
    n_threads = torch.get_num_threads()
    tr = PEFTransformer(model, kind="low_rank", n_values=20, batch_size=2, n_jobs=2).fit(X)
    tr.compute(X[:2])  # checked: later calls are threaded from the first batch
    it = tr.iter_compute(X)
    next(it)
    it.close()  # an early stop (or Ctrl-C in the consumer) ends the workers first
    assert torch.get_num_threads() == n_threads
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert all(p.requires_grad for p in model.parameters())

    def forward(m, batch):  # fails on the last, odd-sized batch, in a worker thread
        if batch.shape[0] == 1:
            raise RuntimeError("bad batch")
        return m(batch)

    tr = PEFTransformer(model, kind="low_rank", n_values=20, batch_size=2, n_jobs=2,
                        forward=forward).fit(X)
    tr.compute(X[:2])
    with pytest.raises(RuntimeError, match="bad batch"):
        tr.compute(X[:7])
    assert torch.get_num_threads() == n_threads
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_train_mode_refused():
    model, X, _ = make_model("mlp")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        PEFTransformer(model).fit(X)
    tr = PEFTransformer(model, allow_train_mode=True, kind="low_rank", n_values=10**9,
                        dtype="float64").fit(X)
    res = tr.transform(X)  # no dropout here, so exact
    model.eval()
    ref = PEFTransformer(model, kind="low_rank", n_values=10**9, dtype="float64").fit(X)
    assert np.allclose(res.toarray(), ref.transform(X).toarray())
    conv, Xc, _ = make_model("conv")
    conv.bn.train()
    with pytest.raises(ValueError, match="batch norm"):
        PEFTransformer(conv, allow_train_mode=True).fit(Xc)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "full"}, "kind"),
        ({"n_values": 0}, "n_values"),
        ({"n_values": 2.5}, "n_values"),
        ({"n_classes": 0}, "n_classes"),
        ({"n_classes": 5}, "n_classes=5 is larger"),
        ({"min_class_prob": 1.5}, "min_class_prob"),
        ({"min_norm": -1.0}, "min_norm"),
        ({"min_norm": float("nan")}, "min_norm"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"n_jobs": -2}, "n_jobs"),
        ({"n_jobs": 1.5}, "n_jobs"),
        ({"n_jobs": "many"}, "n_jobs"),
        ({"dtype": "int8"}, "dtype"),
        ({"params": ["nope"]}, "params"),
        ({"params": "net.0.weight"}, "params"),
        ({"forward": 3}, "forward"),
        ({"device": "meta"}, "device"),
    ],
)
def test_bad_parameters(kwargs, match):
    model, X, _ = make_model("mlp")
    with pytest.raises(ValueError, match=match):
        PEFTransformer(model, **kwargs).fit(X)


def test_bad_inputs_and_not_fitted():
    model, X, _ = make_model("mlp")
    tr = PEFTransformer(model)
    with pytest.raises(NotFittedError):
        tr.transform(X)
    with pytest.raises(ValueError, match="X"):
        tr.fit(object())
    with pytest.raises(ValueError, match="no example"):
        tr.fit(X[:0])
    with pytest.raises(ValueError, match="logits"):
        PEFTransformer(nn.Linear(6, 3).double().eval(), forward=lambda m, b: m(b)[:, 0]).fit(X)
    # sklearn contract: params stored untouched
    assert tr.get_params()["model"] is model
    assert clone(tr).get_params()["kind"] == "diagonal"


def test_zero_norm_examples_warn_and_stay_empty():
    model, X, _ = make_model("mlp")
    tr = PEFTransformer(model, kind="low_rank", n_values=10, min_class_prob=0.99).fit(X)
    with pytest.warns(UserWarning, match="zero PEF"):
        res = tr.compute(X)
    assert res.pefs.shape[0] == X.shape[0] and res.pefs.nnz == 0
    assert (res.norms == 0).all()


def test_int64_indices_when_needed():
    m = csr_from_parts(np.ones(2, np.float32), np.array([0, 2**31 + 5]),
                       np.array([0, 1, 2]), (2, 2**32), index_dtype="auto")
    assert m.indices.dtype == np.int64 and m.indptr.dtype == np.int64
    m = csr_from_parts(np.ones(1, np.float32), np.array([3]), np.array([0, 1]), (1, 10),
                       index_dtype="auto")
    assert m.indices.dtype == np.int32


def test_verbose_progress(capsys):
    model, X, _ = make_model("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PEFTransformer(model, verbose=1, n_values=3).fit(X).transform(X)
    captured = capsys.readouterr()
    assert "9" in captured.err + captured.out


def test_tiny_bert_dict_batches():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=12, num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 40, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    items = [{"input_ids": ids[i], "attention_mask": mask[i],
              "token_type_ids": torch.zeros_like(ids[i])} for i in range(4)]

    def fwd(m, b):
        return m(**b).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = PEFTransformer(model, kind="low_rank", n_values=10**9, dtype="float64",
                            forward=fwd, batch_size=2).fit(items)
        res = tr.compute(items)
    xs = [{k: v[None] for k, v in it.items()} for it in items]
    rows, norms = lrm_rows(naive_a(model, xs, forward=fwd))
    assert _rel(res.pefs.toarray(), rows) <= 1e-5
    assert np.allclose(res.norms, norms, rtol=1e-5)


def test_resnet18_eval():
    try:
        import torchvision
    except Exception as exc:  # a wheel built for another torch raises at import
        pytest.skip(f"torchvision unavailable: {type(exc).__name__}: {exc}")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    X = torch.randn(2, 3, 32, 32)
    res = PEFTransformer(model, kind="diagonal", n_values=1000).fit(X).compute(X)
    A = naive_a(model, [X[i : i + 1] for i in range(2)], dtype=torch.float32)
    rows, norms = diag_rows(A.astype(np.float64))
    assert np.allclose(res.norms, norms, rtol=1e-3)
    assert np.allclose(res.pefs.toarray(), topk_dense(rows, 1000), atol=1e-4 * rows.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_cuda_matches_cpu(kind):
    model, X, _ = make_model("conv", torch.float32)
    cpu = PEFTransformer(model, kind=kind, n_values=50).fit(X).compute(X)
    gpu_model = copy.deepcopy(model).cuda()
    res = PEFTransformer(gpu_model, kind=kind, n_values=50).fit(X).compute(X)
    assert np.allclose(res.norms, cpu.norms, rtol=1e-4)
    _assert_same_topk(res.pefs.toarray(), cpu.pefs.toarray(), atol=1e-4 * abs(cpu.pefs).max())


def _assert_same_topk(got, want, atol):
    """Rows of kept entries agree up to the order of ties at the cut-off.

    The conv model's diagonal rows have exact ties at the 50th value (row 1), and
    which of the tied entries a selection keeps is up to its order of operations (the
    GPU keeps the other one): where the kept sets differ, every entry kept by only one
    side must lie at the other side's cut-off magnitude (the entry it displaced).
    """
    for g, w in zip(got, want, strict=True):
        sg, sw = np.flatnonzero(g), np.flatnonzero(w)
        assert sg.size == sw.size
        both = np.intersect1d(sg, sw)
        assert np.allclose(g[both], w[both], atol=atol)
        for row, only, other in ((g, np.setdiff1d(sg, sw), w), (w, np.setdiff1d(sw, sg), g)):
            cut = np.abs(other[other != 0]).min()
            assert np.allclose(np.abs(row[only]), cut, atol=atol)


def test_same_topk_helper_allows_ties_only():
    tied = np.array([[3.0, 2.0, 0.0, 0.0, 0.0]])
    ref = np.array([[3.0, 0.0, 2.0, 0.0, 0.0]])
    _assert_same_topk(tied, ref, atol=1e-9)  # the tie at the cut-off: either may be kept
    with pytest.raises(AssertionError):
        _assert_same_topk(np.array([[3.0, 0.0, 0.0, 0.0, 1.0]]), ref, atol=1e-9)
    with pytest.raises(AssertionError):
        _assert_same_topk(np.array([[3.0, 2.5, 0.0, 0.0, 0.0]]), ref, atol=1e-9)
