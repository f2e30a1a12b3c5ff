"""Components of projected PEFs back in parameter space: :func:`recover_components`.

A factorization of projected PEFs (rows ``R a_ij``) gives components ``h_k ~ R g_k`` in
the ``d``-dimensional projected space. Perturbations and "which parameters" questions
need ``g_k`` itself. ``R`` has far fewer rows than columns, so ``g_k`` is determined only
by a prior: compressed sensing takes the sparsest ``g`` with ``R g ~ h``,

    min_g  1/2 ||R g - h||^2 + lam ||g||_1,

solved by FISTA (Beck & Teboulle 2009) through ``R`` and ``R^T`` only (memory
``O(n_params + d)`` per component), with ``lam`` decreased geometrically from a large
value (continuation), followed by a least-squares refit on the support found (which
removes the l1 shrinkage). ``R`` is block diagonal (each block maps its own parameters
to its own rows), so each parameter takes the step ``1 / ||R_b||^2`` of its block: the
same problem, with each block as well conditioned as it is alone. The small blocks are
applied as one explicit sparse matrix (one product instead of a loop over blocks), the
large Kronecker blocks factored. The plain adjoint ``R^T h`` is no recovery: it spreads
``h`` over every parameter, with noise of size ``sqrt(n_params / d) ||g||``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from ..utils import check_float, check_int, pef_projection
from ._projection import KroneckerBlock, Projection

__all__ = ["recover_components", "resolve_projection"]

#: entries of one ``(rows, n_params)`` working array: all components are recovered in
#: one block when they fit (a few such arrays are alive at once)
_BUDGET = 1 << 24
#: FISTA iterations between convergence checks (each check waits for the result)
_CHECK = 10
#: relative change of ``g`` that ends a continuation stage before the last
_EARLY_TOL = 1e-3
#: entries of the explicit sparse part of the recovery operator
_EXPLICIT_BUDGET = 1 << 24

_OPERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _top_eigenvalue(m: sp.spmatrix) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite sparse matrix."""
    if m.shape[0] <= 1024:
        return float(np.linalg.eigvalsh(m.toarray())[-1])
    # Lanczos to a tight tolerance; a hair added so the step stays on the safe side
    return 1.001 * float(spla.eigsh(m, k=1, which="LA", tol=1e-8)[0][0])


