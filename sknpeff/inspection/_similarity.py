"""Similarity of components: two runs' through their coefficients, and one run's
components with each other (through coefficients or pseudo-Fishers)."""

from __future__ import annotations

import numpy as np

from ..utils import check_choice
from ._validation import check_W, to_numpy

__all__ = ["coefficient_cosines", "component_similarity", "pseudo_fisher_cosines"]

# Columns of components multiplied at a time: keeps the float64 copy small for models with
# many parameters (memory O(n_components x block), not O(n_components x n_params)).
_GRAM_BLOCK = 1 << 18


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



def coefficient_cosines(W) -> np.ndarray:
    """Cosines between the coefficient columns of one run's components.

    Two components that load on the same examples with proportional weights have cosine
    1. This needs only ``W``, so it also compares the clusters of a baseline method.

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Coefficients.

    Returns
    -------
    cosines : ndarray of shape (n_components, n_components)
        Symmetric, float64, clipped to [-1, 1]; a zero column has cosine 0 with the others
        and 1 with itself.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import coefficient_cosines
    >>> coefficient_cosines(np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))
    array([[1., 1., 0.],
           [1., 1., 0.],
           [0., 0., 1.]])
    """
    U, zero = _unit_columns(check_W(W).astype(np.float64))
    C = U.T @ U
    C[zero, zero] = 1.0
    return np.clip(C, -1.0, 1.0, out=C)


def pseudo_fisher_cosines(components, *, kind: str = "low_rank") -> np.ndarray:
    """Cosines between the pseudo-Fisher matrices of one run's components.

    The cosine of two matrices is their Frobenius inner product over the product of their
    Frobenius norms. A low-rank component ``g_k`` stands for the matrix ``g_k g_kᵀ``, so
    the cosine of two is ``cos(g_a, g_b)²`` (in [0, 1], blind to the sign of either
    vector); a diagonal component ``h_k`` stands for ``diag(h_k)``, so the cosine is
    ``cos(h_a, h_b)``.

    Components of a fit on randomly projected PEFs (``h_k ~ R g_k``, width ``d``) give
    an approximation of the cosines of the ``g_k``: ``E[R^T R] = I``, so
    ``cos(R g_a, R g_b)`` is ``cos(g_a, g_b)`` up to about ``1 / sqrt(d)``. The recovered
    components (:func:`~sknpeff.pef.recover_components`, sparse rows) give the cosines
    of those.

    Parameters
    ----------
    components : array-like of shape (n_components, n_params)
        One component per row, e.g. ``components_`` of a fitted
        :class:`~sknpeff.decomposition.LowRankNPEFF` or
        :class:`~sknpeff.decomposition.DiagonalNPEFF` (scipy sparse rows also work).
    kind : {"low_rank", "diagonal"}, default="low_rank"
        What a row is: a vector ``g_k`` or a non-negative diagonal ``h_k``.

    Returns
    -------
    cosines : ndarray of shape (n_components, n_components)
        Symmetric, float64; a zero component has cosine 0 with the others and 1 with
        itself.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import pseudo_fisher_cosines
    >>> G = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    >>> pseudo_fisher_cosines(G).round(3)
    array([[1. , 0.5, 0. ],
           [0.5, 1. , 0.5],
           [0. , 0.5, 1. ]])
    """
    kind = check_choice(kind, "kind", ("low_rank", "diagonal"))
    comps = to_numpy(components)
    if hasattr(comps, "tocsr"):  # scipy sparse: the product stays sparse until the end
        comps = comps.tocsr().astype(np.float64)
        gram = comps @ comps.T
        gram = np.asarray(gram.toarray() if hasattr(gram, "toarray") else gram)
    else:
        comps = np.asarray(comps)
        if comps.ndim != 2 or not np.issubdtype(comps.dtype, np.number):
            raise ValueError(
                "components must be a numeric array of shape (n_components, n_params), got "
                f"shape {comps.shape} and dtype {comps.dtype}."
            )
        gram = np.zeros((comps.shape[0], comps.shape[0]))
        for start in range(0, comps.shape[1], _GRAM_BLOCK):
            block = comps[:, start : start + _GRAM_BLOCK].astype(np.float64)
            gram += block @ block.T
    if not np.all(np.isfinite(gram)):
        raise ValueError("components must be finite.")
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    zero = norms == 0
    C = gram / np.outer(np.where(zero, 1.0, norms), np.where(zero, 1.0, norms))
    C[zero, zero] = 1.0
    np.clip(C, -1.0, 1.0, out=C)
    return C * C if kind == "low_rank" else C
