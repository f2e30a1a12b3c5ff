"""Checks shared by the inspection functions: coefficient matrices, counts, per-example
arrays."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_array

__all__ = ["as_1d", "as_float_1d", "check_W", "to_numpy"]


def to_numpy(values):
    """Return ``values`` as a NumPy array when it is a torch tensor, else unchanged.

    Parameters
    ----------
    values : object
        Anything; a torch tensor is detached and copied to the CPU.

    Returns
    -------
    values : object
    """
    if hasattr(values, "detach"):  # torch tensor
        return values.detach().cpu().numpy()
    return values


def check_W(W, name: str = "W") -> np.ndarray:
    """Validate a coefficient matrix.

    Parameters
    ----------
    W : array-like or torch.Tensor of shape (n_examples, n_components)
        Coefficients; finite, float32 or float64 (other dtypes are converted).
    name : str, default="W"
        Name used in error messages.

    Returns
    -------
    W : ndarray of shape (n_examples, n_components)
    """
    if W is None:
        raise ValueError(f"{name} must be an array of shape (n_examples, n_components).")
    return check_array(to_numpy(W), dtype=[np.float64, np.float32], input_name=name)


def as_1d(values, name: str, n: int) -> np.ndarray:
    """One value per example as a 1-D array of length ``n``.

    Parameters
    ----------
    values : array-like or torch.Tensor of shape (n,)
        The values (any dtype).
    name : str
        Name used in error messages.
    n : int
        Required length.

    Returns
    -------
    values : ndarray of shape (n,)
    """
    arr = np.asarray(to_numpy(values))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of length {n}, got shape {arr.shape}.")
    return arr


def as_float_1d(values, name: str, n: int) -> np.ndarray:
    """Like :func:`as_1d`, converted to float64.

    Parameters
    ----------
    values, name, n
        As in :func:`as_1d`; the values must be numbers.

    Returns
    -------
    values : ndarray of shape (n,), dtype float64
    """
    arr = as_1d(values, name, n)
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers.") from None
