"""One iteration of each NPEFF solver, as free functions of the prepared input.

Each function advances the fit by one iteration in place: the coefficients ``W`` and the
factor parts (one array per partition, the transposed factor ``Ft`` split over the column
blocks of :class:`sknpeff.backends.ColumnBlocks`), and the small products of the factor
kept in ``state``. They are written once against the array namespace ``xp`` and never
name an array library; the estimators run them in their fit loop (stopping rule,
checkpoints, interrupts). The update rules they call live in :mod:`._updates`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._updates import (
    DIAG_UPDATES,
    diag_loss,
    lowrank_curvature,
    lowrank_g_update,
    lowrank_grad_matrix,
    lowrank_loss,
    lowrank_sq_proj,
    lowrank_weighted_rows,
)

__all__ = ["diagonal_h_update", "diagonal_step", "lowrank_g_step", "lowrank_step"]


def diagonal_h_update(xp: Any, update: Callable[..., None], solver: str, n_frozen: int,
                      violation: list | None = None) -> Callable[[Any, Any, Any], None]:
    """The H step of one column block, ``h(Fb, T, G)`` in place, for D-NPEFF.

    ``T = X_b.T @ W`` and ``G = W.T @ W``. The first ``n_frozen`` columns of the factor
    (frozen components) never change. With a list ``violation`` (``solver="cd"``), each
    block's projected-gradient sum is appended to it (see ``diag_hals_update``).
    """
    k0 = int(n_frozen)
    kw = {} if violation is None else {"violation": violation}

    def h_update(Fb: Any, T: Any, G: Any) -> None:
        if not k0:
            update(xp, Fb, T, G, **kw)
        elif solver == "cd":
            # HALS is sequential over columns: solve the free columns' own problem,
            # min 1/2 tr(F1 G11 F1^T) - tr(F1^T (T1 - F0 G01))
            update(xp, Fb[:, k0:], T[:, k0:] - Fb[:, :k0] @ G[:k0, k0:], G[k0:, k0:],
                   **kw)
        else:
            # multiplicative steps update all columns at once: restoring the frozen
            # ones afterwards is exactly the step of the free ones
            keep = Fb[:, :k0].copy()
            update(xp, Fb, T, G)
            Fb[:, :k0] = keep

    return h_update


def diagonal_step(xp: Any, blocks: Any, parts: list[Any], state: dict,
                  update: Callable[..., None], h_update: Callable[..., None],
                  const: float, violation: list | None = None) -> float:
    """One D-NPEFF iteration: the W step, then the H sweep over the column blocks.

    ``state`` holds ``W`` and the products of the factor, ``XHt = X @ Ft`` and
    ``HHt = Ft.T @ Ft``; ``state["fresh"]`` is False while they may be stale (an
    interrupt inside the sweep). Returns ``||X - W H||_F^2`` over the kept columns for
    the new ``W`` and the new factor. With ``violation`` (the list ``h_update`` appends
    to; ``solver="cd"``), the iteration's projected-gradient sum, W step and H sweep
    together, all-reduced over partitions and ranks, is left in ``state["violation"]``.
    """
    W = state["W"]
    state["fresh"] = False  # products may go stale until the sweep returns
    if violation is None:
        update(xp, W, state["XHt"], state["HHt"])
    else:
        violation.clear()
        update(xp, W, state["XHt"], state["HHt"], violation=violation)
        w_part = float(violation.pop())  # W is replicated: counted once, not reduced
    WtW = W.T @ W
    # WtW goes through consts: each device gets its own copy
    XHt, HHt = blocks.sweep(parts, R=W, update=h_update, consts=(WtW,))
    state.update(XHt=XHt, HHt=HHt, fresh=True)
    if violation is not None:  # each rank holds its own blocks' sums
        be = blocks.backend
        local = sum(float(v) for v in violation)
        sums = [be.asarray(np.array([local if p == 0 else 0.0]), partition=p)
                for p in range(blocks.n_partitions)]
        state["violation"] = w_part + float(be.to_numpy(be.allreduce(sums))[0])
    return diag_loss(xp, const, W, XHt, WtW, HHt)


def lowrank_step(xp: Any, blocks: Any, parts: list[Any], state: dict, it: int, *,
                 const: float, n_slots: int, solver: str, n_g_only: int,
                 learning_rate: str | float, free: Any, ortho: float,
                 ortho_target: float) -> tuple[float, float]:
    """One LRM-NPEFF iteration: the W step (after the ``n_g_only`` warm-up
    iterations), then a gradient step on the factor, block by block.

    ``state`` holds ``W``, ``P = A @ Ft``, ``Q = Ft.T @ Ft``, ``N`` (the squared
    projections of ``P``, when known) and, for ``learning_rate="auto"``, the step scale
    ``eta`` and the previous loss ``prev``. ``free`` is 1 for the components that move
    and 0 for frozen ones. Returns the objective at the end of the iteration (new W, new
    factor) and the loss after the W step (which drives the step size and the stopping
    rule).
    """
    W, P, Q = state["W"], state["P"], state["Q"]
    N = state.pop("N", None)
    if N is None:
        N = lowrank_sq_proj(xp, P, n_slots)
    if it >= n_g_only:
        # the W problem, min_W sum_i (w_i QQ w_i^T - 2 N_i . w_i) with W >= 0, is the
        # same row-wise non-negative least squares as D-NPEFF's: the same updates
        DIAG_UPDATES[solver](xp, W, N, Q * Q)
    loss = lowrank_loss(xp, const, W, N, Q)
    if isinstance(learning_rate, str):  # grow the step while the loss falls, halve it
        state["eta"] = min(state["eta"] * 1.05, 2.0) if loss <= state["prev"] \
            else state["eta"] * 0.5
        L = lowrank_curvature(xp, W, Q, ortho, ortho_target)
        stepk = state["eta"] * free / xp.maximum(L, 1e-30)
    else:
        stepk = float(learning_rate) * free
    state["prev"] = loss
    P, Q = lowrank_g_step(xp, blocks, parts, W, P, Q, n_slots, stepk, ortho, ortho_target)
    N = lowrank_sq_proj(xp, P, n_slots)  # also the next iteration's
    state.update(W=W, P=P, Q=Q, N=N)
    return lowrank_loss(xp, const, W, N, Q), loss


def lowrank_g_step(xp: Any, blocks: Any, parts: list[Any], W: Any, P: Any, Q: Any,
                   n_slots: int, stepk: Any, ortho: float = 0.0, ortho_target: float = 0.0
                   ) -> tuple[Any, Any]:
    """One gradient step on the LRM-NPEFF factor, block by block, in place on ``parts``.

    ``stepk`` holds one step size per component (0 freezes a component). Returns the
    products of the new factor, ``(A @ Ft, Ft.T @ Ft)``.
    """
    R = lowrank_weighted_rows(xp, W, P, n_slots)
    B = lowrank_grad_matrix(xp, W, Q, ortho, ortho_target)

    def g_update(Fb: Any, T: Any, B: Any, s: Any) -> None:
        lowrank_g_update(xp, Fb, T, B, s)

    # B and the steps go through consts: each device gets its own copy
    return blocks.sweep(parts, R, g_update, consts=(B, stepk))
