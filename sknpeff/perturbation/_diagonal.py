"""Diagonal perturbations: a Fisher-weighted blend of the parameters and a pushed copy.

Per parameter, the original value ``theta`` and a pushed value
``p = theta - s Delta sign(grad)`` (``grad`` the gradient of the loss summed over the
component's top examples) are blended with Fisher weights,
``theta' = (w1 theta + w2 p) / (w1 + w2)``, ``w1 = (1 - lambda) max(F_dataset, floor)``,
``w2 = lambda h_j`` (both Fishers unit-normalized): parameters the component weighs more
than the data set does move most. ``lambda`` is tried on points evenly spaced in log-odds
over :data:`LAMBDA_RANGE`, and for each ``Delta`` is found by bisection on its log until
the mean KL on the top examples falls in a target range; the ``lambda`` whose
perturbation is most selective on a held-apart selection set is kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..utils import user_stacklevel

__all__ = [
    "BISECT_STEPS",
    "LAMBDA_RANGE",
    "LOG_DELTA_RANGE",
    "bisect_size",
    "blend_delta",
    "diagonal_profile",
    "rank_key",
    "safe_ratio",
    "search_blend",
]

#: bounds of the blend weight lambda
LAMBDA_RANGE = (0.035, 0.965)
#: log10 range of the push size Delta
LOG_DELTA_RANGE = (-6.0, 2.0)
#: bisection steps on log Delta per value of lambda
BISECT_STEPS = 14


def safe_ratio(num: float, den: float) -> float:
    """``num / den``; ``inf`` when only ``den`` is zero, ``nan`` when both are."""
    if den > 0:
        return num / den
    if num > 0:
        return float("inf")
    return float("nan")


def rank_key(ratio: float) -> float:
    """Sort key of a ratio: ``nan`` ranks below everything."""
    return -np.inf if np.isnan(ratio) else ratio


def diagonal_profile(h: np.ndarray, fisher: np.ndarray, floor: float,
                     name: str = "component") -> tuple[np.ndarray, np.ndarray]:
    """Unit-normalized component ``h`` (clipped at 0) and the floored, unit-normalized
    dataset Fisher."""
    h = np.maximum(h.astype(np.float64), 0.0)
    hn = np.linalg.norm(h)
    if hn == 0:
        raise ValueError(f"{name} is zero: no perturbation direction.")
    fn = np.linalg.norm(fisher)
    F = fisher / fn if fn > 0 else np.zeros_like(fisher)
    return h / hn, np.maximum(F, float(floor))


def blend_delta(push: np.ndarray, h: np.ndarray, Ff: np.ndarray, lam: float,
                size: float) -> np.ndarray:
    """``theta' - theta`` of the blend with weight ``lam`` and push size ``size``."""
    # theta' = (w1 theta + w2 p) / (w1 + w2) = theta + w2 / (w1 + w2) (p - theta)
    w1 = (1.0 - lam) * Ff
    w2 = lam * h
    return size * push * (w2 / (w1 + w2))


def bisect_size(top_kl: Callable[[float], float], kl_target: tuple[float, float],
                log_range: tuple[float, float] = LOG_DELTA_RANGE,
                steps: int = BISECT_STEPS) -> tuple[float, float, bool]:
    """A size whose mean KL on the top examples falls in ``kl_target``.

    Bisection on the log of the size over ``log_range`` (the KL grows with the size);
    when no point tried reaches the range, the closest in log KL is returned.

    Returns
    -------
    size : float
    kl : float
        ``top_kl(size)``.
    reached : bool
    """
    lo_t, hi_t = (float(v) for v in kl_target)
    mid_t = np.sqrt(lo_t * hi_t)
    a, b = log_range
    kl_at: dict[float, float] = {}
    reached = False
    logd = b
    for _ in range(steps):
        logd = 0.5 * (a + b)
        val = top_kl(10.0 ** logd)
        kl_at[logd] = val
        if lo_t <= val <= hi_t:
            reached = True
            break
        if val < lo_t:
            a = logd
        else:
            b = logd
    if not reached:  # closest (in log KL) of the points tried
        logd = min(kl_at, key=lambda t: abs(np.log(max(kl_at[t], 1e-300) / mid_t)))
    return 10.0 ** logd, kl_at[logd], reached


def search_blend(push: np.ndarray, h: np.ndarray, Ff: np.ndarray,
                 kl_target: tuple[float, float], n_lambda: int,
                 top_kl: Callable[[np.ndarray], float],
                 selection_kl: Callable[[np.ndarray], float],
                 name: str = "component") -> tuple[np.ndarray, dict]:
    """Search ``lambda`` and ``Delta`` of the blend; return ``delta`` and the facts.

    Parameters
    ----------
    push : ndarray of shape (m,)
        ``-sign * sign(grad)``: the direction each parameter is pushed in.
    h, Ff : ndarray of shape (m,)
        From :func:`diagonal_profile`.
    kl_target : (float, float)
        Range the mean KL on the top examples is searched into (as the user gave it).
    n_lambda : int
        Values of ``lambda`` tried.
    top_kl, selection_kl : callable
        Mean KL on the top examples / on the selection set of a perturbation ``delta``.
    name : str
        How warnings name the component.

    Returns
    -------
    delta : ndarray of shape (m,)
    facts : dict
        ``lambda``, ``delta`` (push size), ``top_kl``, ``selection_kl``, ``reached``.
    """
    lo_l, hi_l = (np.log(v / (1 - v)) for v in LAMBDA_RANGE)
    lams = 1.0 / (1.0 + np.exp(-np.linspace(lo_l, hi_l, int(n_lambda))))
    best: tuple | None = None
    for lam in lams:
        size, kl, reached = bisect_size(
            lambda size, lam=lam: top_kl(blend_delta(push, h, Ff, lam, size)), kl_target)
        d = blend_delta(push, h, Ff, lam, size)
        sel_kl = selection_kl(d)
        facts = {"lambda": float(lam), "delta": float(size), "top_kl": kl,
                 "selection_kl": sel_kl, "reached": reached}
        score = (reached, rank_key(safe_ratio(kl, sel_kl)))
        if best is None or score > best[0]:
            best = (score, d, facts)
    if best is None:
        raise ValueError("n_lambda must be at least 1.")
    if not best[2]["reached"]:
        warnings.warn(
            f"{name}: no (Delta, lambda) brought the mean KL on the top examples into "
            f"kl_target={kl_target} (closest: {best[2]['top_kl']:.3g}); the closest "
            "is used.", UserWarning, stacklevel=user_stacklevel())
    return best[1], best[2]
