"""Language models: the explained position, tokenizer batches, padding, exactness."""

import warnings

import numpy as np
import pytest
import torch

from sknpeff.pef import PEFTransformer, pad_token_ids
from sknpeff.pef._position import last_nonpad_positions
from sknpeff.pef.rules import rule_for

from ._pef_reference import diag_rows, lrm_rows, naive_a

transformers = pytest.importorskip("transformers", reason="transformers not installed")

V = 23  # vocabulary


def _gpt2(seed=0, attn="sdpa"):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=1,
                                  n_head=2, bos_token_id=0, eos_token_id=0,
                                  attn_implementation=attn)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=12,
                                  max_position_embeddings=16, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(cfg).double().eval()


def _seqs(lengths=(5, 3, 6, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def _naive(model, seqs, pos_of, n_classes=None):
    """Dense a's of each unpadded sequence alone, at position ``pos_of(seq)``."""
    xs = [torch.tensor([s]) for s in seqs]
    out = []
    for x, s in zip(xs, seqs, strict=True):
        p = pos_of(s)
        out.append(naive_a(model, [x], n_classes=n_classes,
                           forward=lambda m, b, p=p: m(input_ids=b).logits[:, p, :])[0])
    return np.stack(out)


def _rel(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def _no_slow_path():
    """Warnings of the generic path (per-layer rules refused, the per-example loop)
    become errors."""
    warnings.filterwarnings("error", message=".*per-layer rules do not apply.*")
    warnings.filterwarnings("error", message=".*loop over examples.*")


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_gpt2_last_nonpad_exact_and_fast_path(kind):
    model = _gpt2()
    seqs = _seqs()
    with warnings.catch_warnings():
        _no_slow_path()
        tr = PEFTransformer(model, kind=kind, n_values=10**9, n_classes=4, dtype="float64",
                            position="last_nonpad", batch_size=3)
        res = tr.fit(seqs).compute(seqs)  # ragged token ids: padded per batch
    A = _naive(model, seqs, lambda s: len(s) - 1, n_classes=4)
    rows, norms = lrm_rows(A) if kind == "low_rank" else diag_rows(A)
    assert _rel(res.pefs.toarray(), rows) <= 1e-6
    np.testing.assert_allclose(res.norms, norms, rtol=1e-6)
    # GPT-2's Conv1D projections are covered by a layer rule (no generic path)
    assert type(rule_for(model.transformer.h[0].attn.c_attn)).__name__ == "HFConv1DRule"


def test_gpt2_padded_equals_unpadded_and_left_padding():
    model = _gpt2(attn="eager")
    seqs = _seqs((4, 4, 2, 6, 3))
    padded = pad_token_ids(seqs, pad_id=7)
    tr = PEFTransformer(model, kind="low_rank", n_values=10**9, n_classes=3,
                        dtype="float64", position="last_nonpad", batch_size=5)
    res = tr.fit(padded).compute(padded)
    alone = [tr.fit(pad_token_ids([s])).compute(pad_token_ids([s])) for s in seqs]  # unpadded
    for i, r in enumerate(alone):
        assert _rel(res.pefs[i].toarray(), r.pefs.toarray()) <= 1e-9
        np.testing.assert_allclose(res.logits[i], r.logits[0], rtol=1e-9)
    # the last non-padding position from the mask, right or left padding
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_nonpad_positions(mask).tolist() == [1, 3, 3, -1]


def test_bert_masked_position_exact():
    model = _bert()
    seqs = _seqs((5, 5, 5))
    X = torch.tensor(seqs)
    with warnings.catch_warnings():
        _no_slow_path()
        res = PEFTransformer(model, kind="low_rank", n_values=10**9, n_classes=3,
                             dtype="float64", position=2).fit(X).compute(X)
    A = _naive(model, seqs, lambda s: 2, n_classes=3)
    rows, norms = lrm_rows(A)
    assert _rel(res.pefs.toarray(), rows) <= 1e-6
    np.testing.assert_allclose(res.norms, norms, rtol=1e-6)


def test_bert_per_example_positions_padded_equals_unpadded():
    model = _bert()
    seqs = _seqs((5, 3, 6, 4))
    pos = np.array([1, 2, 0, 3])
    common = dict(kind="low_rank", n_values=10**9, n_classes=3, dtype="float64")
    # an array aligned with X, and a column of dict batches: the same rows
    padded = pad_token_ids(seqs)
    with warnings.catch_warnings():
        _no_slow_path()  # BERT's tied prediction bias too takes the per-layer rules
        a = PEFTransformer(model, position=pos, batch_size=3, **common).fit(padded).compute(
            padded)
    col = dict(padded, where=torch.from_numpy(pos))
    b = PEFTransformer(model, position="where", batch_size=2, **common).fit(col).compute(col)
    assert _rel(b.pefs.toarray(), a.pefs.toarray()) <= 1e-12
    for i, s in enumerate(seqs):
        one = PEFTransformer(model, position=int(pos[i]), **common).fit(
            torch.tensor([s])).compute(torch.tensor([s]))
        assert _rel(a.pefs[i].toarray(), one.pefs.toarray()) <= 1e-9
    A = _naive(model, seqs, lambda s: int(pos[seqs.index(s)]), n_classes=3)
    assert _rel(a.pefs.toarray(), lrm_rows(A)[0]) <= 1e-6


def test_position_options_agree():
    model = _gpt2()
    X = torch.tensor(_seqs((6, 6, 6)))
    common = dict(kind="diagonal", n_values=10**9, n_classes=2, dtype="float64")
    ref = PEFTransformer(model, position="last", **common).fit(X).compute(X)
    for pos in (-1, 5, np.full(3, 5), [5, 5, 5], "last_nonpad"):
        Xp = X if not isinstance(pos, str) or pos == "last" else {
            "input_ids": X, "attention_mask": torch.ones_like(X)}
        got = PEFTransformer(model, position=pos, **common).fit(Xp).compute(Xp)
        assert _rel(got.pefs.toarray(), ref.pefs.toarray()) <= 1e-12, pos


def test_tokenizer_batches_and_model_outputs():
    model = _gpt2()
    seqs = _seqs((3, 5))
    common = dict(kind="low_rank", n_values=10**9, n_classes=2, dtype="float64",
                  position="last_nonpad")
    ref = PEFTransformer(model, **common).fit(seqs).compute(seqs)
    # a tokenizer's unpadded output (lists), and its padded BatchEncoding
    enc = {"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]}
    be = transformers.BatchEncoding(pad_token_ids(seqs), tensor_type="pt")
    # a forward returning a dict holding the logits (a ModelOutput is both)
    fwd = lambda m, b: {"logits": m(**b).logits}  # noqa: E731
    for X, kw in ((enc, {}), (be, {}), (be, {"forward": fwd})):
        got = PEFTransformer(model, **common, **kw).fit(X).compute(X)
        assert _rel(got.pefs.toarray(), ref.pefs.toarray()) <= 1e-12
    assert PEFTransformer(model, **common).fit(enc).n_outputs_ == V


def test_position_errors():
    model = _gpt2()
    X = torch.tensor(_seqs((4, 4)))
    with pytest.raises(ValueError, match="position must be None, 'last'"):
        PEFTransformer(model, position=1.5).fit(X)
    with pytest.raises(ValueError, match="no 'attention_mask'"):
        PEFTransformer(model, position="last_nonpad").fit(X)
    with pytest.raises(ValueError, match="position=5 is out of range"):
        PEFTransformer(model, position=5).fit(X)
    with pytest.raises(ValueError, match="2 examples"):
        PEFTransformer(model, position=[1, 2, 3]).fit(X)
    with pytest.raises(ValueError, match="no such key"):
        PEFTransformer(model, position="where").fit({"input_ids": X})
    with pytest.raises(ValueError, match="leave position=None"):
        PEFTransformer(model, position="last",
                       forward=lambda m, b: m(b).logits[:, -1]).fit(X)
    with pytest.raises(ValueError, match="position=...*'last_nonpad'"):
        PEFTransformer(model).fit(X)  # 3-D logits without a position


def test_pad_token_ids():
    b = pad_token_ids({"input_ids": [[3, 4], [5]], "token_type_ids": [[1, 1], [1]]}, pad_id=9)
    assert b["input_ids"].tolist() == [[3, 4], [5, 9]]
    assert b["token_type_ids"].tolist() == [[1, 1], [1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="example 1 has 2 entries"):
        pad_token_ids({"input_ids": [[3, 4], [5]], "attention_mask": [[1, 1], [1, 1]]})


def test_report_renders_text_examples(tmp_path):
    from sknpeff.inspection import report

    W = np.array([[1.0, 0.0], [0.5, 0.2], [0.0, 1.0]])
    vocab = ["a", "<b>", "c"]
    ids = [[0, 1, 2], [2, 2], [1, 0, 0, 2]]
    html = open(report(tmp_path / "r.html", W=W, tokens=ids, decode=vocab,
                       positions=[1, -1, 0], k=2), encoding="utf-8").read()
    # example 0: "<b>" (escaped) is the explained token; example 2 marks its first token
    assert '<span class="tok at" title="explained position">&lt;b&gt;</span>' in html
    assert html.count('class="tok at"') == 4  # two components x two top examples
    # example 1 ("c c"): its last token is the explained one
    assert ('<span class="tok">c</span><span class="tok at" title="explained position">c'
            '</span></div>') in html
    # token strings and a decode function give the same page
    strs = [[vocab[t] for t in s] for s in ids]
    html2 = open(report(tmp_path / "s.html", W=W, tokens=strs, positions=[1, -1, 0], k=2),
                 encoding="utf-8").read()
    html3 = open(report(tmp_path / "d.html", W=W, tokens=ids, decode=lambda t: vocab[t],
                        positions=[1, -1, 0], k=2), encoding="utf-8").read()
    assert html2 == html == html3
    with pytest.raises(ValueError, match="tokens must have 3 entries"):
        report(tmp_path / "x.html", W=W, tokens=ids[:2])
    with pytest.raises(ValueError, match="positions must be"):
        report(tmp_path / "x.html", W=W, tokens=ids, positions=[0.5, 1, 2])
    with pytest.raises(ValueError, match="decode must be"):
        report(tmp_path / "x.html", W=W, tokens=ids, decode=3)


# -- the in-context learning task ----------------------------------------------------------------


def test_icl_task_truth():
    from sknpeff.datasets import MECHANISMS, make_icl_task

    task = make_icl_task(300, random_state=0)
    ids, ans, tok = task.input_ids.numpy(), task.answer, task.tokens
    assert ids.shape == (300, 8) and set(task.mechanism) == set(MECHANISMS)
    table, perm = {}, {}
    for seq, a, m in zip(ids, ans, task.mechanism, strict=True):
        words = [tok[t] for t in seq]
        pairs = dict(zip(words[0:6:2], words[1:6:2], strict=True))
        assert len(pairs) == 3 and all(k.startswith("k") for k in pairs)  # distinct keys
        marker, q = words[6], words[7]
        if m == "recall":
            assert marker == "Q" and tok[a] == pairs[q]
        elif m == "memorized":  # the same fixed value for a key, never in the context
            assert marker == "Q" and q.startswith("m") and q not in pairs
            assert table.setdefault(q, tok[a]) == tok[a]
        else:  # the recalled value through one fixed permutation
            assert marker == "F" and perm.setdefault(pairs[q], tok[a]) == tok[a]
    assert len(set(perm.values())) == len(perm)  # a permutation: one-to-one
    np.testing.assert_array_equal(task.needs_context, task.mechanism != "memorized")
    np.testing.assert_array_equal(task.needs_weights, task.mechanism != "recall")
    np.testing.assert_array_equal(np.array(MECHANISMS)[task.label], task.mechanism)
    # the tables depend on table_seed only: held-out sequences share them
    other = make_icl_task(300, random_state=1, mechanisms=["memorized"])
    for seq, a in zip(other.input_ids.numpy(), other.answer, strict=True):
        assert table.get(tok[seq[7]], tok[a]) == tok[a]
    with pytest.raises(ValueError, match="mechanisms must hold"):
        make_icl_task(3, mechanisms=["copy"])


def test_train_icl_model_is_seeded_and_learns_the_table():
    from sknpeff.datasets import TinyCausalLM, train_icl_model

    state = torch.random.get_rng_state()
    kw = dict(n_steps=40, batch_size=64, d_model=16, n_test=300)
    m1, info = train_icl_model(0, **kw)
    m2, _ = train_icl_model(0, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert isinstance(m1, TinyCausalLM) and not m1.training
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert set(info.accuracy) == {"recall", "memorized", "mixed"}
    # 40 steps learn part of the memorized table (chance: 1/8)
    assert info.accuracy["memorized"] > 0.25


def test_unpadded_tokenizer_output_of_equal_lengths():
    model = _gpt2()
    seqs = _seqs((4, 4, 4))
    enc = {"input_ids": seqs, "attention_mask": [[1] * 4] * 3}
    common = dict(kind="diagonal", n_values=10**9, n_classes=2, dtype="float64")
    ref = PEFTransformer(model, position="last", **common).fit(torch.tensor(seqs)).compute(
        torch.tensor(seqs))
    got = PEFTransformer(model, position="last_nonpad", **common).fit(enc).compute(enc)
    assert _rel(got.pefs.toarray(), ref.pefs.toarray()) <= 1e-12
    assert pad_token_ids({"attention_mask": [[1, 1], [1]], "input_ids": [[3, 4], [5]]},
                         pad_id=9)["input_ids"].tolist() == [[3, 4], [5, 9]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gpt2_last_nonpad_matches_cpu():
    import copy

    model, seqs = _gpt2(), _seqs()
    kw = dict(kind="low_rank", n_values=10**6, dtype="float64", position="last_nonpad",
              n_classes=3, batch_size=3)
    cpu = PEFTransformer(model, **kw).fit(seqs).transform(seqs).toarray()
    gpu = PEFTransformer(copy.deepcopy(model).cuda(), **kw).fit(seqs).transform(seqs).toarray()
    np.testing.assert_allclose(gpu, cpu, rtol=1e-8, atol=1e-12)
