"""Planted problems: PEF matrices whose NPEFF decomposition is known exactly.

The low-rank problem follows the LRM-PEF layout and the diagonal one the D-PEF layout
of Matena & Raffel, "NPEFF: Non-Negative Per-Example Fisher Factorization"
(arXiv 2310.04649).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ..utils import InvalidParameterError, check_int

__all__ = ["make_planted_diagonal", "make_planted_lowrank"]


def _check_sizes(n_examples, n_params, n_components, support_size) -> tuple[int, ...]:
    n_params = check_int(n_params, "n_params", low=1)
    return (
        check_int(n_examples, "n_examples", low=1),
        n_params,
        check_int(n_components, "n_components", low=1),
        check_int(support_size, "support_size", low=1, high=n_params),
    )


def _check_n_active(n_active, high: int, high_name: str) -> tuple[int, int]:
    try:
        lo, hi = n_active
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"n_active must be a pair (min, max) of integers, got {n_active!r}."
        ) from None
    lo = check_int(lo, "n_active[0]", low=1)
    hi = check_int(hi, "n_active[1]", low=1)
    if lo > hi:
        raise InvalidParameterError(f"n_active must satisfy min <= max, got {n_active!r}.")
    if hi > high:
        raise InvalidParameterError(f"n_active[1] must be <= {high_name} (= {high}), got {hi}.")
    return lo, hi


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InvalidParameterError(f"dtype must be float32 or float64, got {dt}.")
    return dt


def _sparse_supports(rng, n_rows: int, n_params: int, support_size: int) -> list[np.ndarray]:
    return [np.sort(rng.choice(n_params, size=support_size, replace=False)) for _ in range(n_rows)]


def _random_orthogonal(rng, n: int) -> np.ndarray:
    """Haar-distributed random orthogonal ``n x n`` matrix (QR with sign correction)."""
    z = rng.standard_normal((n, n))
    q, r = np.linalg.qr(z)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d


def _active_weights(rng, n_examples: int, n_components: int, lo: int, hi: int) -> np.ndarray:
    W = np.zeros((n_examples, n_components))
    for i in range(n_examples):
        s = rng.randint(lo, hi + 1)
        active = rng.choice(n_components, size=s, replace=False)
        W[i, active] = rng.uniform(0.5, 1.5, size=s)
    return W


def make_planted_lowrank(
    n_examples: int = 600,
    n_params: int = 3000,
    n_classes: int = 3,
    n_components: int = 8,
    support_size: int = 150,
    n_active: tuple[int, int] = (1, 3),
    normalize: bool = True,
    random_state=None,
    dtype=np.float32,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Generate LRM-PEFs that are exact non-negative sums of planted rank-1 components.

    Each component ``g_k`` is a unit-norm vector supported on ``support_size`` random
    parameters (Gaussian values on the support). Example *i* activates between
    ``n_active[0]`` and ``n_active[1]`` components (set ``S``) with weights
    ``W_ik ~ U(0.5, 1.5)``, so that its PEF is ``F_i = sum_k W_ik g_k g_k^T``. The PEF is
    stored as ``n_classes`` vectors ``a_ij`` with ``sum_j a_ij a_ij^T = F_i`` exactly, but
    mixed so that they are not the ``g_k`` themselves: with
    ``B = diag(sqrt(W_iS)) G_S`` padded with zero rows to ``n_classes`` rows and a random
    orthogonal ``U`` (``n_classes x n_classes``), ``A_i = U B``.

    Parameters
    ----------
    n_examples : int, default=600
        Number of examples (rows of ``X``).
    n_params : int, default=3000
        Number of model parameters ``m``.
    n_classes : int, default=3
        Number of class slots ``c`` per example.
    n_components : int, default=8
        Number of planted components ``r``.
    support_size : int, default=150
        Number of nonzero parameters of each component.
    n_active : tuple of int, default=(1, 3)
        Inclusive range of the number of active components per example; the maximum must
        not exceed ``n_classes`` or ``n_components``.
    normalize : bool, default=True
        Scale each example so that ``||F_i||_F = 1`` (``A_i`` is divided by
        ``sqrt(||F_i||_F)`` and ``W_i`` by ``||F_i||_F``); the returned ``W`` is scaled.
    random_state : int, RandomState instance or None, default=None
        Seed for reproducible output.
    dtype : {np.float32, np.float64}, default=np.float32
        Floating dtype of ``X``, ``W`` and ``G``.

    Returns
    -------
    X : scipy.sparse.csr_matrix of shape (n_examples, n_classes * n_params)
        LRM-PEFs: row *i* is ``A_i`` flattened row-major (slot *j* at columns
        ``j * n_params`` to ``(j + 1) * n_params - 1``). Indices sorted, no explicit zeros.
    W : ndarray of shape (n_examples, n_components)
        Non-negative planted coefficients.
    G : ndarray of shape (n_components, n_params)
        Planted unit-norm components.

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_lowrank
    >>> X, W, G = make_planted_lowrank(n_examples=20, n_params=50, support_size=10,
    ...                                random_state=0)
    >>> X.shape, W.shape, G.shape
    ((20, 150), (20, 8), (8, 50))
    """
    n_examples, n_params, n_components, support_size = _check_sizes(
        n_examples, n_params, n_components, support_size
    )
    n_classes = check_int(n_classes, "n_classes", low=1)
    if n_classes <= n_components:
        lo, hi = _check_n_active(n_active, n_classes, "n_classes")
    else:
        lo, hi = _check_n_active(n_active, n_components, "n_components")
    dt = _check_dtype(dtype)
    rng = check_random_state(random_state)

    supports = _sparse_supports(rng, n_components, n_params, support_size)
    G = np.zeros((n_components, n_params))
    for k, supp in enumerate(supports):
        v = rng.standard_normal(support_size)
        G[k, supp] = v / np.linalg.norm(v)

    W = _active_weights(rng, n_examples, n_components, lo, hi)

    indptr = np.zeros(n_examples + 1, dtype=np.int64)
    indices_parts: list[np.ndarray] = []
    data_parts: list[np.ndarray] = []
    for i in range(n_examples):
        active = np.flatnonzero(W[i])
        cols = np.unique(np.concatenate([supports[k] for k in active]))
        B = np.zeros((n_classes, cols.size))
        B[: active.size] = np.sqrt(W[i, active])[:, None] * G[np.ix_(active, cols)]
        A = _random_orthogonal(rng, n_classes) @ B
        if normalize:
            gram = A @ A.T
            fro = np.sqrt(np.sum(gram * gram))
            A /= np.sqrt(fro)
            W[i] /= fro
        idx = (np.arange(n_classes)[:, None] * n_params + cols[None, :]).ravel()
        vals = A.ravel()
        keep = vals != 0
        indices_parts.append(idx[keep])
        data_parts.append(vals[keep])
        indptr[i + 1] = indptr[i] + int(keep.sum())

    indices = np.concatenate(indices_parts) if indices_parts else np.zeros(0, np.int64)
    data = np.concatenate(data_parts) if data_parts else np.zeros(0)
    X = sp.csr_matrix((data.astype(dt), indices, indptr), shape=(n_examples, n_classes * n_params))
    X.eliminate_zeros()  # values that underflow in the cast
    X.sort_indices()
    return X, W.astype(dt), G.astype(dt)


