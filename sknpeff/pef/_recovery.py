"""Components of projected PEFs back in parameter space: :func:`recover_components`.

A factorization of projected PEFs (rows ``R a_ij``) gives components ``h_k ~ R g_k`` in
the ``d``-dimensional projected space. Perturbations and "which parameters" questions
need ``g_k`` itself. ``R`` has far fewer rows than columns, so ``g_k`` is determined only
by a prior: compressed sensing takes the sparsest ``g`` with ``R g ~ h``,

    min_g  1/2 ||R g - h||^2 + lam ||g||_1,

solved by FISTA (Beck & Teboulle 2009) through ``R`` and ``R^T`` only (matrix-free: memory
``O(n_params + d)`` per component), with ``lam`` decreased geometrically from a large
value (continuation), followed by a least-squares refit on the support found (which
removes the l1 shrinkage). The plain adjoint ``R^T h`` is no recovery: it spreads
``h`` over every parameter, with noise of size ``sqrt(n_params / d) ||g||``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from ..utils import check_float, check_int, pef_projection
from ._projection import Projection

__all__ = ["operator_norm", "recover_components", "resolve_projection"]

#: components recovered together (memory: a few vectors of n_params per component)
_BLOCK = 8


def resolve_projection(obj) -> Projection:
    """The :class:`Projection` held by or described by ``obj``.

    ``obj`` may be a :class:`Projection`, its description (a dict), a
    :class:`~sknpeff.pef.PEFResult` or tagged matrix of projected PEFs, a fitted
    :class:`~sknpeff.PEFTransformer` (``projection_``), or any object with a
    ``projection_`` attribute.
    """
    if isinstance(obj, Projection):
        return obj
    if isinstance(obj, Mapping):
        return Projection.from_description(obj)
    found = getattr(obj, "projection_", None)
    if found is None:
        md = getattr(obj, "metadata", None)
        if isinstance(md, Mapping):
            found = md.get("projection")
    if found is None:
        found = pef_projection(getattr(obj, "pefs", obj))
    if found is None:
        raise ValueError(
            "projection must be a Projection, its description, projected PEFs (a PEFResult "
            "or a tagged matrix) or a fitted PEFTransformer with compression='projection'; "
            f"no projection found in {type(obj).__name__}.")
    return Projection.from_description(found)


def operator_norm(projection: Projection, n_iter: int = 30, seed: int = 0) -> float:
    """``||R||_2`` by power iteration on ``R^T R`` (an upper estimate: 2% added)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(1, projection.n_params, generator=gen, dtype=torch.float64)
    v /= v.norm()
    lam = 0.0
    for _ in range(n_iter):
        w = projection.adjoint(projection.apply(v))
        lam = float(w.norm())
        if lam == 0.0:
            return 0.0
        v = w / lam
    return 1.02 * math.sqrt(lam)


def _soft(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - thr, min=0.0)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1, keepdim=True)


def _refit(projection: Projection, h: torch.Tensor, g: torch.Tensor, n_iter: int
           ) -> torch.Tensor:
    """Least squares of every row on its support (conjugate gradients on the normal
    equations, started from ``g``); rows whose support is not smaller than ``d`` keep
    their l1 solution."""
    mask = (g != 0).to(g.dtype)
    mask[mask.sum(1) >= projection.n_components] = 0.0
    if not bool(mask.any()):
        return g

    def normal(v):
        return projection.adjoint(projection.apply(v * mask)) * mask

    x = g * mask
    r = projection.adjoint(h) * mask - normal(x)
    p = r.clone()
    rs = _rowdot(r, r)
    rs0 = rs.clone()
    for _ in range(n_iter):
        live = rs > 1e-28 * rs0.clamp(min=1e-300)
        if not bool(live.any()):
            break
        ap = normal(p)
        pap = _rowdot(p, ap)
        alpha = torch.where(live & (pap > 0), rs / pap.clamp(min=1e-300), 0.0)
        x += alpha * p
        r -= alpha * ap
        rs_new = _rowdot(r, r)
        p = r + torch.where(live, rs_new / rs.clamp(min=1e-300), 0.0) * p
        rs = rs_new
    return torch.where(mask.sum(1, keepdim=True) > 0, x, g)


