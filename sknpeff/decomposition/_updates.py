"""The NPEFF update rules, written once against an array namespace ``xp``.

Every function here takes plain arrays of one namespace (NumPy or CuPy) and never names
the array library: the same code runs on CPU and GPU. Sparse products and all-reduces are
not here; they come from :class:`sknpeff.backends.ColumnBlocks`, which calls the
block-level updates below on each column block of the transposed factor ``Ft``
(kept parameters x components).

Notation (method doc): ``n`` examples, ``c`` class slots, ``r`` components, ``W`` (n, r)
coefficients, ``Ft`` (m', r) the transposed factor (``G.T`` or ``H.T``), ``P = A @ Ft``,
``Q = Ft.T @ Ft``.
"""

from __future__ import annotations

from typing import Any

#: added to denominators of multiplicative steps (method doc: eps = 1e-9)
EPS = 1e-9


def sum_f64(xp: Any, x: Any) -> float:
    """Sum in float64 whatever the input dtype (losses must not lose precision)."""
    return float(xp.sum(x, dtype=xp.float64))


# =============================================================================
# Low rank (LRM-NPEFF)
# =============================================================================

# ---- low-rank section: maintained with LowRankNPEFF ----


# =============================================================================
# Diagonal (D-NPEFF)
# =============================================================================

# ---- diagonal section: maintained with DiagonalNPEFF ----