def make_planted_diagonal(
    n_examples: int = 800,
    n_params: int = 4000,
    n_components: int = 10,
    support_size: int = 400,
    n_active: tuple[int, int] = (1, 3),
    normalize: bool = True,
    random_state=None,
    dtype=np.float32,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Generate D-PEFs that are exact non-negative combinations of planted components.

    Each component ``h_k`` (row of ``H``) is non-negative, supported on ``support_size``
    random parameters (values ``|N(0, 1)|`` on the support) and has unit L2 norm. Example
    *i* activates between ``n_active[0]`` and ``n_active[1]`` components with weights
    ``W_ik ~ U(0.5, 1.5)``, and ``X = W H`` exactly.

    Parameters
    ----------
    n_examples : int, default=800
        Number of examples (rows of ``X``).
    n_params : int, default=4000
        Number of model parameters.
    n_components : int, default=10
        Number of planted components.
    support_size : int, default=400
        Number of nonzero parameters of each component.
    n_active : tuple of int, default=(1, 3)
        Inclusive range of the number of active components per example.
    normalize : bool, default=True
        Scale each row of ``X`` to unit L2 norm (and the row of ``W`` by the same factor).
    random_state : int, RandomState instance or None, default=None
        Seed for reproducible output.
    dtype : {np.float32, np.float64}, default=np.float32
        Floating dtype of ``X``, ``W`` and ``H``.

    Returns
    -------
    X : scipy.sparse.csr_matrix of shape (n_examples, n_params)
        Non-negative D-PEFs, ``X = W H``. Indices sorted, no explicit zeros.
    W : ndarray of shape (n_examples, n_components)
        Non-negative planted coefficients.
    H : ndarray of shape (n_components, n_params)
        Non-negative planted components with unit L2 rows.

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_diagonal
    >>> X, W, H = make_planted_diagonal(n_examples=20, n_params=50, support_size=10,
    ...                                 random_state=0)
    >>> X.shape, W.shape, H.shape
    ((20, 50), (20, 10), (10, 50))
    """
    n_examples, n_params, n_components, support_size = _check_sizes(
        n_examples, n_params, n_components, support_size
    )
    lo, hi = _check_n_active(n_active, n_components, "n_components")
    dt = _check_dtype(dtype)
    rng = check_random_state(random_state)

    H = np.zeros((n_components, n_params))
    for k, supp in enumerate(_sparse_supports(rng, n_components, n_params, support_size)):
        v = np.abs(rng.standard_normal(support_size)) + 1e-3
        H[k, supp] = v / np.linalg.norm(v)

    W = _active_weights(rng, n_examples, n_components, lo, hi)
    X = sp.csr_matrix(sp.csr_matrix(W) @ sp.csr_matrix(H))
    if normalize:
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
        scale = 1.0 / norms
        X = sp.csr_matrix(sp.diags(scale) @ X)
        W = W * scale[:, None]
    X = X.astype(dt)
    X.eliminate_zeros()
    X.sort_indices()
    return X, W.astype(dt), H.astype(dt)


