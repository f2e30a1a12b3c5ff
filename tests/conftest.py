"""Shared test settings."""

import pytest
import torch


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
