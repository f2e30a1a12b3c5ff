"""The coefficient-stability stopping rule (``coef_tol``): how alike ``W`` is to itself
some iterations earlier."""

from __future__ import annotations

from typing import Any

__all__ = ["COEF_CHECKS", "mean_column_cosine"]

#: consecutive checks (10 iterations apart) the coefficients must pass ``coef_tol``
COEF_CHECKS = 3


def mean_column_cosine(xp: Any, A: Any, B: Any) -> float:
    """Mean over columns of the cosine between ``A[:, k]`` and ``B[:, k]``, in float64.

    Two zero columns count as identical (cosine 1), one zero column as orthogonal.
    """
    A64, B64 = A.astype(xp.float64), B.astype(xp.float64)
    num = xp.sum(A64 * B64, axis=0)
    na, nb = xp.sum(A64 * A64, axis=0), xp.sum(B64 * B64, axis=0)
    den = xp.sqrt(na * nb)
    both_zero = (na == 0) & (nb == 0)
    cos = xp.where(den > 0, num / xp.where(den > 0, den, 1.0), xp.where(both_zero, 1.0, 0.0))
    return float(xp.mean(cos)) if cos.shape[0] else 1.0