class _Operator:
    """``R`` and ``R^T`` on CPU float64 rows ``(k, n_params)``, built for many products.

    The blocks whose explicit matrix is small against the cost of their factored
    products (the sparse sign block, small Kronecker blocks) are gathered into one
    SciPy CSR matrix (one sparse product per call instead of a Python loop over
    blocks); large Kronecker blocks stay factored. Same operator as ``projection``
    (the same entries), summed in another order.
    """

    def __init__(self, projection: Projection):
        lay, f64 = projection.layout, torch.float64
        self.d, self.n_params = projection.n_components, projection.n_params
        self.factored = []  # (block, first parameter, P_out, P_in)
        # R is block diagonal (each block maps its own parameters to its own rows), so
        # ||R_b||^2 bounds the curvature of the least-squares term on block b's
        # parameters: the FISTA metric, per parameter
        self.curvature = torch.empty(self.n_params, dtype=f64)
        params, prows, vals = [], [], []
        n_explicit = 0
        for b in sorted(projection.blocks, key=lambda b: getattr(b, "dim", 0)):
            if isinstance(b, KroneckerBlock):
                o = lay.offsets[b.pid]
                p_out, p_in = projection.kronecker_factors(b, "cpu", f64)
                size = b.n_out * b.n_in
                # ||P_out (x) P_in|| = ||P_out|| ||P_in||
                self.curvature[o : o + size] = float(
                    torch.linalg.matrix_norm(p_out, 2) * torch.linalg.matrix_norm(p_in, 2)) ** 2
                flops = b.d_out * b.n_out * b.n_in + b.d_out * b.n_in * b.d_in
                if (b.dim * size > 3 * flops + (1 << 14)
                        or n_explicit + b.dim * size > _EXPLICIT_BUDGET):
                    self.factored.append((b, o, p_out, p_in))
                    continue
                # column (i, j) of P_out (x) P_in is P_out[:, i] (x) P_in[:, j]
                kron = torch.kron(p_out, p_in)  # (dim, size)
                r, c = torch.meshgrid(torch.arange(b.dim), torch.arange(size), indexing="ij")
                params.append((o + c).reshape(-1))
                prows.append((b.offset + r).reshape(-1))
                vals.append(kron.reshape(-1))
                n_explicit += b.dim * size
            elif b.size > 0:
                rows, v = projection.sparse_factors("cpu", f64)
                cols = torch.cat([torch.arange(lay.offsets[p], lay.offsets[p] + lay.sizes[p])
                                  for p in b.pids])
                params.append(cols.repeat(rows.shape[0]))
                prows.append((b.offset + rows).reshape(-1))
                vals.append(v.reshape(-1))
                n_explicit += v.numel()
                st = projection.sparse_matrix()
                self.curvature[cols] = _top_eigenvalue(st.T @ st)
        # the explicit part: R^T restricted to its parameters, (n_explicit_params, d)
        if params:
            pp = torch.cat(params)
            self.explicit = torch.unique(pp)
            pos = torch.full((self.n_params,), -1, dtype=torch.long)
            pos[self.explicit] = torch.arange(len(self.explicit))
            self.rt = sp.csr_matrix((torch.cat(vals).numpy(),
                                     (pos[pp].numpy(), torch.cat(prows).numpy())),
                                    shape=(len(self.explicit), self.d))
            self.pos = pos
            self.all_explicit = len(self.explicit) == self.n_params
        else:
            self.explicit, self.rt, self.pos, self.all_explicit = None, None, None, False

    # Vectors are columns here: ``x`` is ``(n_params, k)`` and ``y`` ``(d, k)``, both
    # C-contiguous, the layout SciPy's sparse products read and write without copies.
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for columns ``x`` ``(n_params, k)``: ``(d, k)``."""
        k = x.shape[1]
        if self.rt is None:
            out = torch.zeros((self.d, k), dtype=torch.float64)
        else:
            xe = x if self.all_explicit else x[self.explicit]
            out = torch.from_numpy(self.rt.T @ xe.numpy())
        for b, o, p_out, p_in in self.factored:
            # vec(P_out W P_in^T) per column, as two plain matrix products
            w = (p_out @ x[o : o + b.n_out * b.n_in].view(b.n_out, b.n_in * k))
            w = p_in @ w.view(b.d_out, b.n_in, k).transpose(0, 1).reshape(b.n_in, -1)
            out[b.offset : b.offset + b.dim] = w.view(b.d_in, b.d_out, k).transpose(
                0, 1).reshape(b.dim, k)
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y`` for columns ``y`` ``(d, k)``: ``(n_params, k)``."""
        k = y.shape[1]
        if self.rt is not None and self.all_explicit:
            out = torch.from_numpy(self.rt @ y.numpy())
        else:
            out = torch.empty((self.n_params, k), dtype=torch.float64)
            if self.rt is not None:
                out[self.explicit] = torch.from_numpy(self.rt @ y.numpy())
        for b, o, p_out, p_in in self.factored:
            yb = y[b.offset : b.offset + b.dim].view(b.d_out, b.d_in, k)
            w = p_in.T @ yb.transpose(0, 1).reshape(b.d_in, -1)  # (n_in, d_out k)
            w = w.view(b.n_in, b.d_out, k).transpose(0, 1).reshape(b.d_out, -1)
            out[o : o + b.n_out * b.n_in] = (p_out.T @ w).view(-1, k)
        return out

    def columns(self, idx: torch.Tensor) -> np.ndarray:
        """The columns ``R e_q`` for the parameters ``idx``: a dense ``(d, len(idx))``."""
        out = np.zeros((self.d, len(idx)))
        if self.rt is not None:
            p = self.pos[idx]
            sel = (p >= 0).nonzero()[:, 0]
            if len(sel):
                out[:, sel.numpy()] = self.rt[p[sel].numpy()].toarray().T
        for b, o, p_out, p_in in self.factored:
            sel = ((idx >= o) & (idx < o + b.n_out * b.n_in)).nonzero()[:, 0]
            if len(sel):
                q = idx[sel] - o
                i, j = torch.div(q, b.n_in, rounding_mode="floor"), q % b.n_in
                col = (p_out[:, i][:, None, :] * p_in[:, j][None, :, :]).reshape(b.dim, -1)
                out[b.offset : b.offset + b.dim, sel.numpy()] = col.numpy()
        return out


def _operator(projection: Projection) -> _Operator:
    """The recovery operator of ``projection`` (cached while the projection lives)."""
    op = _OPERATORS.get(projection)
    if op is None:
        op = _OPERATORS[projection] = _Operator(projection)
    return op


