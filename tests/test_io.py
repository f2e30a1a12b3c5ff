"""Tests of sknpeff.io: exact, memory-mapped round trips and streaming writes."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sknpeff.io import PEFWriter, iter_row_batches, load_pefs, save_pefs
from sknpeff.layout import ParameterLayout
from sknpeff.pef import PEFTransformer

from ._pef_reference import MLP


def _random_csr(n=7, m=50, density=0.2, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=dtype)
    keep = np.ones(n, dtype=dtype)
    keep[3] = 0  # an empty row
    X = (sp.diags(keep) @ X).tocsr()
    X.eliminate_zeros()
    return X


def test_round_trip_exact_and_memory_mapped(tmp_path):
    X = _random_csr()
    norms = np.arange(7, dtype=np.float64)
    layout = ParameterLayout(["w", "b"], [(5, 8), (10,)])
    save_pefs(tmp_path / "s", X, norms, kind="diagonal", layout=layout,
              metadata={"note": "x"})
    res = load_pefs(tmp_path / "s")
    assert isinstance(res.pefs.data, np.memmap)
    assert isinstance(res.pefs.indices, np.memmap)
    assert res.pefs.indices.dtype == res.pefs.indptr.dtype == np.int32
    assert res.pefs.dtype == np.float32 and res.pefs.shape == X.shape
    assert (res.pefs != X).nnz == 0
    assert np.array_equal(res.norms, norms)
    assert res.logits is None and res.predictions is None
    assert res.metadata["layout"] == layout and res.metadata["kind"] == "diagonal"
    assert res.metadata["metadata"] == {"note": "x"}
    # in-memory load
    res2 = load_pefs(tmp_path / "s", mmap=False)
    assert not isinstance(res2.pefs.data, np.memmap)
    assert (res2.pefs != X).nnz == 0
    # usable by scipy without copying into a new format
    assert np.allclose(res.pefs @ np.ones(50), X @ np.ones(50))


def test_writer_appends_batches(tmp_path):
    X = _random_csr(n=23, seed=1, dtype=np.float64)
    logits = np.random.default_rng(0).normal(size=(23, 3))
    with PEFWriter(tmp_path / "w", n_cols=50, kind="low_rank", n_classes=2,
                   dtype="float64") as w:
        for s in range(0, 23, 5):
            w.append(X[s : s + 5], norms=np.ones(min(5, 23 - s)),
                     logits=logits[s : s + 5], predictions=logits[s : s + 5].argmax(1))
    res = load_pefs(tmp_path / "w")
    assert (res.pefs != X).nnz == 0 and res.pefs.dtype == np.float64
    assert np.array_equal(res.logits, logits)
    assert np.array_equal(res.predictions, logits.argmax(1))
    assert res.metadata["n_classes"] == 2
    blocks = list(iter_row_batches(tmp_path / "w", 4))
    assert [b.shape[0] for b in blocks] == [4, 4, 4, 4, 4, 3]
    assert (sp.vstack(blocks) != X).nnz == 0


def test_writer_errors(tmp_path):
    with PEFWriter(tmp_path / "a", n_cols=50) as w:
        with pytest.raises(ValueError, match="columns"):
            w.append(sp.csr_matrix((2, 49)))
        w.append(_random_csr(), logits=np.zeros((7, 2)))
        with pytest.raises(ValueError, match="logits"):
            w.append(_random_csr())
    with pytest.raises(FileExistsError):
        PEFWriter(tmp_path / "a", n_cols=50)
    PEFWriter(tmp_path / "a", n_cols=50, overwrite=True).close()
    assert load_pefs(tmp_path / "a").pefs.shape == (0, 50)
    with pytest.raises(FileNotFoundError):
        load_pefs(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a PEF store"):
        load_pefs(tmp_path / "bad")


def test_int64_indices_for_wide_rows(tmp_path):
    n_cols = 2**31 + 10
    X = sp.csr_matrix((np.array([1.0, 2.0], np.float32),
                       np.array([5, 2**31 + 3], np.int64), np.array([0, 1, 2], np.int64)),
                      shape=(2, n_cols))
    save_pefs(tmp_path / "wide", X)
    res = load_pefs(tmp_path / "wide")
    assert res.pefs.indices.dtype == np.int64 and res.pefs.indptr.dtype == np.int64
    assert list(res.pefs.indices) == [5, 2**31 + 3]


def test_compute_streams_to_disk(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    X = torch.randn(10, 6)
    tr = PEFTransformer(model, kind="low_rank", n_values=13, batch_size=3).fit(X)
    ref = tr.compute(X)
    res = tr.compute(X, out=tmp_path / "pefs")
    assert isinstance(res.pefs.data, np.memmap)
    assert (res.pefs != ref.pefs).nnz == 0
    assert np.array_equal(res.norms, ref.norms)
    assert np.array_equal(res.logits, ref.logits)
    assert res.metadata["layout"] == tr.layout_
    assert res.metadata["n_classes"] == tr.n_classes_
    # a PEFResult saves with its metadata
    save_pefs(tmp_path / "again", ref)
    again = load_pefs(tmp_path / "again")
    assert (again.pefs != ref.pefs).nnz == 0 and again.metadata["kind"] == "low_rank"


# ------------------------------------------------------------------------------------------
# Incomplete stores: only a clean close marks a store complete
# ------------------------------------------------------------------------------------------


class _Interrupting(torch.nn.Module):
    """Wraps a model; once armed, its third forward call raises ``error``."""

    def __init__(self, inner, error):
        super().__init__()
        self.inner, self.error, self.armed, self.calls = inner, error, False, 0

    def forward(self, x):
        if self.armed:
            self.calls += 1
            if self.calls > 2:
                raise self.error
        return self.inner(x)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError("boom")])
def test_interrupted_compute_leaves_an_incomplete_store(tmp_path, error):
    torch.manual_seed(0)
    model = _Interrupting(MLP(), error).eval()
    X = torch.randn(10, 6)
    tr = PEFTransformer(model, kind="low_rank", n_values=13, batch_size=3).fit(X)
    ref = tr.compute(X)
    model.armed = True
    with pytest.raises(type(error) if isinstance(error, Exception) else error):
        tr.compute(X, out=tmp_path / "pefs")
    with pytest.raises(ValueError, match=r"incomplete PEF store.*after 6 rows"):
        load_pefs(tmp_path / "pefs")
    res = load_pefs(tmp_path / "pefs", allow_incomplete=True)
    assert res.metadata["complete"] is False
    assert res.pefs.shape == (6, tr.n_features_out_)
    assert (res.pefs != ref.pefs[:6]).nnz == 0
    assert np.array_equal(res.norms, ref.norms[:6])
    assert np.array_equal(res.logits, ref.logits[:6])
    # a clean run over it (overwrite) is complete again
    model.armed = False
    done = tr.compute(X, out=tmp_path / "pefs", overwrite=True)
    assert done.metadata["complete"] is True and done.pefs.shape[0] == 10


def test_writer_block_that_raised_is_incomplete(tmp_path):
    X = _random_csr(n=12, seed=2)
    with pytest.raises(KeyboardInterrupt), PEFWriter(tmp_path / "s", n_cols=50) as w:
        w.append(X[:5], norms=np.ones(5), predictions=np.arange(5))
        raise KeyboardInterrupt
    with pytest.raises(ValueError, match="incomplete.*5 rows.*allow_incomplete"):
        load_pefs(tmp_path / "s")
    res = load_pefs(tmp_path / "s", allow_incomplete=True, mmap=False)
    assert (res.pefs != X[:5]).nnz == 0 and list(res.predictions) == list(range(5))
    assert list(iter_row_batches(res, 2))[-1].shape == (1, 50)


def test_interrupt_inside_append_keeps_whole_batches(tmp_path, monkeypatch):
    X = _random_csr(n=12, seed=3)
    with pytest.raises(KeyboardInterrupt), PEFWriter(tmp_path / "s", n_cols=50) as w:
        w.append(X[:4], norms=np.arange(4.0), logits=np.ones((4, 2)))

        def interrupted(rows):
            raise KeyboardInterrupt

        monkeypatch.setattr(w._indices, "append", interrupted)  # after logits and data
        w.append(X[4:8], norms=np.arange(4.0), logits=np.ones((4, 2)))
    res = load_pefs(tmp_path / "s", allow_incomplete=True)
    assert res.pefs.shape == (4, 50) and (res.pefs != X[:4]).nnz == 0
    assert res.logits.shape == (4, 2) and res.norms.shape == (4,)


def test_unclosed_writer_is_incomplete(tmp_path):
    w = PEFWriter(tmp_path / "s", n_cols=50)
    w.append(_random_csr())
    with pytest.raises(ValueError, match="incomplete"):
        load_pefs(tmp_path / "s")
    w.close()
    assert load_pefs(tmp_path / "s").metadata["complete"] is True


def test_refused_batch_writes_nothing(tmp_path):
    with PEFWriter(tmp_path / "s", n_cols=50) as w:
        w.append(_random_csr(), logits=np.zeros((7, 2)), predictions=np.zeros(7))
        with pytest.raises(ValueError, match="predictions"):
            w.append(_random_csr(), logits=np.zeros((7, 2)))
        with pytest.raises(ValueError, match="logits"):
            w.append(_random_csr(), logits=np.zeros((6, 2)), predictions=np.zeros(7))
    res = load_pefs(tmp_path / "s")
    assert res.pefs.shape[0] == res.logits.shape[0] == res.predictions.shape[0] == 7


def _write_version_1_store(path, X, norms):
    """A store exactly as version 1 wrote it (no "complete" mark)."""
    path.mkdir()
    np.save(path / "data.npy", X.data)
    np.save(path / "indices.npy", X.indices.astype(np.int32))
    np.save(path / "indptr.npy", X.indptr.astype(np.int32))
    np.save(path / "norms.npy", norms)
    meta = {"format": "sknpeff-pefs", "version": 1, "shape": list(X.shape), "nnz": X.nnz,
            "dtype": X.dtype.str, "index_dtype": "<i4", "kind": "diagonal",
            "n_classes": None, "layout": None, "has_logits": False,
            "has_predictions": False, "metadata": {}}
    (path / "meta.json").write_text(json.dumps(meta))


def test_version_1_store_still_loads(tmp_path):
    X = _random_csr()
    _write_version_1_store(tmp_path / "old", X, np.arange(7.0))
    res = load_pefs(tmp_path / "old")
    assert res.metadata["complete"] is True
    assert (res.pefs != X).nnz == 0 and np.array_equal(res.norms, np.arange(7.0))


# ------------------------------------------------------------------------------------------
# overwrite=True replaces PEF stores only
# ------------------------------------------------------------------------------------------


def _user_dir(path):
    path.mkdir()
    np.save(path / "data.npy", np.arange(5))
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.parametrize("how", ["save_pefs", "PEFWriter"])
def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path, how):
    path = _user_dir(tmp_path / "mine")
    with pytest.raises(FileExistsError, match=r"mine.*not a PEF store"):
        if how == "save_pefs":
            save_pefs(path, _random_csr(), overwrite=True)
        else:
            PEFWriter(path, n_cols=50, overwrite=True)
    assert np.array_equal(np.load(path / "data.npy"), np.arange(5))
    assert sorted(p.name for p in path.iterdir()) == ["data.npy", "notes.txt"]
    (path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FileExistsError, match="not a PEF store"):
        save_pefs(path, _random_csr(), overwrite=True)
    assert np.array_equal(np.load(path / "data.npy"), np.arange(5))


def test_overwrite_refuses_a_store_with_other_files(tmp_path):
    save_pefs(tmp_path / "s", _random_csr())
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"other files \(notes.txt\)"):
        save_pefs(tmp_path / "s", _random_csr(n=4), overwrite=True)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    assert load_pefs(tmp_path / "s").pefs.shape == (7, 50)


def test_overwrite_replaces_a_store_and_refuses_a_file(tmp_path):
    save_pefs(tmp_path / "s", _random_csr(), logits=np.zeros((7, 2)))
    X = _random_csr(n=4, seed=5)
    save_pefs(tmp_path / "s", X, overwrite=True)
    res = load_pefs(tmp_path / "s")
    assert (res.pefs != X).nnz == 0 and res.logits is None
    assert not (tmp_path / "s" / "logits.npy").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pefs(tmp_path / "f", X, overwrite=True)
    (tmp_path / "empty").mkdir()
    save_pefs(tmp_path / "empty", X)
    assert load_pefs(tmp_path / "empty").pefs.shape == (4, 50)
