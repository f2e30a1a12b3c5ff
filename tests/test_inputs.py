"""The input forms PEFTransformer accepts, and the clear errors for those it cannot use."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sknpeff.pef import PEFTransformer
from sknpeff.pef._inputs import example_rows, holds_text, iter_batches, n_examples, take_rows

from ._pef_reference import MLP

DL = torch.utils.data.DataLoader


def _mlp(n=10, seed=0):
    torch.manual_seed(seed)
    return MLP().double().eval(), torch.randn(n, 6, dtype=torch.float64)


def _same(a, b):
    assert (a.pefs != b.pefs).nnz == 0
    np.testing.assert_array_equal(a.norms, b.norms)
    np.testing.assert_array_equal(a.logits, b.logits)


class BagOfTokens(nn.Module):
    """Mean of the token embeddings over the attention mask, then a linear head."""

    def __init__(self, vocab=30, dim=8, n_out=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.to(self.emb.weight.dtype)[..., None]
        return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))


def _bag(seed=0):
    torch.manual_seed(seed)
    return BagOfTokens().double().eval()


def _pad(items):
    """A tokenizer-style padding collate: per-example dicts of 1-D tensors in, padded
    ``input_ids`` and ``attention_mask`` out."""
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = it["input_ids"]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _tok(texts, padding=False, return_tensors=None):
    """A toy tokenizer: one id per character (``ord % 29 + 1``), 0 for padding."""
    assert padding and return_tensors == "pt"
    return _pad([{"input_ids": torch.tensor([ord(c) % 29 + 1 for c in t])} for t in texts])


def _ragged_items(lengths=(5, 3, 5, 4)):
    torch.manual_seed(1)
    return [{"input_ids": torch.randint(1, 30, (n,))} for n in lengths]


# -- 1. DataLoaders ------------------------------------------------------------------------------


def test_dataloader_batches_as_they_come():
    model, X = _mlp()
    ref = PEFTransformer(model, kind="low_rank", n_values=40, batch_size=4).fit(X).compute(X)
    calls = []

    def collate(items):
        calls.append(len(items))
        return torch.utils.data.default_collate(items)

    loader = DL(torch.utils.data.TensorDataset(X), batch_size=4, collate_fn=collate)
    tr = PEFTransformer(model, kind="low_rank", n_values=40, batch_size=2).fit(loader)
    assert calls == [4]  # fit reads one batch
    res = tr.compute(loader)  # the loader's batch size, not batch_size=2
    assert calls[1:] == [4, 4, 2]
    _same(res, ref)
    _same(tr.set_params(n_jobs=2).compute(loader), ref)  # batches run in worker threads
    assert n_examples(loader) == 10
    assert n_examples(DL(X, batch_size=4, drop_last=True)) == 8
    assert n_examples(DL(X, batch_size=None)) is None  # every item is a batch

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(X)

    assert n_examples(DL(Stream(), batch_size=4)) is None
    _same(tr.compute(DL(Stream(), batch_size=4)), ref)


def test_dataloader_with_padding_collate():
    model = _bag()
    items = _ragged_items((5, 3, 5, 4, 2, 6, 3))
    loader = DL(items, batch_size=3, collate_fn=_pad)
    tr = PEFTransformer(model, kind="diagonal", n_values=10_000).fit(loader)
    res = tr.compute(loader)
    padded = _pad(items)  # the same examples as one padded dict of tensors
    ref = PEFTransformer(model, kind="diagonal", n_values=10_000, batch_size=3).fit(
        padded).compute(padded)
    np.testing.assert_allclose(res.pefs.toarray(), ref.pefs.toarray(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-9)


def test_dataloader_progress_shuffle_and_take_rows(capsys):
    model, X = _mlp()
    loader = DL(X, batch_size=4)
    PEFTransformer(model, n_values=5, verbose=1).fit(loader).compute(loader)
    assert "/10" in capsys.readouterr().err  # total from the loader's sampler
    tr = PEFTransformer(model, n_values=5).fit(X)
    with pytest.warns(UserWarning, match="shuffle=False") as rec:
        tr.compute(DL(X, batch_size=4, shuffle=True))
    assert rec[0].filename == __file__
    with pytest.raises(ValueError, match="DataLoader"):
        take_rows(loader, [0, 1])
    with pytest.raises(ValueError, match="no example"):
        tr.fit(DL(X[:0], batch_size=4))


# -- 2. variable-length items --------------------------------------------------------------------


def test_variable_length_items_clear_error():
    model = _bag()
    items = _ragged_items()
    tr = PEFTransformer(model, n_values=5, batch_size=4,
                        forward=lambda m, b: m(b["input_ids"], torch.ones_like(b["input_ids"])))
    with pytest.raises(ValueError, match="different lengths") as exc:
        tr.fit(items)
    msg = str(exc.value)
    assert "['input_ids']" in msg and "(5,)" in msg and "(3,)" in msg
    assert "DataLoader" in msg and "collate_fn" in msg
    # a Dataset of such items, and a later batch (global indices)
    with pytest.raises(ValueError, match="different lengths"):
        tr.fit(torch.utils.data.Subset(items, [0, 1]))
    later = _ragged_items((4, 4, 4, 4, 4, 6))
    tr.fit(later)
    with pytest.raises(ValueError, match=r"\(4,\) \(example 4\); \(6,\) \(example 5\)"):
        tr.compute(later)
    # ragged lists of numbers
    with pytest.raises(ValueError, match="different lengths"):
        list(iter_batches([[1, 2, 3], [4, 5]], 2))


# -- 3. (inputs, targets) tuples -----------------------------------------------------------------


def test_tuple_of_arrays_is_columns():
    model, X = _mlp()
    y = torch.arange(10) % 3
    tr = PEFTransformer(model, kind="low_rank", n_values=40, batch_size=4)
    ref = tr.fit(X).compute(X)
    for Xy in ((X, y), (X.numpy(), y.numpy()), (X,)):
        assert n_examples(Xy) == 10
        _same(tr.fit(Xy).compute(Xy), ref)
    batch = next(iter_batches((X, y), 4))
    assert isinstance(batch, tuple) and batch[0].shape == (4, 6) and batch[1].shape == (4,)
    sub = take_rows((X, y), [2, 5])
    assert isinstance(sub, tuple) and torch.equal(sub[0], X[[2, 5]])
    # a list stays a list of per-example items
    assert n_examples([X, y]) == 2


# -- 4. strings with a tokenizing forward --------------------------------------------------------


def test_strings_with_tokenizing_forward():
    model = _bag()
    texts = ["a text", "another one", "hi", "a longer text here", "x"]
    seen = []

    def fwd(m, batch):
        seen.append(batch)
        return m(**_tok(batch, padding=True, return_tensors="pt"))

    tr = PEFTransformer(model, n_values=10_000, batch_size=2, forward=fwd).fit(texts)
    res = tr.compute(texts)
    assert all(isinstance(b, list) and all(isinstance(t, str) for t in b) for b in seen)
    assert seen[-3:] == [texts[:2], texts[2:4], texts[4:]]
    ref = PEFTransformer(model, n_values=10_000, batch_size=2).fit(_tok(texts[:2], True, "pt"))
    want = [ref.compute(_tok(texts[i:i + 2], True, "pt")) for i in range(0, 5, 2)]
    np.testing.assert_allclose(res.norms, np.concatenate([w.norms for w in want]), rtol=1e-12)
    # an array of strings, and a model that tokenizes itself (the default forward)
    res2 = tr.compute(np.array(texts))
    np.testing.assert_array_equal(res2.norms, res.norms)

    class Tokenizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, texts):
            return self.inner(**_tok(texts, padding=True, return_tensors="pt"))

    tr3 = PEFTransformer(Tokenizing().eval(), n_values=10_000, batch_size=2)
    res3 = tr3.fit(texts).compute(texts)
    np.testing.assert_array_equal(res3.norms, res.norms)


class _ScaledTexts(nn.Module):
    """A model of strings with a parameter no layer rule covers (the generic path)."""

    def __init__(self):
        super().__init__()
        self.inner = _bag()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, texts):
        return self.inner(**_tok(texts, padding=True, return_tensors="pt")) * self.scale


def test_strings_split_per_example():
    batch = {"text": ["a", "bb", "ccc"], "x": torch.arange(3), "t": 2.0}
    assert holds_text(batch) and holds_text((["a"], torch.ones(1)))
    assert not holds_text({"x": torch.arange(3)}) and not holds_text([torch.ones(2)])
    sub = example_rows(batch, 1, 3)
    assert sub["text"] == ["bb", "ccc"] and sub["x"].tolist() == [1, 2] and sub["t"] == 2.0


def test_strings_on_the_generic_path():
    model = _ScaledTexts().eval()
    texts = ["a text", "another one", "hi", "a longer text here", "x"]
    tr = PEFTransformer(model, n_values=10_000)
    one = tr.set_params(batch_size=1).fit(texts).compute(texts)
    two = tr.set_params(batch_size=2).fit(texts).compute(texts)
    np.testing.assert_allclose(two.norms, one.norms, rtol=1e-10)


# -- 5. lists of lists of numbers ----------------------------------------------------------------


def test_list_of_number_lists_is_rows():
    model, X = _mlp()
    tr = PEFTransformer(model, kind="low_rank", n_values=40, batch_size=4)
    ref = tr.fit(X).compute(X)
    for rows in (X.tolist(), [tuple(r) for r in X.tolist()]):
        _same(tr.fit(rows).compute(rows), ref)
    assert next(iter_batches([[1, 2, 3], [4, 5, 6]], 2)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"different lengths.*\(6,\) \(example 0\); "
                                         r"\(5,\) \(example 1\)"):
        tr.fit([[1.0] * 6, [2.0] * 5])


# -- 6. 3-D logits -------------------------------------------------------------------------------


def test_sequence_logits_say_how_to_pick_a_position():
    model, X = _mlp()

    def per_position(m, b):  # (batch, seq_len, vocab)
        return m(b)[:, None, :].expand(-1, 4, -1)

    with pytest.raises(ValueError, match=r"position=\.\.\..*'last_nonpad'"):
        PEFTransformer(model, forward=per_position).fit(X)
    with pytest.raises(ValueError, match=r"return it as shape \(batch, 1\)"):
        PEFTransformer(model, forward=lambda m, b: m(b)[:, 0]).fit(X)
    # the engine's check (a forward changed after fit)
    tr = PEFTransformer(model, n_values=5).fit(X)
    tr.forward = per_position
    with pytest.raises(ValueError, match=r"position=\.\.\..*'last_nonpad'"):
        tr.compute(X)


# -- 7. NaN and infinity -------------------------------------------------------------------------


def test_nonfinite_inputs_are_named():
    model, X = _mlp(12)
    tr = PEFTransformer(model, n_values=5, batch_size=4).fit(X)
    Xb = X.clone()
    Xb[5, 1] = float("nan")
    Xb[6, 0] = float("inf")
    for Xi in (Xb, Xb.numpy(), list(Xb), {"x": Xb}):
        t = tr if not isinstance(Xi, dict) else PEFTransformer(
            model, n_values=5, batch_size=4, forward=lambda m, b: m(b["x"])).fit(Xi)
        with pytest.raises(ValueError, match="2 example") as exc:
            t.compute(Xi)
        msg = str(exc.value)
        assert "of the batch of examples 4 to 7 give NaN or infinity" in msg
        assert "logits of example(s) 5;" in msg and "PEF norms of example(s) 6" in msg
        assert "inputs of examples 5, 6 hold NaN or infinity" in msg
    with pytest.raises(ValueError, match="could not be checked"):
        tr.compute(DL(Xb, batch_size=4))
    with pytest.raises(ValueError, match="example"):
        list(tr.iter_compute(Xb))


def test_nonfinite_model_and_masked_classes():
    model, X = _mlp()
    bad = MLP().double().eval()
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(bad.parameters())[0, 0] = float("nan")
    tr = PEFTransformer(bad, n_values=5).fit(X)
    with pytest.raises(ValueError, match="are finite: the model makes"):
        tr.compute(X)
    # -inf logits of masked-out classes stay fine (the other classes are finite)
    mask = torch.tensor([False, False, True, False])
    masked = PEFTransformer(model, kind="low_rank", n_values=40,
                            forward=lambda m, b: m(b).masked_fill(mask, float("-inf")))
    res = masked.fit(X).compute(X)
    assert np.isfinite(res.norms).all()


# -- 8. probabilities instead of logits ----------------------------------------------------------


def test_probabilities_warn_not_logits():
    model, X = _mlp()
    with pytest.warns(UserWarning, match="look like probabilities") as rec:
        PEFTransformer(nn.Sequential(model, nn.Softmax(1)).eval(), n_values=5).fit(X)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PEFTransformer(nn.Sequential(model, nn.LogSoftmax(1)).eval(), n_values=5).fit(X)
        PEFTransformer(model, n_values=5).fit(X)
