"""Shared test settings."""

import pytest
import torch

import sknpeff.pef._engine as engmod


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Tests use tiny models and matrices: one torch thread is faster and repeatable.

    (On a loaded 2-core machine, OpenMP start-up and spinning made small forward passes
    about 4x slower with two threads.)
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def generic_calls(monkeypatch):
    """Parameter ids sent to the generic torch.func path."""
    calls = []
    real = engmod.generic_grads

    def spy(model, forward, names, params, pids, *args, **kw):
        calls.extend(names[i] for i in pids)
        return real(model, forward, names, params, pids, *args, **kw)

    monkeypatch.setattr(engmod, "generic_grads", spy)
    return calls
