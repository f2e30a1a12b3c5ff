"""Perturbations of fits on randomly projected PEFs: finding ``R`` and recovering ``g_k``.

A :class:`~sknpeff.decomposition.LowRankNPEFF` fitted on projected PEFs (rows ``R a_ij``,
``PEFTransformer(compression="projection")``) has components ``h_k ~ R g_k`` in the
``d``-dimensional projected space; a perturbation needs ``g_k`` in parameter space. The
components are recovered once by :func:`~sknpeff.pef.recover_components` (sparse
recovery through ``R`` and ``R^T``), then used exactly as the components of a top-K fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from ..pef import Projection, recover_components
from ..pef._recovery import resolve_projection

__all__ = ["SPARSE_RECOVERY_MAX_RATIO", "check_recovery_params", "find_projection",
           "recovered_components", "resolve_recovery"]

#: ``recovery="auto"`` recovers sparse components while ``n_params`` is at most this
#: many times ``d``, and uses ``R^T h`` beyond. Sparse recovery degrades as ``n_params /
#: d`` grows (a component must be ever sparser to be pinned down), while the error of
#: ``(R a) . h``, what ``R^T h`` does to an example, depends on ``d`` alone. Measured at
#: equal bytes against top-K PEFs: sparse recovery was ahead at ratios 3.7 and 9.3 (by 11%
#: and 5% in median KL ratio), the adjoint 3.4 times ahead at 37.
SPARSE_RECOVERY_MAX_RATIO = 16

#: recover_components arguments a caller may not set (the perturber owns them)
_RESERVED = ("components", "projection", "return_residuals")


def resolve_recovery(recovery: str, projection: Projection | None) -> str:
    """The recovery method ``"auto"`` stands for with ``projection`` (other values are
    returned as they are): ``"sparse"`` when ``n_params <= SPARSE_RECOVERY_MAX_RATIO * d``,
    else ``"adjoint"``."""
    if recovery != "auto" or projection is None:
        return recovery
    if projection.n_params <= SPARSE_RECOVERY_MAX_RATIO * projection.n_components:
        return "sparse"
    return "adjoint"


def find_projection(estimator: Any, decomposition: Any, projection: Any = None
                    ) -> Projection | None:
    """The random operator behind ``estimator``'s components, or ``None`` (top-K PEFs).

    Looked up in order: ``projection`` when given (anything
    :func:`~sknpeff.pef.resolve_projection` accepts), the decomposition's
    ``projection_`` (a Pipeline's last step, or a ComponentExpander's expanded
    estimator), then the ``projection_`` of a Pipeline step before the last (the
    PEFTransformer).

    Parameters
    ----------
    estimator : estimator or Pipeline
        The fitted decomposition, or a Pipeline ending in one.
    decomposition : estimator
        The decomposition behind ``estimator`` (a Pipeline's last step, or a
        ComponentExpander's expanded estimator).
    projection : Projection, dict, PEFTransformer, PEFResult or None, default=None
        An explicit operator (or something holding it).

    Returns
    -------
    projection : Projection or None
    """
    if projection is not None:
        try:
            return resolve_projection(projection)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                "projection must be a Projection, its description (dict), or a fitted "
                "PEFTransformer with compression='projection' (its projection_); got "
                f"{type(projection).__name__}: {exc}") from None
    holders = [decomposition, estimator]
    if isinstance(estimator, Pipeline):
        holders += [step for _, step in estimator.steps[:-1]]
    for holder in holders:
        found = getattr(holder, "projection_", None)
        if found is not None:
            return resolve_projection(found)
    return None


def check_recovery_params(params: Any) -> dict:
    """``params`` as keyword arguments of :func:`~sknpeff.pef.recover_components`.

    Parameters
    ----------
    params : dict or None
        The user's ``recovery_params``; ``None`` is no arguments.

    Returns
    -------
    kwargs : dict
        A copy, without the arguments the caller passes itself (``components``,
        ``projection``, ``return_residuals``: refused).
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError("recovery_params must be None or a dict of recover_components "
                         f"keyword arguments; got {type(params).__name__}.")
    bad = [k for k in params if k in _RESERVED]
    if bad:
        raise ValueError(f"recovery_params may not set {bad}: they are passed here.")
    return dict(params)


def recovered_components(decomposition: Any, projection: Projection, params: Any,
                         cached: Any = None, method: str = "sparse"
                         ) -> tuple[tuple, np.ndarray | None]:
    """The decomposition's projected components recovered in parameter space.

    Parameters
    ----------
    decomposition : fitted estimator
        Has ``components_`` of width ``projection.n_components`` (or ``kept_columns_``
        placing fewer columns).
    projection : Projection
        The operator ``R``.
    params : dict or None
        Keyword arguments of :func:`~sknpeff.pef.recover_components`.
    cached : tuple or None, default=None
        The value returned by an earlier call: reused when the components array (the
        same object), the projection, ``params`` and ``method`` are the same.
    method : {"sparse", "adjoint"}, default="sparse"
        ``"sparse"``: :func:`~sknpeff.pef.recover_components`. ``"adjoint"``: ``R^T h``
        (no recovery of ``g``, but ``a . R^T h = (R a) . h`` for every per-example
        vector ``a``: the perturbation acts on the examples exactly as the fitted
        component does on their projected PEFs; ``params`` is unused).

    Returns
    -------
    entry : tuple
        ``(key, G)``, ``G`` the dense float64 recovered components ``(r, n_params)``
        (pass it back as ``cached``).
    residuals : ndarray of shape (r,) or None
        ``||R g_k - h_k|| / ||h_k||`` (``None`` for ``"adjoint"``).
    """
    kwargs = check_recovery_params(params)
    H = decomposition.components_
    desc = projection.description()
    if cached is not None:
        (key, G), res = cached
        if key[0] is H and key[1:] == (desc, kwargs, method):
            return (key, G), res
    width = np.shape(H)[1]
    kept = getattr(decomposition, "kept_columns_", None)
    fits = width == projection.n_components or (
        kept is not None and np.size(kept) == width
        and int(np.max(kept, initial=-1)) < projection.n_components)
    if not fits:
        raise ValueError(
            f"the estimator's components have {width} columns but the projection has "
            f"{projection.n_components} (d): pass the projection_ of the PEFTransformer "
            "that computed the PEFs the estimator was fitted on.")
    key = (H, desc, kwargs, method)
    if method == "adjoint":
        Hf = np.asarray(H.toarray() if hasattr(H, "toarray") else H, dtype=np.float64)
        if kept is not None and width != projection.n_components:
            full = np.zeros((Hf.shape[0], projection.n_components))
            full[:, np.asarray(kept)] = Hf
            Hf = full
        return (key, np.asarray(projection.adjoint(torch.from_numpy(Hf)))), None
    try:
        rec, res = recover_components(decomposition, projection, return_residuals=True,
                                      **kwargs)
    except TypeError as exc:
        raise ValueError(f"recovery_params: {exc}") from None
    return (key, rec.toarray()), np.asarray(res, dtype=np.float64)
