"""Tests of sknpeff.layout.ParameterLayout."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from sknpeff.layout import ParameterLayout


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_from_model_and_queries():
    m = _model()
    lay = ParameterLayout.from_model(m)
    assert lay.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert lay.shapes == ((4, 3), (4,), (2, 4), (2,))
    assert lay.offsets == (0, 12, 16, 24)
    assert lay.n_params == 26 == sum(p.numel() for p in m.parameters())
    assert lay.locate(0) == ("0.weight", (0, 0))
    assert lay.locate(13) == ("0.bias", (1,))
    assert lay.locate(23) == ("2.weight", (1, 3))
    assert lay.locate(-1) == ("2.bias", (1,))
    with pytest.raises(IndexError):
        lay.locate(26)
    ids, local = lay.locate_many([0, 13, 25])
    assert list(ids) == [0, 1, 3] and list(local) == [0, 1, 1]
    assert lay.slice("2.weight") == slice(16, 24)
    assert len(lay) == 4 and "0.bias" in lay


def test_split_flatten_round_trip():
    m = _model()
    lay = ParameterLayout.from_model(m)
    flat = lay.from_model_tensors(m)
    parts = lay.split(flat)
    for n, p in m.named_parameters():
        assert torch.equal(parts[n], p.detach())
    assert torch.equal(lay.flatten(parts), flat)
    v = np.arange(26.0)
    assert np.array_equal(lay.flatten(lay.split(v)), v)
    with pytest.raises(ValueError):
        lay.split(np.zeros(5))
    with pytest.raises(KeyError):
        lay.flatten({"0.weight": torch.zeros(4, 3)})


def test_selection_and_errors():
    m = _model()
    assert ParameterLayout.from_model(m, ["2.bias", "0.weight"]).names == ("0.weight", "2.bias")
    lay = ParameterLayout.from_model(m, lambda n, p: n.endswith("bias"))
    assert lay.names == ("0.bias", "2.bias")
    m[0].weight.requires_grad_(False)
    assert "0.weight" not in ParameterLayout.from_model(m)
    with pytest.raises(ValueError, match="unknown"):
        ParameterLayout.from_model(m, ["nope"])
    with pytest.raises(ValueError, match="string"):
        ParameterLayout.from_model(m, "0.bias")
    with pytest.raises(ValueError, match="no parameter"):
        ParameterLayout.from_model(m, [])
    with pytest.raises(ValueError, match="unique"):
        ParameterLayout(["a", "a"], [(1,), (2,)])


def test_pickle_dict_equality_and_shared_params():
    m = _model()
    lay = ParameterLayout.from_model(m)
    assert pickle.loads(pickle.dumps(lay)) == lay
    assert ParameterLayout.from_dict(lay.to_dict()) == lay
    assert hash(ParameterLayout.from_dict(lay.to_dict())) == hash(lay)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert ParameterLayout.from_model(tied).names == ("0.weight", "0.bias", "1.bias")
