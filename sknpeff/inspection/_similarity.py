"""Similarity of two runs' components through their coefficients."""

from __future__ import annotations

import numpy as np

from ._validation import check_W

__all__ = ["component_similarity"]


def _unit_columns(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(W, axis=0)
    zero = norms == 0
    return W / np.where(zero, 1.0, norms), zero


def component_similarity(W_a, W_b, *, return_directed: bool = False):
    """Similarity of two sets of components through their coefficients.

    With ``C[i, j]`` the cosine between column ``i`` of ``W_a`` and column ``j`` of
    ``W_b`` (coefficient vectors over the same examples)::

        a_to_b = mean_i max_j C[i, j]      # how well each component of A is found in B
        b_to_a = mean_j max_i C[i, j]      # how well each component of B is found in A
        similarity = (a_to_b + b_to_a) / 2

    A column of zeros has cosine 0 with any nonzero column and 1 with another zero column,
    so no NaN arises and a run compared with itself always scores 1 (up to rounding). The
    result is symmetric in its arguments and invariant to permuting either run's components.
    This is the run-to-run similarity of Matena & Raffel (arXiv 2310.04649, section 3.3).

    Parameters
    ----------
    W_a : array-like of shape (n_examples, n_components_a)
        Coefficients of run A.
    W_b : array-like of shape (n_examples, n_components_b)
        Coefficients of run B, on the same examples in the same order.
    return_directed : bool, default=False
        Also return the two directed values.

    Returns
    -------
    similarity : float
        Symmetric mean of the two directed values, in [-1, 1] ([0, 1] for non-negative
        coefficients).
    a_to_b, b_to_a : float
        Only when ``return_directed=True``: the directed values above.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import component_similarity
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> round(component_similarity(W, W[:, ::-1]), 12)
    1.0
    >>> sim, a_to_b, b_to_a = component_similarity(W, W[:, :1], return_directed=True)
    >>> round(a_to_b, 12), round(b_to_a, 12)
    (0.75, 1.0)
    """
    A = check_W(W_a, "W_a")
    B = check_W(W_b, "W_b")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            "W_a and W_b must have the same number of examples (rows), got "
            f"{A.shape[0]} and {B.shape[0]}."
        )
    UA, zero_a = _unit_columns(A.astype(np.float64))
    UB, zero_b = _unit_columns(B.astype(np.float64))
    C = UA.T @ UB
    C[np.ix_(zero_a, zero_b)] = 1.0
    np.clip(C, -1.0, 1.0, out=C)
    a_to_b = float(C.max(axis=1).mean())
    b_to_a = float(C.max(axis=0).mean())
    sim = 0.5 * (a_to_b + b_to_a)
    if return_directed:
        return sim, a_to_b, b_to_a
    return sim

