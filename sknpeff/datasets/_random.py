"""Seeds for torch from scikit-learn style ``random_state`` values."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils import check_random_state

from ..utils import InvalidParameterError

__all__ = ["torch_seed"]


def torch_seed(random_state) -> int:
    """A torch seed from an int, a RandomState or None (drawn from the global NumPy RNG).

    Parameters
    ----------
    random_state : int, RandomState instance or None
        An int is used as it is; a RandomState (or the global NumPy RNG, for None) draws
        one integer in ``[0, 2**31 - 1)``.

    Returns
    -------
    seed : int
    """
    if random_state is None or isinstance(random_state, np.random.RandomState):
        return int(check_random_state(random_state).randint(0, 2**31 - 1))
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise InvalidParameterError(
            f"random_state must be None, an int or a RandomState, got {random_state!r}."
        )
    return int(random_state)