def _fista(projection: Projection, h: torch.Tensor, lip: float, lam_final: float,
           n_stages: int, max_iter: int, tol: float) -> torch.Tensor:
    """FISTA on every row of ``h`` ``(k, d)`` at once, with per-row penalties decreasing
    geometrically from ``0.5 ||R^T h||_inf`` to ``lam_final`` times it."""
    step = 1.0 / lip**2
    corr = projection.adjoint(h)
    lam0 = corr.abs().amax(1, keepdim=True)
    x = torch.zeros_like(corr)
    if not bool((lam0 > 0).any()):
        return x
    ratios = np.geomspace(0.5, max(lam_final, 1e-300), n_stages)
    per_stage = max(1, max_iter // n_stages)
    for i, ratio in enumerate(ratios):
        # the earlier stages only warm-start the next: a loose tolerance is enough
        stage_tol = tol if i == len(ratios) - 1 else max(tol, 1e-3)
        thr = step * float(ratio) * lam0
        z, t = x.clone(), 1.0  # momentum restarts at each stage
        for _ in range(per_stage):
            grad = projection.adjoint(projection.apply(z) - h)
            x_new = _soft(z - step * grad, thr)
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            z = x_new + ((t - 1.0) / t_new) * (x_new - x)
            delta = (x_new - x).norm(dim=1)
            x, t = x_new, t_new
            if bool((delta <= stage_tol * x.norm(dim=1).clamp(min=1e-300)).all()):
                break
    return x


def recover_components(components, projection=None, *, n_nonzero: int | None = None,
                       alpha: float = 1e-3, max_iter: int = 2000, n_stages: int = 8,
                       tol: float = 1e-7, prune: float = 1e-2, refit: bool = True,
                       return_residuals: bool = False):
    """Bring components of projected PEFs back to the full parameter index.

    For each projected component ``h`` (a row of ``components``), finds a sparse ``g``
    with ``R g ~ h`` by l1-regularized least squares (FISTA through ``R`` and ``R^T``
    only, with a decreasing penalty), drops its negligible entries (``prune``),
    optionally keeps its ``n_nonzero`` largest, and refits the kept entries by least
    squares. Exact for sparse enough
    ``g``: a ``g`` with ``s`` non-zeros is found (up to rounding) once ``d`` is a few
    times ``s log(n_params / s)``; a ``g`` that is not sparse comes back as its best
    sparse approximation that the ``d`` measurements allow.

    Parameters
    ----------
    components : array-like of shape (n_components, d) or fitted estimator
        Projected components (e.g. the ``components_`` of a factorization fitted on
        projected PEFs; an object with ``components_`` is read, its ``kept_columns_``
        placing the columns when present). One ``(d,)`` vector is accepted too.
    projection : Projection, dict, PEFResult, PEFTransformer or None, default=None
        The operator ``R`` (see :func:`resolve_projection`); ``None``: taken from
        ``components`` (its ``projection_``).
    n_nonzero : int, default=None
        Keep at most this many entries per component before the refit. ``None``: the
        support the l1 solution found.
    alpha : float, default=1e-3
        Final l1 penalty, relative to ``||R^T h||_inf`` (the smallest penalty at which
        the solution is zero).
    max_iter : int, default=2000
        FISTA iterations per component, split over the continuation stages.
    n_stages : int, default=8
        Number of penalties, from ``0.5 ||R^T h||_inf`` down to ``alpha`` times it.
    tol : float, default=1e-7
        Relative change of ``g`` that ends a stage.
    prune : float, default=1e-2
        Before the refit, drop entries below ``prune`` times the component's largest
        (the l1 path leaves many tiny entries where it has not converged).
    refit : bool, default=True
        Refit the non-zero entries by least squares (when fewer than ``d``).
    return_residuals : bool, default=False
        Also return ``||R g - h|| / ||h||`` per component.

    Returns
    -------
    recovered : scipy.sparse.csr_matrix of shape (n_components, n_params)
        The components in the layout's flat parameter order (float64), at the scale
        of ``h`` (``||R g|| ~ ||h||``).
    residuals : ndarray of shape (n_components,)
        Only with ``return_residuals``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sknpeff.layout import ParameterLayout
    >>> from sknpeff.pef import Projection, recover_components
    >>> model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.Linear(40, 3))
    >>> R = Projection.for_layout(ParameterLayout.from_model(model), 400, seed=0)
    >>> g = np.zeros(R.n_params)
    >>> g[[10, 500, 1234, 2000]] = [1.0, -2.0, 0.5, 1.5]
    >>> rec = recover_components(R.apply(g), R)
    >>> sorted(rec.indices.tolist()), bool(np.allclose(rec.toarray()[0], g, atol=1e-6))
    ([10, 500, 1234, 2000], True)
    """
    check_int(n_nonzero, "n_nonzero", low=1, allow_none=True)
    check_float(alpha, "alpha", low=0.0, high=1.0, strict=True)
    check_int(max_iter, "max_iter", low=1)
    check_int(n_stages, "n_stages", low=1)
    check_float(tol, "tol", low=0.0)
    check_float(prune, "prune", low=0.0, high=1.0, strict=True)
    if projection is None:
        projection = components
    proj = resolve_projection(projection)
    d = proj.n_components
    H = getattr(components, "components_", components)
    if isinstance(H, torch.Tensor):
        H = H.detach().cpu().numpy()
    H = np.asarray(H.toarray() if sp.issparse(H) else H, dtype=np.float64)
    H = H[None] if H.ndim == 1 else H
    kept = getattr(components, "kept_columns_", None)
    if kept is not None and H.shape[1] != d:
        full = np.zeros((H.shape[0], d))
        full[:, np.asarray(kept)] = H
        H = full
    if H.ndim != 2 or H.shape[1] != d:
        raise ValueError(f"components must have {d} columns (the projection's "
                         f"n_components); got shape {H.shape}.")
    lip = operator_norm(proj)
    rows, cols, vals, res = [], [], [], []
    for k0 in range(0, H.shape[0], _BLOCK):
        h = torch.from_numpy(np.ascontiguousarray(H[k0 : k0 + _BLOCK]))
        g = _fista(proj, h, lip, alpha, n_stages, max_iter, tol)
        # drop entries that are negligible against the row's largest, then keep the
        # n_nonzero largest
        big = g.abs().amax(1, keepdim=True)
        g = torch.where(g.abs() > prune * big, g, torch.zeros_like(g))
        if n_nonzero is not None and g.shape[1] > n_nonzero:
            thr = torch.topk(g.abs(), n_nonzero, dim=1).values[:, -1:]
            g = torch.where((g.abs() >= thr) & (g != 0), g, torch.zeros_like(g))
        if refit and bool((g != 0).any()):
            g = _refit(proj, h, g, n_iter=200)
        r_idx, c_idx = torch.nonzero(g, as_tuple=True)
        rows.append(r_idx.numpy() + k0)
        cols.append(c_idx.numpy())
        vals.append(g[r_idx, c_idx].numpy())
        hn = h.norm(dim=1)
        rn = (proj.apply(g) - h).norm(dim=1)
        res.extend(torch.where(hn > 0, rn / hn.clamp(min=1e-300), 0.0).tolist())
    out = sp.csr_matrix((np.concatenate(vals) if vals else np.zeros(0),
                         (np.concatenate(rows) if rows else np.zeros(0, np.int64),
                          np.concatenate(cols) if cols else np.zeros(0, np.int64))),
                        shape=(H.shape[0], proj.n_params))
    return (out, np.asarray(res)) if return_residuals else out
