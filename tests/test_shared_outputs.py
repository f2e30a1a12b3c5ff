"""Layer outputs computed once for the batch and broadcast into it (position embeddings
of ``torch.arange(T)``) keep the per-layer rules, exactly; other uses take the generic
path, exactly."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sknpeff import PEFTransformer

from ._pef_reference import diag_rows, lrm_rows, naive_a


class PosModel(nn.Module):
    """Token + position embeddings, attention, a head on the last position."""

    def __init__(self, use="plain", V=20, T=6, D=8):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.ln = nn.LayerNorm(D)
        self.att = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 4)
        self.use = use

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1], device=ids.device))
        t = self.tok(ids)
        if self.use == "plain":        # nanoGPT: (B, T, D) + (T, D)
            x = t + p
        elif self.use == "none":       # (B, T, D) + (1, T, D)
            x = t + p[None]
        elif self.use == "unsqueeze":  # (1, T, D) + (B, T, D), reversed operands
            x = p.unsqueeze(0) + t
        elif self.use == "scaled":     # a product
            x = t * p
        elif self.use == "twice":      # used twice: stays shared
            x = t + p
            x = x + 0.5 * p
        else:                          # mixed with itself before it meets the batch
            x = t + p @ p.T @ p / 8
        x = self.ln(x)
        x = x + self.att(x, x, x, need_weights=False)[0]
        return self.head(x[:, -1])


def _data(use):
    torch.manual_seed(0)
    model = PosModel(use).double().eval()
    X = torch.randint(0, 20, (7, 6))
    return model, X


@pytest.mark.parametrize("use", ["plain", "none", "unsqueeze", "scaled"])
@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_broadcast_position_embedding_keeps_the_rules(use, kind, generic_calls):
    model, X = _data(use)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-path warning
        res = PEFTransformer(model, kind=kind, n_values=10**6, dtype="float64",
                             batch_size=3).fit(X).compute(X)
    A = naive_a(model, [X[i:i + 1] for i in range(len(X))])
    rows, norms = (lrm_rows if kind == "low_rank" else diag_rows)(A)
    np.testing.assert_allclose(res.pefs.toarray(), rows, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(res.norms, norms, rtol=1e-9)
    # the attention's in_proj goes to the generic path: only it
    assert "pos.weight" not in generic_calls


@pytest.mark.parametrize("use", ["twice", "mixed"])
def test_other_uses_of_a_shared_output_take_the_generic_path(use, generic_calls):
    model, X = _data(use)
    with pytest.warns(UserWarning, match=r"pos\.weight"):
        res = PEFTransformer(model, kind="low_rank", n_values=10**6, dtype="float64",
                             batch_size=3).fit(X).compute(X)
    rows, norms = lrm_rows(naive_a(model, [X[i:i + 1] for i in range(len(X))]))
    np.testing.assert_allclose(res.pefs.toarray(), rows, rtol=1e-9, atol=1e-13)
    assert "pos.weight" in generic_calls


def test_the_model_sees_the_same_values():
    """The per-example copies change no logit (the same numbers; only the layout of
    later products may round differently)."""
    model, X = _data("none")
    with torch.no_grad():
        want = model(X).numpy()
    res = PEFTransformer(model, kind="low_rank", n_values=50, dtype="float64",
                         batch_size=7).fit(X).compute(X)
    np.testing.assert_allclose(res.logits, want, rtol=1e-13, atol=1e-15)
