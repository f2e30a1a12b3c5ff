"""GuidedPerturber on a language model: the ``position`` option, as PEFTransformer's."""

import numpy as np
import pytest
import torch
from sklearn.pipeline import make_pipeline

from sknpeff.datasets import TinyCausalLM
from sknpeff.decomposition import DiagonalNPEFF, LowRankNPEFF
from sknpeff.pef import PEFTransformer
from sknpeff.perturbation import GuidedPerturber
from sknpeff.utils import InvalidParameterError

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

V, T = 11, 7  # vocabulary, longest sequence


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyCausalLM(V, T, d_model=8, n_layers=1, n_heads=2, d_mlp=8).double().eval()


def _last(m, b):
    return m(b)[:, -1]  # the hand-written forward that position="last" replaces


def _ids(m, b):
    return m(b["input_ids"])  # TinyCausalLM takes no attention mask


def _equal_length(n=40, seed=1):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _ragged(n=40, seed=2):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, V, rng.randint(3, T + 1)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def low_rank():
    model, X = _model(), _equal_length()
    pef = PEFTransformer(model, kind="low_rank", n_values=10**6, n_classes=4,
                         position="last", batch_size=16).fit(X)
    res = pef.compute(X)
    est = LowRankNPEFF(n_components=3, n_classes=4, max_iter=30, random_state=0)
    W = est.fit_transform(res.pefs)
    return model, X, pef, est, W


@pytest.mark.parametrize("position", ["last", -1, "array"])
def test_position_equals_hand_written_forward(low_rank, position):
    model, X, pef, est, W = low_rank
    if position == "array":
        position = np.full(X.shape[0], T - 1)
    kw = dict(layout=pef.layout_, magnitude=0.3, batch_size=16)
    gp = GuidedPerturber(est, model, position=position, **kw)
    ref = GuidedPerturber(est, model, forward=_last, **kw)
    for j in range(3):
        kl = gp.kl_divergence(X, j, -1)
        assert kl.shape == (X.shape[0],) and kl.max() > 0
        np.testing.assert_array_equal(kl, ref.kl_divergence(X, j, -1))
    got = gp.kl_ratios(X, W, n_top=8, n_baseline=30, random_state=0)
    want = ref.kl_ratios(X, W, n_top=8, n_baseline=30, random_state=0)
    np.testing.assert_array_equal(got.kl_ratio, want.kl_ratio)
    np.testing.assert_array_equal(got.sign, want.sign)


def test_pipeline_gives_its_forward_and_position(low_rank):
    model, X, _, _, _ = low_rank
    pipe = make_pipeline(
        PEFTransformer(model, kind="low_rank", n_values=10**6, n_classes=4,
                       position="last", batch_size=16),
        LowRankNPEFF(n_components=3, n_classes=4, max_iter=30, random_state=0)).fit(X)
    gp = GuidedPerturber(pipe, model, magnitude=0.3)
    assert gp.position_ == "last" and gp.forward_ is None
    # a forward of one's own replaces the transformer's forward and position
    own = GuidedPerturber(pipe, model, magnitude=0.3, forward=_last)
    assert own.position_ is None and own.forward_ is _last
    np.testing.assert_array_equal(gp.kl_divergence(X, 1), own.kl_divergence(X, 1))
    # W defaults to pipeline.transform(X)
    got = gp.kl_ratios(X, n_top=8, random_state=0)
    want = own.kl_ratios(X, pipe.transform(X), n_top=8, random_state=0)
    np.testing.assert_array_equal(got.kl_ratio, want.kl_ratio)

    pipe_fwd = make_pipeline(
        PEFTransformer(model, kind="low_rank", n_values=10**6, n_classes=4,
                       forward=_ids, position="last_nonpad", batch_size=16),
        LowRankNPEFF(n_components=2, n_classes=4, max_iter=10, random_state=0))
    seqs = _ragged(12)
    pipe_fwd.fit(seqs)
    gp = GuidedPerturber(pipe_fwd, model, magnitude=0.3)
    assert gp.forward_ is _ids and gp.position_ == "last_nonpad"
    # position given, forward from the pipeline
    gp = GuidedPerturber(pipe_fwd, model, magnitude=0.3, position=-1)
    assert gp.forward_ is _ids and gp.position_ == -1


def _naive_kl(model, seqs, params, delta):
    """Per-example KL at each unpadded sequence's last token, one sequence at a time."""
    out = []
    for s in seqs:
        x = torch.tensor([s])
        with torch.no_grad():
            lp0 = torch.log_softmax(model(x)[0, -1], -1)
            saved = [p.detach().clone() for p in params]
            off = 0
            for p in params:
                p.add_(torch.from_numpy(delta[off:off + p.numel()]).reshape(p.shape))
                off += p.numel()
            lp1 = torch.log_softmax(model(x)[0, -1], -1)
            for p, t in zip(params, saved, strict=True):
                p.copy_(t)
        out.append(float((lp0.exp() * (lp0 - lp1)).sum()))
    return np.maximum(out, 0.0)


