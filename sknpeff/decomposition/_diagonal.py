"""D-NPEFF: non-negative factorization of sparse diagonal per-example Fishers.

``DiagonalNPEFF`` factors the sparse D-PEF matrix ``X`` (examples x parameters) into
non-negative coefficients ``W`` and non-negative pseudo-Fisher diagonals ``H``
(D-NPEFF, Matena & Raffel, arXiv 2310.04649, section 2). The factor is kept transposed
(``Ft = H.T``, kept parameters x components) and split into column blocks
(:class:`sknpeff.backends.ColumnBlocks`), so each iteration streams the factor once,
block by block, while the block's rows are in cache. One iteration is
:func:`._solvers.diagonal_step`; the update rules live in :mod:`._updates`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_non_negative

from ..backends import cupy_device
from ..utils import check_choice
from ._base import BaseNPEFF, Problem
from ._docs import shared_doc
from ._init import diagonal_init, sq_sum
from ._solvers import diagonal_h_update, diagonal_step
from ._updates import DIAG_UPDATES, diag_loss

__all__ = ["DiagonalNPEFF"]

#: W-only iterations per coefficient fit of partial_fit
_PARTIAL_W_ITER = 100
#: partial_fit weights batch ``s`` of ``t`` by ``(s / t) ** _FORGET_POWER`` (see
#: partial_fit): the statistics cover about the last ``t / _FORGET_POWER`` batches
_FORGET_POWER = 10.0
#: rounds of (coefficients, then H sweeps) per partial_fit batch
_PARTIAL_ROUNDS = 3
#: H sweeps on the accumulated statistics per round of partial_fit
_PARTIAL_H_ITER = 10


@shared_doc
class DiagonalNPEFF(BaseNPEFF):
    """Diagonal NPEFF: non-negative factorization of sparse diagonal PEFs.

    Finds non-negative coefficients ``W`` (n_examples, n_components) and non-negative
    pseudo-Fisher diagonals ``H`` (n_components, n_params) minimizing the Frobenius
    objective ``||X - W H||_F^2`` over sparse D-PEFs ``X`` (Matena & Raffel, *NPEFF*,
    D-NPEFF). Parameters (columns) with fewer than ``min_nnz_per_column`` stored values are
    pruned before fitting; their component entries are zero.

    Parameters
    ----------
    n_components : int, default=32
        Number of components ``r``.
    init : {"auto", "nndsvda", "nndsvd", "random"}, default="auto"
        Initialization of ``W`` and ``H``.

        - ``"auto"``: ``"nndsvda"``.
        - ``"nndsvd"``: non-negative double SVD (Boutsidis & Gallopoulos 2008) of the
          pruned sparse matrix, from a randomized truncated SVD computed with the same
          blocked sparse products as the iterations (no dense copy of ``X``). Components
          beyond the rank of ``X`` start random.
        - ``"nndsvda"``: ``"nndsvd"`` with its zeros replaced by the mean of ``X`` (lets
          multiplicative updates move every entry).
        - ``"random"``: the initialization of the original NPEFF code, ``W`` and ``H``
          uniform on
          ``[0, 2 sqrt(mean(X) / r)]`` (so ``W H`` matches ``X`` on average).
    solver : {"cd", "mu"}, default="cd"
        ``"cd"``: HALS, exact coordinate descent over one component at a time (much
        faster convergence). ``"mu"``: Lee-Seung multiplicative updates (the paper's).
        Coefficient fitting with the components frozen (:meth:`transform` and the ``W``
        returned by :meth:`fit_transform`) is a convex problem and always uses HALS.
    max_iter : int, default=200
        Maximum number of iterations (one iteration = a W step then an H step).
    tol : float, default=1e-4
        The stopping rule of :class:`sklearn.decomposition.NMF` for the same solver, so
        that ``tol`` buys what it buys there. ``"cd"``: stop when the sum of the absolute
        projected gradients of the iteration's coordinate updates (W step and H sweep)
        falls to ``tol`` times that of the first iteration. ``"mu"``: stop when the
        residual norm ``||X - W H||_F`` fell by less than ``tol`` times its value after
        the first iteration over the last 10 iterations (scikit-learn divides by the
        larger error of the initialization: this is stricter). On exactly factorable and
        noisy data both end at a residual no larger than scikit-learn's NMF at the same
        ``tol`` (``benchmarks/bench_nmf_sklearn.py``). :meth:`transform` stops a row of
        ``W`` when its relative change falls to ``tol``. ``0`` runs ``max_iter``
        iterations.
    {coef_tol_param}
    transform_max_iter : int or None, default=None
        Maximum number of coefficient steps of :meth:`transform` (and of the final
        coefficients of :meth:`fit_transform`); ``None``: ``max_iter``.
    random_state : int, RandomState instance or None, default=None
        Seed of the initialization.
    min_nnz_per_column : int, default=1
        Parameters with fewer stored nonzeros than this over the training examples are
        pruned (:meth:`partial_fit` keeps every column).
    backend : {"auto", "numpy", "cupy"} or Backend, default="auto"
        Array backend (see :func:`sknpeff.backends.get_backend`).
    devices : list of int, default=None
        GPU ids for the CuPy backend.
    distributed : bool, default=False
        Run as one rank of a ``torch.distributed`` job (launched with ``torchrun``):
        every rank passes the same X, owns a contiguous range of column blocks, and all
        ranks end with identical ``W`` and ``components_``.
    {block_size_param}
    checkpoint_path : str or path-like, optional
        Save the fit's state (components, coefficients, loss curve) to this ``.npz`` file
        every ``checkpoint_every`` iterations and when interrupted with Ctrl-C. If the
        file exists when ``fit`` starts and was written for the same data and
        parameters, the fit resumes from it (a file from other data is an error).
    checkpoint_every : int, default=50
        Iterations between checkpoints.
    verbose : int, default=0
        Print the loss every 10 iterations.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_params)
        Non-negative pseudo-Fisher diagonals in the full parameter space (zeros on pruned
        parameters); same dtype as the training ``X``.
    kept_columns_ : ndarray of int64
        Indices of the parameters kept after pruning.
    n_components_ : int
        Number of components.
    {fit_attributes}
    n_features_in_ : int
        Number of parameters of the input.
    feature_names_in_ : ndarray of str
        Names of features seen during fit (only when ``X`` has string column names).

    See Also
    --------
    sklearn.decomposition.NMF : Dense/sparse NMF with the same objective.
    sknpeff.decomposition.LowRankNPEFF : NPEFF on low-rank (exact) PEFs.

    Notes
    -----
    One iteration computes the W step from ``X @ Ft`` and ``Ft.T @ Ft``, then sweeps the
    column blocks: for each block ``T = X_b.T @ W``, the block's rows of ``Ft`` are updated
    in place, and ``X_b @ Ft_b`` and ``Ft_b.T @ Ft_b`` of the new rows are accumulated for
    the next W step. The loss is evaluated from the same small products,
    ``||X||^2 - 2 sum(W * (X @ Ft)) + sum((W.T W) * (Ft.T Ft))``, in float64.

    **CuPy input.** :meth:`fit_transform`, :meth:`transform` and
    :meth:`inverse_transform` return a CuPy array on the input's device when ``X`` is a
    CuPy array or ``cupyx.scipy.sparse`` matrix, and NumPy otherwise, whatever backend or
    devices computed them (as scikit-learn's array API dispatch); :meth:`partial_fit`
    accepts CuPy batches.
    {cupy_host_attributes}

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_diagonal
    >>> from sknpeff.decomposition import DiagonalNPEFF
    >>> X, W_true, H_true = make_planted_diagonal(n_examples=200, n_params=1000,
    ...                                           n_components=5, support_size=100,
    ...                                           random_state=0)
    >>> est = DiagonalNPEFF(n_components=5, random_state=0)
    >>> W = est.fit_transform(X)
    >>> W.shape, est.components_.shape
    ((200, 5), (5, 1000))
    >>> bool(est.reconstruction_err_ < 1e-2)
    True
    """

    def __init__(
        self,
        n_components: int = 32,
        *,
        init: str = "auto",
        solver: str = "cd",
        max_iter: int = 200,
        tol: float = 1e-4,
        coef_tol: float | None = None,
        transform_max_iter: int | None = None,
        random_state: Any = None,
        min_nnz_per_column: int = 1,
        backend: Any = "auto",
        devices: Any = None,
        distributed: bool = False,
        block_size: int | str | None = "auto",
        checkpoint_path: Any = None,
        checkpoint_every: int = 50,
        verbose: int = 0,
    ) -> None:
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.coef_tol = coef_tol
        self.transform_max_iter = transform_max_iter
        self.random_state = random_state
        self.min_nnz_per_column = min_nnz_per_column
        self.backend = backend
        self.devices = devices
        self.distributed = distributed
        self.block_size = block_size
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.verbose = verbose

    # ------------------------------------------------------------------ plumbing
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def _check_params(self) -> None:
        self._check_common_params()
        check_choice(self.init, "init", ("auto", "nndsvda", "nndsvd", "random"))

    def _loss_constant(self, A: sp.csr_matrix, n_rows: int = 1) -> float:
        return sq_sum(A.data)

    def _check_input(self, X: sp.csr_matrix, whom: str) -> None:
        check_non_negative(X, f"{whom} (X must be non-negative: D-PEFs are per-parameter "
                              "Fisher diagonals, sums of squared gradients)")

    def _check_frozen(self, frozen: Any, X: sp.csr_matrix) -> np.ndarray | None:
        frozen = super()._check_frozen(frozen, X)
        if frozen is not None and np.any(frozen < 0):
            raise ValueError("frozen_components must be finite and non-negative.")
        return frozen

    # ------------------------------------------------------------------------ fit
    def _init_state(self, prob: Problem, rng: np.random.RandomState
                    ) -> tuple[Any, list[Any]]:
        return diagonal_init(prob, self.n_components, self.init, rng)

    def _iterate(self, prob: Problem, W: Any, parts: list[Any], n_frozen: int
                 ) -> tuple[Any, list[float], int, float]:
        """The joint iterations (W step, then the H sweep), in place on ``parts``.

        Returns the coefficients of the final components (fitted as :meth:`transform`
        fits them), the loss curve, the number of iterations and the final loss.
        """
        blocks = prob.blocks
        xp = blocks.backend.xp
        update = DIAG_UPDATES[self.solver]
        fingerprint = self._fingerprint(prob, n_frozen)
        start, losses0, monitored0 = 0, [], None
        resumed = self._resume(prob, fingerprint, parts)  # refills parts in place
        if resumed is not None:
            W, start = resumed["W"], resumed["n_iter"]
            losses0, monitored0 = resumed["losses"], resumed["monitored"]
        state = {"W": W, "XHt": blocks.matmul(parts), "HHt": blocks.gram(parts),
                 "fresh": True}
        # the stopping rules of scikit-learn's NMF: for "cd" the projected-gradient
        # sum of the iteration against the first one's, for "mu" the decrease of the
        # residual norm ||X - W H||_F (not its square: a squared loss falls by 2 e de,
        # so near a good fit it stopped 5-50x early)
        cd = self.solver == "cd"
        violation: list | None = [] if cd else None
        h_update = diagonal_h_update(xp, update, self.solver, n_frozen, violation)

        def step(it: int) -> tuple[float, float]:
            loss = diagonal_step(xp, blocks, parts, state, update, h_update, prob.const,
                                 violation)
            return loss, state["violation"] if cd else float(np.sqrt(loss))

        losses, n_iter = self._run_loop(
            step, self.max_iter, label="fit", start=start, losses=losses0, monitored=monitored0,
            checkpoint=self._saver(fingerprint, prob, parts, state),
            checkpoint_every=self.checkpoint_every, coefs=lambda: state["W"], xp=xp,
            ratio_rule=cd)
        if state["fresh"]:
            XHt, HHt = state["XHt"], state["HHt"]
        else:
            # interrupted inside an iteration: recompute the products of the factor as
            # it is, so that every fitted attribute describes one state
            XHt, HHt = blocks.matmul(parts), blocks.gram(parts)
        # the returned coefficients are those of the final components, fitted exactly
        # as transform(X) fits them (no sparse product needed: XHt and HHt are at hand)
        terms = {"XHt": XHt, "HHt": HHt}
        W = self._coefficients(xp, terms)
        return W, losses, n_iter, self._objective(xp, dict(terms, const=prob.const), W)

    # ------------------------------------------------------------------ transform
    def _coefficient_terms(self, X: sp.csr_matrix, full_const: bool) -> tuple[Any, dict]:
        """``X @ H.T`` and ``H @ H.T`` for the fitted components, computed once.

        When this process computes the whole job on one host partition: one sparse
        product over the full parameter space (``components_`` is zero on pruned
        columns), no re-indexing or blocking of ``X``. Anywhere else (several
        partitions or ranks, GPUs) through the column blocks of the kept columns, as
        the fit: each device gets only its columns of ``X`` and ``H`` (an input larger
        than one device is split before it is moved), and every block stays within the
        int32 index range of CuPy's sparse matrices.
        """
        backend = self._get_backend(X)
        if backend.holds_whole_job():
            Xs = X if X.has_sorted_indices else X.sorted_indices()  # never the caller's
            a = backend.csr(Xs.indptr, Xs.indices, Xs.data, Xs.shape)
            Ct = backend.asarray(np.ascontiguousarray(self.components_.T, dtype=X.dtype))
            XHt, HHt = backend.spmm(a, Ct), Ct.T @ Ct
        else:
            prob = self._prepare(X, fitting=False, transpose=False)
            blocks = prob.blocks
            parts = blocks.split_factor(self._factor_from_components(X.dtype), dtype=X.dtype)
            XHt, HHt = blocks.matmul(parts), blocks.gram(parts)
        const = sq_sum(X.data) if full_const else None
        return backend, {"XHt": XHt, "HHt": HHt, "const": const}

    def _coefficients(self, xp: Any, terms: dict, n_iter: int | None = None) -> Any:
        """Coefficients with the components frozen (W steps only).

        With the components frozen the problem is a convex non-negative least squares
        per example, so it is solved by HALS from zero whatever ``solver`` is (the same
        optimum as multiplicative steps, in far fewer steps, and exact zeros where a
        component is absent).
        """
        XHt, HHt = terms["XHt"], terms["HHt"]
        W = xp.zeros((XHt.shape[0], HHt.shape[0]), dtype=XHt.dtype)
        return self._solve_coefficients(xp, XHt, HHt, W, update=DIAG_UPDATES["cd"],
                                        n_iter=n_iter)

    @staticmethod
    def _objective(xp: Any, terms: dict, W: Any) -> float:
        return diag_loss(xp, terms["const"], W, terms["XHt"], W.T @ W, terms["HHt"])

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Map coefficients back to D-PEF space: ``X @ components_``.

        Parameters
        ----------
        X : array-like of shape (n_examples, n_components)
            Coefficients (for example the output of :meth:`transform`).

        Returns
        -------
        X_original : ndarray of shape (n_examples, n_params)
            Dense reconstruction; a CuPy array on ``X``'s device when ``X`` is a CuPy
            array (computed there: the result is the large side of the product).
        """
        self._check_fitted()
        device = cupy_device(X)
        if device is not None:
            import cupy

            with cupy.cuda.Device(device):
                W = X.toarray() if not isinstance(X, cupy.ndarray) else X
                self._check_coefficients(W)
                return W @ cupy.asarray(self.components_)
        W = np.asarray(X.toarray() if sp.issparse(X) else X)
        self._check_coefficients(W)
        return W @ self.components_

    def _check_coefficients(self, W: Any) -> None:
        if W.ndim != 2 or W.shape[1] != self.components_.shape[0]:
            raise ValueError(
                f"X must have shape (n_samples, {self.components_.shape[0]}), got {W.shape}."
            )

    # ---------------------------------------------------------------- partial fit
    def partial_fit(self, X: Any, y: Any = None) -> DiagonalNPEFF:
        """Update the components with one mini-batch of D-PEFs (online NMF).

        For data that does not fit in memory: call repeatedly on batches, several passes
        (epochs) over the data as :class:`sklearn.decomposition.MiniBatchNMF` makes.
        Online NMF in the manner of Mairal et al. (JMLR 2010): the estimator keeps
        running sufficient statistics ``A = sum_s rho_s X_s.T @ W_s`` and
        ``B = sum_s rho_s W_s.T @ W_s`` over the batches ``s`` seen (``O(n_params x
        n_components)`` memory, never the data). Each call runs three rounds of: fit the
        batch's coefficients with the components frozen (as :meth:`transform`, at most
        100 W steps), put the batch's statistics beside the older ones, then take 10
        H steps (the solver's) on the quadratic ``A``, ``B`` define. The later rounds
        re-fit the batch's coefficients to the moved components, so the batch's own
        statistics are not stale. Older batches are forgotten: after ``t`` batches,
        batch ``s`` weighs ``(s / t) ** 10``, so the statistics cover about the last
        ``t / 10`` batches (at least the current one): statistics gathered with early,
        poor coefficients fade within a few passes while the window, and with it the
        averaging over batches, grows with the stream. Ten passes over 5 batches ended
        within 0.04% of a full fit's error on planted D-PEFs with sparse noise, 2.1%
        above it on noisy dense random data (1.8% after 20 passes;
        ``benchmarks/bench_nmf_sklearn.py``). The first call initializes the
        components from its batch (``init``) and keeps every column (no pruning); a
        call after :meth:`fit` continues from the fitted components with fresh
        statistics.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_params)
            One batch of non-negative D-PEFs.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : DiagonalNPEFF
            The updated estimator.
        """
        return self._dispatch(self._partial_fit, X)

    def _partial_fit(self, X: Any) -> DiagonalNPEFF:
        first = not hasattr(self, "components_")
        if first:
            self._check_params()
        X = self._validate(X, reset=first, whom="partial_fit")
        if first:
            self.kept_columns_ = np.arange(X.shape[1], dtype=np.int64)
            self.n_params_ = X.shape[1]
            prob = self._prepare(X, fitting=False)
            rng = check_random_state(self.random_state)
            _, parts = diagonal_init(prob, self.n_components, self.init, rng)
            self.components_ = self._full_components(prob.blocks.gather_factor(parts))
        else:
            prob = self._prepare(X, fitting=False)
            parts = prob.blocks.split_factor(self._factor_from_components(X.dtype),
                                             dtype=X.dtype)
        blocks = prob.blocks
        backend = blocks.backend
        xp = backend.xp
        t = getattr(self, "n_steps_", 0) + 1
        rho = ((t - 1) / t) ** _FORGET_POWER
        if t == 1 or not hasattr(self, "_stat_XtW"):
            old_XtW, old_WtW = None, None
        else:  # the older statistics, already weighed down for this batch
            old_XtW = []
            for i, a in enumerate(blocks.split_factor(self._stat_XtW, dtype=X.dtype)):
                with backend.device(i):
                    old_XtW.append(rho * a)
            old_WtW = rho * backend.asarray(self._stat_WtW, dtype=X.dtype)
        update = DIAG_UPDATES[self.solver]
        for rnd in range(_PARTIAL_ROUNDS):
            terms = {"XHt": blocks.matmul(parts), "HHt": blocks.gram(parts),
                     "const": prob.const}
            W = self._coefficients(xp, terms, n_iter=_PARTIAL_W_ITER)
            WtW = W.T @ W
            if rnd == 0:  # the batch's loss with the components it came to
                batch_loss = diag_loss(xp, prob.const, W, terms["XHt"], WtW, terms["HHt"])
            XtW = blocks.rmatmul(W)
            if old_XtW is None:
                stat_XtW, stat_WtW = XtW, WtW
            else:
                stat_XtW = []
                for i, (a, b) in enumerate(zip(old_XtW, XtW, strict=True)):
                    with backend.device(i):
                        stat_XtW.append(a + b)
                stat_WtW = old_WtW + WtW
            WtWs = blocks.replicate(stat_WtW)  # a copy on each partition's device
            for b in blocks.blocks:
                with backend.device(b.partition):
                    Fb = parts[b.partition][b.local_start:b.local_stop]
                    Tb = stat_XtW[b.partition][b.local_start:b.local_stop]
                    for _ in range(_PARTIAL_H_ITER):
                        update(xp, Fb, Tb, WtWs[b.partition])
        self._stat_XtW = blocks.gather_factor(stat_XtW)
        self._stat_WtW = np.asarray(backend.to_numpy(stat_WtW))
        self.components_ = self._full_components(blocks.gather_factor(parts)).astype(
            self.components_.dtype, copy=False)
        self._record_batch(batch_loss)
        return self
