"""The NPEFF update rules, written once against an array namespace ``xp``.

Every function here takes plain arrays of one namespace (NumPy or CuPy) and never names
the array library: the same code runs on CPU and GPU. Sparse products and all-reduces are
not here; they come from :class:`sknpeff.backends.ColumnBlocks`, which calls the
block-level updates below on each column block of the transposed factor ``Ft``
(kept parameters x components).

Notation (as in Matena & Raffel, arXiv 2310.04649): ``n`` examples, ``c`` class slots,
``r`` components, ``W`` (n, r) coefficients, ``Ft`` (m', r) the transposed factor
(``G.T`` or ``H.T``), ``P = A @ Ft``, ``Q = Ft.T @ Ft``.
"""

from __future__ import annotations

from typing import Any

#: added to the denominators of multiplicative steps (keeps them finite where a row of
#: the factor products is zero)
EPS = 1e-9


def sum_f64(xp: Any, x: Any) -> float:
    """Sum in float64 whatever the input dtype (losses must not lose precision)."""
    return float(xp.sum(x, dtype=xp.float64))


# =============================================================================
# Low rank (LRM-NPEFF)
# =============================================================================

# ---- low-rank section: maintained with LowRankNPEFF ----


def lowrank_sq_proj(xp: Any, P: Any, n_slots: int) -> Any:
    """``N[i, k] = sum_j P[(i, j), k]**2 = g_k^T F_i g_k`` (n x r)."""
    n = P.shape[0] // n_slots
    return (P * P).reshape(n, n_slots, P.shape[1]).sum(axis=1)


def lowrank_loss(xp: Any, const: float, W: Any, N: Any, Q: Any) -> float:
    """``sum_i ||F_i - sum_k W_ik g_k g_k^T||_F^2`` without forming any F_i.

    ``const = sum_i ||F_i||^2``; the other terms are ``-2 sum W*N`` and
    ``sum (W^T W) * Q**2``. Accumulated in float64.
    """
    M = W.T @ W
    return const - 2.0 * sum_f64(xp, W * N) + sum_f64(xp, M * Q * Q)


def lowrank_weighted_rows(xp: Any, W: Any, P: Any, n_slots: int) -> Any:
    """``R[(i, j), k] = W[i, k] * P[(i, j), k]`` (n*c x r), for the G gradient."""
    n, r = W.shape
    return (P.reshape(n, n_slots, r) * W[:, None, :]).reshape(n * n_slots, r)


def lowrank_grad_matrix(xp: Any, W: Any, Q: Any, ortho_strength: float = 0.0,
                        ortho_target: float = 0.0) -> Any:
    """The r x r matrix ``B`` with ``grad_G L / 4 = Ft @ B - A^T R`` (transposed layout).

    ``B = (W^T W) * Q``, plus ``ortho_strength * (Q - s I)`` for the optional
    orthogonal regularization (its gradient adds ``lambda (G G^T G - s G)``).
    """
    B = (W.T @ W) * Q
    if ortho_strength:
        B = B + ortho_strength * (Q - ortho_target * xp.eye(Q.shape[0], dtype=Q.dtype))
    return B


def lowrank_curvature(xp: Any, W: Any, Q: Any, ortho_strength: float = 0.0,
                      ortho_target: float = 0.0) -> Any:
    """Upper bound on the curvature of the loss in each component ``g_k`` (length r).

    The loss restricted to ``g_k`` has Hessian
    ``-4 sum_i W_ik F_i + 4 M_kk (|g|^2 I + 2 g g^T) + 4 sum_{l != k} M_kl g_l g_l^T``
    (``M = W^T W``). The first term is negative semi-definite, so its largest
    eigenvalue is at most ``12 M_kk Q_kk + 4 sum_{l != k} M_kl Q_ll``. A gradient step
    of ``1 / L_k`` along ``g_k`` alone then cannot increase the loss (majorization), a
    step size derived from the problem instead of a fixed learning rate.
    """
    M = W.T @ W
    q = xp.diagonal(Q)
    L = 4.0 * (M @ q) + 8.0 * xp.diagonal(M) * q
    if ortho_strength:
        L = L + 4.0 * ortho_strength * xp.maximum(xp.sum(q) + 2.0 * q - ortho_target, 0.0)
    return L


def lowrank_g_update(xp: Any, Fb: Any, T: Any, B: Any, step: Any) -> None:
    """Gradient step on one block of ``Ft`` in place: ``Fb -= 4 step (Fb @ B - T)``.

    ``T = At_b @ R`` for the block; ``step`` has one entry per component (0 freezes a
    component, as component-set expansion needs).
    """
    Fb -= (4.0 * step) * (Fb @ B - T)


# =============================================================================
# Diagonal (D-NPEFF)
# =============================================================================

# ---- diagonal section: maintained with DiagonalNPEFF ----
#
# D-NPEFF factors X (n, m') ~ W H with W (n, r) >= 0 and H (r, m') >= 0; the factor is
# stored transposed, Ft = H.T (m', r). Both half-steps are the same non-negative quadratic
# problem: for rows F (rows, r) of W or of Ft,
#
#     minimize  1/2 tr(F G F.T) - tr(F.T T)  subject to F >= 0,
#
# with (T, G) = (X @ Ft, Ft.T @ Ft) for W and (X.T @ W, W.T @ W) for a block of Ft. Rows are
# independent, so a column block of Ft is updated alone (ColumnBlocks.sweep) and streaming
# (partial_fit) uses the same functions with accumulated statistics as (T, G).