def _naive_diag_fisher(model, seqs, params):
    """Mean over examples of sum_y p_y (d log p_y / d theta)^2 at the last token."""
    total = [torch.zeros_like(p) for p in params]
    for s in seqs:
        lp = torch.log_softmax(model(torch.tensor([s]))[0, -1], -1)
        for y in range(V):
            gs = torch.autograd.grad(lp[y], params, retain_graph=True)
            for acc, g in zip(total, gs, strict=True):
                acc += lp[y].exp().detach() * g ** 2
    return torch.cat([t.reshape(-1) for t in total]).numpy() / len(seqs)


@pytest.fixture(scope="module")
def diagonal():
    model, seqs = _model(1), _ragged()
    pef = PEFTransformer(model, kind="diagonal", n_values=200, forward=_ids,
                         position="last_nonpad", batch_size=16).fit(seqs)
    est = DiagonalNPEFF(n_components=3, max_iter=30, random_state=0)
    W = est.fit_transform(pef.compute(seqs).pefs)
    return model, seqs, pef, est, W


def test_padded_last_nonpad_equals_unpadded(diagonal):
    model, seqs, pef, est, W = diagonal
    gp = GuidedPerturber(est, model, layout=pef.layout_, forward=_ids,
                         position="last_nonpad", batch_size=7)  # ragged ids, padded per batch
    gp.fit(seqs, W, n_top=8, n_fisher=len(seqs), random_state=0)
    params = [dict(model.named_parameters())[n] for n in pef.layout_.names]
    np.testing.assert_allclose(gp.dataset_fisher_, _naive_diag_fisher(model, seqs, params),
                               rtol=1e-9, atol=1e-15)
    delta = gp.perturbation(0)
    np.testing.assert_allclose(gp.kl_divergence(seqs, 0), _naive_kl(model, seqs, params, delta),
                               rtol=1e-9, atol=1e-15)
    # a tokenizer's unpadded output (dict of per-example lists) gives the same
    tok = {"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]}
    np.testing.assert_allclose(gp.kl_divergence(tok, 0), gp.kl_divergence(seqs, 0),
                               rtol=1e-12, atol=1e-18)


def test_padded_kl_ratios_equal_array_positions(diagonal):
    """The whole diagonal search (dataset Fisher, gradient sign, KLs of row subsets) on
    ragged ids with "last_nonpad" against a right-padded tensor with an array of
    positions, which every subset of rows must slice alike."""
    model, seqs, pef, est, W = diagonal
    lengths = np.array([len(s) for s in seqs])
    Xpad = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        Xpad[i, :len(s)] = torch.tensor(s)
    kw = dict(layout=pef.layout_, batch_size=7, n_lambda=2)
    gp = GuidedPerturber(est, model, forward=_ids, position="last_nonpad", **kw)
    ref = GuidedPerturber(est, model, position=lengths - 1, **kw)
    got = gp.kl_ratios(seqs, W, [0, 2], n_top=8, n_baseline=25, random_state=0)
    want = ref.kl_ratios(Xpad, W, [0, 2], n_top=8, n_baseline=25, random_state=0)
    np.testing.assert_allclose(got.kl_ratio, want.kl_ratio, rtol=1e-8)
    np.testing.assert_allclose(got.top_kl, want.top_kl, rtol=1e-8)
    assert np.all(got.top_kl > 0)


def test_position_errors(low_rank):
    model, X, pef, est, _ = low_rank
    for bad in (1.5, True, [0.5, 1.0], np.zeros((2, 2), dtype=int)):
        with pytest.raises(InvalidParameterError, match="position must be"):
            GuidedPerturber(est, model, layout=pef.layout_, position=bad)
    gp = GuidedPerturber(est, model, layout=pef.layout_, position=np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="position holds 5 positions but X has 40"):
        gp.kl_divergence(X, 0)
    with pytest.raises(ValueError, match="position holds 5 positions but X has 40"):
        gp.kl_ratios(X, np.ones((40, 3)), n_top=4)
    gp = GuidedPerturber(est, model, layout=pef.layout_, position="last_nonpad")
    with pytest.raises(ValueError, match="position='last_nonpad'.*attention_mask"):
        gp.kl_divergence(X, 0)
    gp = GuidedPerturber(est, model, layout=pef.layout_, position="last", forward=_last)
    with pytest.raises(ValueError, match="position='last' picks one position"):
        gp.kl_divergence(X, 0)
    gp = GuidedPerturber(est, model, layout=pef.layout_, position=T)
    with pytest.raises(ValueError, match=f"position={T} is out of range"):
        gp.kl_divergence(X, 0)
