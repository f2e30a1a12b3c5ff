"""Tests of the layer-rule registry (sknpeff.pef.rules): user rules exact against the naive
per-example loop, the exactness check catching a wrong rule, and clear errors."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sknpeff.pef import Contribution, LayerRule, PEFTransformer, register_rule, unregister_rule
from sknpeff.pef.rules import registered_rules, rule_for

from ._pef_reference import diag_rows, lrm_rows, naive_a


class Scale(nn.Module):
    """Feature-wise affine map ``x * scale + shift``: no built-in rule knows it."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.3, n))

    def forward(self, x):
        return x * self.scale + self.shift


class MyLinear(nn.Module):
    """A hand-written linear layer (its own class and forward)."""

    def __init__(self, i, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) / i ** 0.5)

    def forward(self, x):
        return x @ self.w.T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = MyLinear(5, 6)
        self.scale = Scale(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.scale(self.inp(x))))


def scale_rule(module, x, grad_output):
    # y = x * s + b: d<g, y>/ds = g * x summed over all but the feature axis; d/db = g
    c, B, n = grad_output.shape[0], grad_output.shape[1], x.shape[-1]
    gx = (grad_output * x[None]).reshape(c, B, -1, n).sum(2)
    return {"scale": gx, "shift": grad_output.reshape(c, B, -1, n).sum(2)}


class MyLinearRule(LayerRule):
    """The outer-product form, as the built-in Linear rule uses it."""

    def contributions(self, module, x, g, wanted, batch_terms):
        return {"w": Contribution.outer(g, x)} if "w" in wanted else {}


@pytest.fixture
def registered():
    register_rule(Scale, scale_rule)
    register_rule(MyLinear, MyLinearRule())
    yield
    unregister_rule(Scale)
    unregister_rule(MyLinear)


def _data():
    torch.manual_seed(0)
    model = Net().double().eval()
    X = torch.randn(9, 5, dtype=torch.float64)
    return model, X


@pytest.mark.parametrize("kind", ["low_rank", "diagonal"])
def test_user_rules_exact_against_naive_loop(registered, generic_calls, kind):
    model, X = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exactness check must pass: no fallback
        res = PEFTransformer(model, kind=kind, n_values=10**6, dtype="float64",
                             batch_size=4).fit(X).compute(X)
    A = naive_a(model, [X[i:i + 1] for i in range(len(X))])
    rows, norms = (lrm_rows if kind == "low_rank" else diag_rows)(A)
    np.testing.assert_allclose(res.pefs.toarray(), rows, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(res.norms, norms, rtol=1e-10)
    assert generic_calls == []  # every parameter went through a rule


def test_unknown_layer_takes_generic_path(generic_calls):
    model, X = _data()
    res = PEFTransformer(model, kind="low_rank", n_values=10**6, dtype="float64"
                         ).fit(X).compute(X)
    rows, _ = lrm_rows(naive_a(model, [X[i:i + 1] for i in range(len(X))]))
    np.testing.assert_allclose(res.pefs.toarray(), rows, rtol=1e-10, atol=1e-14)
    assert set(generic_calls) == {"inp.w", "scale.scale", "scale.shift"}


def test_wrong_rule_is_caught_and_result_stays_exact(generic_calls):
    def wrong(module, x, grad_output):
        out = scale_rule(module, x, grad_output)
        out["scale"] = 2 * out["scale"]
        return out

    register_rule(Scale, wrong)
    try:
        model, X = _data()
        with pytest.warns(UserWarning, match=r"scale\.scale"):
            res = PEFTransformer(model, kind="low_rank", n_values=10**6, dtype="float64"
                                 ).fit(X).compute(X)
    finally:
        unregister_rule(Scale)
    rows, _ = lrm_rows(naive_a(model, [X[i:i + 1] for i in range(len(X))]))
    np.testing.assert_allclose(res.pefs.toarray(), rows, rtol=1e-10, atol=1e-14)
    assert "scale.scale" in generic_calls and "scale.shift" not in generic_calls


def test_registry_errors():
    with pytest.raises(ValueError, match="layer_type must be a subclass of torch.nn.Module"):
        register_rule(int, scale_rule)
    with pytest.raises(ValueError, match="rule must be a LayerRule or a callable"):
        register_rule(Scale, 3)
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_rule(nn.Linear, scale_rule)
    with pytest.raises(KeyError, match="no rule is registered"):
        unregister_rule(Scale)
    assert Scale not in registered_rules()


def test_bad_rule_output_names_the_layer():
    register_rule(Scale, lambda module, x, g: {"scale": torch.zeros(3)})
    try:
        model, X = _data()
        with pytest.raises(ValueError, match=r"Scale returned .* parameter 'scale'"):
            PEFTransformer(model, kind="low_rank").fit(X).compute(X)
    finally:
        unregister_rule(Scale)


def test_overwrite_and_restore_builtin():
    builtin = unregister_rule(nn.LayerNorm)
    try:
        assert rule_for(nn.LayerNorm(3)) is None
        register_rule(nn.LayerNorm, builtin)
        with pytest.raises(ValueError, match="already registered"):
            register_rule(nn.LayerNorm, builtin)
        register_rule(nn.LayerNorm, builtin, overwrite=True)
    finally:
        if nn.LayerNorm not in registered_rules():
            register_rule(nn.LayerNorm, builtin)
    assert rule_for(nn.LayerNorm(3)) is builtin


def test_rule_lookup():
    class Plain(nn.Linear):
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert rule_for(Plain(2, 3)) is rule_for(nn.Linear(2, 3)) is not None
    assert rule_for(Custom(2, 3)) is None  # its own forward needs its own rule
    assert rule_for(nn.Embedding(5, 2)) is not None
    assert rule_for(nn.Embedding(5, 2, max_norm=1.0)) is None
    assert rule_for(nn.ReLU()) is None
    assert rule_for(nn.SyncBatchNorm(3)) is None
