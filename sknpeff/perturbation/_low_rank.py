"""Low-rank perturbations: ``delta`` along ``g_j``, orthogonal to dissimilar components.

Since ``delta^T H_k delta = (g_k . delta)^2`` for a rank-one pseudo-Fisher
``H_k = g_k g_k^T``, a ``delta`` along ``g_j`` with its part in the span of the other
components removed changes the predictions of examples that use component ``j`` and, to
second order, no other. Similar components (``|cos| >= max_cosine``) are left alone so
that they do not cancel ``g_j``.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..utils import user_stacklevel

__all__ = ["CHUNK", "component_gram", "orthogonal_direction"]

#: parameters per chunk when streaming the components (bounds float64 temporaries)
CHUNK = 1 << 20


def component_gram(G: np.ndarray) -> np.ndarray:
    """``G G^T`` in float64, streaming ``G`` ``(r, m)`` in column chunks."""
    r, m = G.shape
    M = np.zeros((r, r))
    for s in range(0, m, CHUNK):
        B = G[:, s:s + CHUNK].astype(np.float64)
        M += B @ B.T
    return M


def orthogonal_direction(G: np.ndarray, M: np.ndarray, j: int, max_cosine: float
                         ) -> np.ndarray:
    """Unit ``g_j`` with its part in the span of the dissimilar components removed.

    The projection onto the orthogonal complement of ``span{g_k : k in S}`` uses the
    pseudo-inverse of their float64 Gram matrix (numerical range only, so dependent
    components are fine) followed by refinement passes, streaming ``G`` in column
    chunks: no ``(n_params, r)`` float64 copy is made, which matters at paper scale.

    Parameters
    ----------
    G : ndarray of shape (r, m)
        The components (not copied).
    M : ndarray of shape (r, r)
        Their Gram matrix (:func:`component_gram`).
    j : int
        The component.
    max_cosine : float
        Components with ``|cos| < max_cosine`` to ``g_j`` are projected out.

    Returns
    -------
    direction : ndarray of shape (m,), float64, unit norm
    """
    r, m = G.shape
    norms = np.sqrt(np.maximum(np.diag(M), 0.0))
    if norms[j] == 0:
        raise ValueError(f"component {j} is zero: no perturbation direction.")
    cos = np.abs(M[j]) / (np.where(norms > 0, norms, 1.0) * norms[j])
    others = np.asarray([k for k in range(r)
                         if k != j and norms[k] > 0 and cos[k] < max_cosine], np.int64)
    g = G[j].astype(np.float64) / norms[j]
    d = g
    if others.size:
        w, V = np.linalg.eigh(M[np.ix_(others, others)])
        keep = w > max(w.max(), 0.0) * 1e-13
        pinv = (V[:, keep] / w[keep]) @ V[:, keep].T
        GS = G[others]
        d = g.copy()
        scale = float(np.sqrt(np.sum(norms[others] ** 2)))
        for _ in range(4):  # projection, then refinement until orthogonal to rounding
            b = np.zeros(others.size)
            for s in range(0, m, CHUNK):
                b += GS[:, s:s + CHUNK].astype(np.float64) @ d[s:s + CHUNK]
            dn = float(np.linalg.norm(d))
            if np.abs(b).max() <= 1e-15 * scale * max(dn, 1e-300):
                break
            c = pinv @ b
            for s in range(0, m, CHUNK):
                d[s:s + CHUNK] -= GS[:, s:s + CHUNK].astype(np.float64).T @ c
    dn = np.linalg.norm(d)
    if dn <= 1e-8:
        warnings.warn(
            f"component {j} lies in the span of the other components it is not similar "
            "to; its projected direction vanishes and g_j itself is used.",
            UserWarning, stacklevel=user_stacklevel())
        return g
    return d / dn