def diag_hals_update(xp: Any, F: Any, T: Any, G: Any, violation: list | None = None
                     ) -> None:
    """One HALS (exact coordinate descent) sweep over the columns of ``F``, in place.

    For ``k = 0 .. r-1``: ``F[:, k] = max(0, F[:, k] + (T[:, k] - F @ G[:, k]) / G[k, k])``.
    Columns with ``G[k, k] == 0`` (a dead component) are left unchanged. The sweep runs on
    a transposed C-contiguous copy so that each column is a contiguous row (one GEMV per
    component), then writes the result back into ``F``.

    With a list ``violation``, the sweep appends the sum of the absolute projected
    gradients of the coordinates as each is updated (the gradient ``F @ G - T`` of the
    column just before its update, its negative part only where the entry is zero), a
    float64 scalar in ``xp``: scikit-learn's ``cd`` solver stops on this value.

    Parameters
    ----------
    xp : array namespace (numpy or cupy)
    F : array of shape (rows, r)
        Current non-negative rows (``W`` or a block of ``Ft``); updated in place.
    T : array of shape (rows, r)
        Linear term (``X @ Ft`` for ``W``, ``X.T @ W`` for ``Ft``).
    G : array of shape (r, r)
        Symmetric PSD Gram matrix (``Ft.T @ Ft`` for ``W``, ``W.T @ W`` for ``Ft``).
    """
    r = F.shape[1]
    if F.shape[0] == 0 or r == 0:
        return
    Fc = xp.ascontiguousarray(F.T)
    Tc = xp.ascontiguousarray(T.T, dtype=Fc.dtype)
    G = xp.asarray(G, dtype=Fc.dtype)
    d = xp.diagonal(G)
    # guarded inverse, computed once on the device (no host sync per component)
    inv = xp.where(d > 0, 1.0 / xp.where(d > 0, d, 1.0), 0.0).astype(Fc.dtype)
    total = None
    for k in range(r):
        upd = G[k] @ Fc  # (F @ G)[:, k], G symmetric
        xp.subtract(Tc[k], upd, out=upd)  # minus the gradient
        row = Fc[k]
        if violation is not None:
            pg = xp.where(row > 0, xp.abs(upd), xp.maximum(upd, 0))
            v = xp.sum(pg, dtype=xp.float64)
            total = v if total is None else total + v
        upd *= inv[k]
        row += upd
        xp.maximum(row, 0, out=row)
    F[...] = Fc.T
    if violation is not None:
        violation.append(total)


def diag_mu_update(xp: Any, F: Any, T: Any, G: Any, eps: float = EPS) -> None:
    """One Lee-Seung multiplicative step ``F <- F * T / (F @ G + eps)``, in place.

    The D-NPEFF update of the paper (Matena & Raffel, arXiv 2310.04649, section 2), the
    same for ``W`` and ``Ft``.
    Parameters as in :func:`diag_hals_update`. Multiplicative steps shrink unneeded
    entries geometrically, towards subnormal numbers, whose arithmetic is one to two
    orders of magnitude slower on x86 CPUs (measured: the step itself 10x slower). So
    positive entries are kept at or above ``eps(dtype)**2 * max(F)`` (1.4e-14 of the
    largest entry for float32), where they no longer matter to the loss; exact zeros
    stay zero.
    """
    if F.shape[0] == 0:
        return
    denom = F @ xp.asarray(G, dtype=F.dtype)
    denom += eps
    F *= T
    F /= denom
    info = xp.finfo(F.dtype)
    floor = max(float(xp.max(F)) * float(info.eps) ** 2, float(info.tiny) ** 0.5)
    xp.copyto(F, floor, where=(F > 0) & (F < floor))


#: solver name -> in-place update of rows given (T, G)
DIAG_UPDATES = {"cd": diag_hals_update, "mu": diag_mu_update}


def diag_loss(xp: Any, const: float, W: Any, XHt: Any, WtW: Any, HHt: Any) -> float:
    """``||X - W H||_F^2`` without forming ``X`` or ``W H``, accumulated in float64.

    ``||X||^2 - 2 sum(W * (X @ Ft)) + sum((W.T @ W) * (Ft.T @ Ft))``, clamped at zero
    (the three terms nearly cancel at a good fit).
    """
    cross = sum_f64(xp, W * XHt)
    quad = sum_f64(xp, WtW * HHt)
    return max(0.0, float(const) - 2.0 * cross + quad)


def diag_solve_w(xp: Any, W: Any, XHt: Any, HHt: Any, update: Any, max_iter: int,
                 tol: float) -> int:
    """Fit ``W`` with the components frozen (coefficient fitting), in place.

    Only the cheap W step is iterated: ``XHt = X @ Ft`` and ``HHt = Ft.T @ Ft`` are
    computed once by the caller. Each row of ``W`` is its own problem, so a row stops as
    soon as its own relative change falls to ``tol`` or below
    (``||w_new - w_old|| <= tol * ||w_new||``); the result of a row therefore does not
    depend on which other rows are in the batch.

    Returns
    -------
    n_iter : int
        Iterations run (for the slowest row).
    """
    active = xp.arange(W.shape[0])
    n_iter = 0
    for _ in range(max_iter):
        if active.shape[0] == 0:
            break
        n_iter += 1
        full = active.shape[0] == W.shape[0]
        Wa = W if full else W[active]
        old = Wa.copy()
        update(xp, Wa, XHt if full else XHt[active], HHt)
        if not full:
            W[active] = Wa
        if tol <= 0:
            continue
        old -= Wa
        change = xp.sum(old * old, axis=1)
        scale = xp.sum(Wa * Wa, axis=1)
        active = active[change > (tol * tol) * scale]
    return n_iter
