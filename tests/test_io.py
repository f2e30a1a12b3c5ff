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