def _refit(op: _Operator, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Least squares of every row on its support, the solution nearest to ``g`` (the
    minimum-norm correction); rows whose support is not smaller than ``d`` keep their
    l1 solution."""
    out = g.clone()
    for j in range(g.shape[0]):
        supp = g[j].nonzero()[:, 0]
        if len(supp) == 0 or len(supp) >= op.d:
            continue
        cols = op.columns(supp)
        gs = g[j, supp].numpy()
        r = h[j].numpy() - cols @ gs
        # minimum-norm correction (rank-revealing QR); directions below 1e-8 of the
        # largest are left alone (rounding)
        delta = sla.lstsq(cols, r, cond=1e-8, lapack_driver="gelsy")[0]
        out[j, supp] = torch.from_numpy(gs + delta)
    return out


def _fista(op: _Operator, h: torch.Tensor, lam_final: float, n_stages: int,
           max_iter: int, tol: float) -> torch.Tensor:
    """FISTA on every row of ``h`` ``(k, d)`` at once, with per-row penalties decreasing
    geometrically from ``0.5 ||R^T h||_inf`` to ``lam_final`` times it.

    The step of each parameter is ``1 / ||R_b||^2`` of its block ``b`` (``R`` is block
    diagonal: FISTA in that diagonal metric solves the same problem, with each block
    as well conditioned as it is alone, instead of every block at the step of the
    worst). Momentum restarts at each stage and, per row, whenever it points uphill
    (the gradient restart of O'Donoghue & Candes 2015); converged rows leave the block
    (checked every few iterations).
    """
    # columns are components: x (n_params, k), h (d, k)
    h = h.T.contiguous()
    curv = op.curvature[:, None]
    step = 1.0 / curv
    lam0 = op.adjoint(h).abs().amax(0, keepdim=True)
    x_all = torch.zeros((op.n_params, h.shape[1]), dtype=torch.float64)
    cols = (lam0[0] > 0).nonzero()[:, 0]
    if len(cols) == 0:
        return x_all.T
    ratios = np.geomspace(0.5, max(lam_final, 1e-300), n_stages)
    per_stage = max(1, max_iter // n_stages)
    for i, ratio in enumerate(ratios):
        # the earlier stages only warm-start the next: a loose tolerance is enough
        stage_tol = tol if i == len(ratios) - 1 else max(tol, _EARLY_TOL)
        live = cols
        x, hh = x_all[:, live].contiguous(), h[:, live].contiguous()
        lam = float(ratio) * lam0[:, live]
        hi = lam * step  # the per-entry thresholds
        lo = -hi
        z, t = x.clone(), torch.ones_like(lam)
        it = 0
        while it < per_stage and len(live):
            w = torch.addcmul(z, step, op.adjoint(op.apply(z) - hh), value=-1.0)
            x_new = w - w.clamp(lo, hi)  # soft thresholding
            dx = x_new - x
            # restart where the momentum step goes uphill (in the metric)
            uphill = ((z - x_new) * curv * dx).sum(0, keepdim=True) > 0
            t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
            z = torch.addcmul(x_new, torch.where(uphill, 0.0, (t - 1.0) / t_new), dx)
            t = torch.where(uphill, 1.0, t_new)
            x = x_new
            it += 1
            if it % _CHECK == 0:
                done = dx.norm(dim=0) <= stage_tol * x.norm(dim=0).clamp(min=1e-300)
                if bool(done.any()):
                    x_all[:, live[done]] = x[:, done]
                    keep = ~done
                    live, t = live[keep], t[:, keep]
                    x, z, hh, lo, hi = (a[:, keep].contiguous() for a in (x, z, hh, lo, hi))
        x_all[:, live] = x
    return x_all.T


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
        Refit the non-zero entries by least squares (when fewer than ``d``; a direct
        solve on the support's columns of ``R``, the correction of least norm).
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
    op = _operator(proj)
    block = max(8, min(H.shape[0], _BUDGET // max(proj.n_params, 1)))
    rows, cols, vals, res = [], [], [], []
    for k0 in range(0, H.shape[0], block):
        h = torch.from_numpy(np.ascontiguousarray(H[k0 : k0 + block]))
        g = _fista(op, h, alpha, n_stages, max_iter, tol)
        # drop entries that are negligible against the row's largest, then keep the
        # n_nonzero largest
        big = g.abs().amax(1, keepdim=True)
        g = torch.where(g.abs() > prune * big, g, torch.zeros_like(g))
        if n_nonzero is not None and g.shape[1] > n_nonzero:
            thr = torch.topk(g.abs(), n_nonzero, dim=1).values[:, -1:]
            g = torch.where((g.abs() >= thr) & (g != 0), g, torch.zeros_like(g))
        if refit and bool((g != 0).any()):
            g = _refit(op, h, g)
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
