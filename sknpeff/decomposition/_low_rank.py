"""LowRankNPEFF: LRM-NPEFF, a non-negative sum of rank-1 PSD matrices per example.

LRM-NPEFF (Matena & Raffel, arXiv 2310.04649) approximates each example's low-rank
Fisher by a non-negative combination of rank-one pseudo-Fishers. One iteration is
:func:`._solvers.lowrank_step`; the update rules live in :mod:`._updates`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ..utils import check_choice, check_float, check_int
from ._base import BaseNPEFF, Problem
from ._data import row_chunks
from ._docs import shared_doc
from ._init import lowrank_init_factor
from ._solvers import lowrank_g_step, lowrank_step
from ._updates import lowrank_curvature, lowrank_loss, lowrank_sq_proj

__all__ = ["LowRankNPEFF"]

#: rows of A sampled per component for the data-seeded initialization (k-means++-like
#: choice among them), at least and at most in all
_INIT_POOL_PER_COMPONENT = 32
_INIT_POOL_MIN = 1024
_INIT_POOL_MAX = 4096
#: coefficient steps that fit the first W to the data-seeded components
_INIT_W_ITER = 20


@shared_doc
class LowRankNPEFF(BaseNPEFF):
    """Low-rank NPEFF (LRM-NPEFF): decompose exact low-rank per-example Fishers.

    Each example's Fisher ``F_i = sum_j a_ij a_ij^T`` (its ``n_classes`` vectors, one row
    of ``X``) is approximated by a non-negative combination of rank-one pseudo-Fishers,
    ``F_i ~ sum_k W_ik g_k g_k^T``, minimizing ``sum_i ||F_i - sum_k W_ik g_k g_k^T||_F^2``.
    No ``n_params x n_params`` matrix is ever formed: memory is O(nnz + (n*c + m) * r),
    ``c`` the most class slots any example fills (empty slots, as ``min_class_prob``
    leaves them, are skipped: they add nothing to ``F_i``).

    Parameters
    ----------
    n_components : int, default=32
        Number of components ``r``.
    n_classes : int, default=1
        Class slots per example; must equal the ``n_classes`` of the
        :class:`~sknpeff.PEFTransformer` that produced ``X`` (the width of ``X`` must be a
        multiple of it).
    init : {"auto", "data", "random"}, default="auto"
        ``"data"`` (and ``"auto"``) seeds each ``g_k`` with one example's own ``a_ij``
        row, chosen k-means++-style (each next row drawn with weight
        ``(1 - max |cos| to the rows already chosen)^2``) from a random pool of rows, then
        fits W with the components fixed. ``"random"`` is the original NPEFF code's
        init: ``W ~ U(0, 1)``, ``G ~ N(0, 2 / (r m'))``.
    learning_rate : "auto" or float, default="auto"
        ``"auto"``: per-component step ``1 / L_k`` from a bound on the loss's curvature
        in ``g_k`` (see :func:`~sknpeff.decomposition._updates.lowrank_curvature`),
        scaled by a factor that grows while the loss falls and halves when it rises.
        A float is a fixed rate, as in the original NPEFF code (``G -= 4 lr grad/4``;
        the paper used 1e-3 on normalized PEFs).
    solver : {"cd", "mu"}, default="cd"
        Update of the coefficients, in the fit and in :meth:`transform`: one exact
        coordinate-descent (HALS) sweep, or the paper's multiplicative step. Both never
        increase the loss. (The components take gradient steps whatever the solver.)
    w_solver : {"cd", "mu"}, default="deprecated"
        Former name of ``solver``.

        .. deprecated:: 0.1
           ``w_solver`` was renamed to ``solver`` and will be removed in 0.3.
    ortho_strength : float, default=0.0
        Strength of the optional orthogonal regularization pushing ``G G^T`` toward
        ``s I``, ``s`` the mean initial ``|g_k|^2``.
    max_iter : int, default=500
        Maximum number of joint iterations (W step then G step).
    n_iter_g_only : int, default=0
        Iterations with W frozen before the joint phase (reference's warm-up).
    tol : float, default=1e-5
        Stop when the loss after the W step (the value that also drives the step size)
        decreased by less than ``tol`` times its first value over the last 10
        iterations (set 0 to always run ``max_iter``). Loss plateaus on the
        way to a good minimum are common; 1e-4 stopped on one on 1 of 10 planted seeds.
    {coef_tol_param}
    transform_max_iter : int or None, default=200
        Maximum number of coefficient steps of :meth:`transform` (and of the final
        coefficients of :meth:`fit_transform`); ``None``: ``max_iter``. They are cheap.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialization.
    min_nnz_per_column : int, default=1
        Parameters with fewer nonzeros across all examples and slots are pruned.
    backend : {"auto", "numpy", "cupy"} or Backend, default="auto"
        Array backend (see :func:`sknpeff.backends.get_backend`).
    devices : list of int, optional
        GPU ids for the CuPy backend.
    distributed : bool, default=False
        Run as one rank of a ``torch.distributed`` job (launched with ``torchrun``):
        every rank passes the same X, owns a contiguous range of column blocks, and
        all ranks end with identical ``W`` and ``components_``.
    {block_size_param}
    checkpoint_path : str or path-like, optional
        Save the fit's state (components, coefficients, step size, loss curve) to this
        ``.npz`` file every ``checkpoint_every`` iterations and when interrupted with
        Ctrl-C. If the file exists when ``fit`` starts and was written for the same data
        and parameters, the fit resumes from it (a file from other data is an error).
    checkpoint_every : int, default=50
        Iterations between checkpoints.
    verbose : int, default=0
        Print the loss every 10 iterations.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_params)
        Unit-norm pseudo-Fisher vectors ``g_k`` in the full parameter space (zeros on
        pruned parameters); their scale is folded into the coefficients.
    kept_columns_ : ndarray of int64
        Parameter indices kept after pruning.
    n_components_ : int
        Number of components.
    n_classes_ : int
        Class slots per example.
    n_params_ : int
        Number of parameters (``n_features_in_ / n_classes``).
    {fit_attributes}
    n_features_in_ : int
        ``n_classes * n_params``.
    projection_ : Projection or None
        The :class:`~sknpeff.pef.Projection` of the PEFs the fit saw, when they were
        projected (``PEFTransformer(compression="projection")``, read from the tag of
        ``X``, see :func:`~sknpeff.utils.pef_projection`); ``None`` otherwise. The
        components then live in the projected space (``n_params`` is the projection's
        ``n_components``); :func:`~sknpeff.pef.recover_components` applied to the
        fitted estimator brings them back to the model's parameters. :meth:`transform`,
        :meth:`loss`, :meth:`score` and :meth:`partial_fit` refuse tagged PEFs of
        another projection, or unprojected ones.

    Notes
    -----
    **Dense input.** A dense ``X`` (projected PEFs: every entry a signed nonzero) is
    computed on as dense arrays, with dense (BLAS) products, never converted to a sparse
    format that would store an index beside every value; the result is that of the same
    values given as CSR, up to float rounding. Column pruning follows the same rule
    (``min_nnz_per_column`` nonzero entries), which on projected PEFs keeps every column
    that is not zero.

    **CuPy input.** :meth:`fit_transform` and :meth:`transform` return a CuPy array on
    the input's device when ``X`` is a CuPy array or ``cupyx.scipy.sparse`` matrix, and
    NumPy otherwise, whatever backend or devices computed them (as scikit-learn's array
    API dispatch); :meth:`loss` and :meth:`score` return Python floats and
    :meth:`partial_fit` accepts CuPy batches.
    {cupy_host_attributes}

    Examples
    --------
    >>> from sknpeff.datasets import make_planted_lowrank
    >>> from sknpeff.decomposition import LowRankNPEFF
    >>> X, W_true, G_true = make_planted_lowrank(n_examples=200, n_params=500,
    ...                                          n_classes=3, n_components=4,
    ...                                          support_size=50, random_state=0)
    >>> est = LowRankNPEFF(n_components=4, n_classes=3, random_state=0)
    >>> W = est.fit_transform(X)
    >>> W.shape, est.components_.shape
    ((200, 4), (4, 500))
    """

    _renamed = {"w_solver": "solver"}

    def __init__(self, n_components: int = 32, *, n_classes: int = 1, init: str = "auto",
                 learning_rate: str | float = "auto", solver: str = "cd",
                 ortho_strength: float = 0.0, max_iter: int = 500, n_iter_g_only: int = 0,
                 tol: float = 1e-5, coef_tol: float | None = None,
                 transform_max_iter: int | None = 200,
                 random_state: Any = None, min_nnz_per_column: int = 1,
                 backend: Any = "auto", devices: Any = None, distributed: bool = False,
                 block_size: int | str | None = "auto", checkpoint_path: Any = None,
                 checkpoint_every: int = 50, verbose: int = 0,
                 w_solver: str = "deprecated") -> None:
        self.n_components = n_components
        self.n_classes = n_classes
        self.init = init
        self.learning_rate = learning_rate
        self.solver = solver
        self.ortho_strength = ortho_strength
        self.max_iter = max_iter
        self.n_iter_g_only = n_iter_g_only
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
        self.w_solver = w_solver

    # ------------------------------------------------------------- validation
    _pef_kind = "low_rank"
    _dense_input = True

    def _n_slots(self) -> int:
        return int(self.n_classes)

    def _check_params(self) -> None:
        self._check_common_params()
        check_int(self.n_classes, "n_classes", low=1)
        check_int(self.n_iter_g_only, "n_iter_g_only", low=0)
        check_choice(self.init, "init", ("auto", "data", "random"))
        check_float(self.ortho_strength, "ortho_strength", low=0.0)
        if not (isinstance(self.learning_rate, str) and self.learning_rate == "auto"):
            check_float(self.learning_rate, "learning_rate", low=0.0, strict=True)

    def _check_input(self, X: sp.csr_matrix, whom: str) -> None:
        if X.shape[1] % self.n_classes:
            raise ValueError(
                f"X has {X.shape[1]} features, which is not a multiple of n_classes="
                f"{self.n_classes}: low-rank PEF rows hold n_classes slots of n_params "
                "values each. Pass the n_classes of the PEFTransformer that made X.")

    def _loss_constant(self, A: sp.csr_matrix | np.ndarray, n_rows: int) -> float:
        if not sp.issparse(A):
            return slot_gram_sq_dense(A, n_rows)
        return slot_gram_sq(A, n_rows)

    def _prepare_kw(self, rng: np.random.RandomState) -> dict:
        """``_prepare`` arguments that sample the rows the data-seeded init draws from."""
        if self.init == "random":
            return {}
        n_pool = min(_INIT_POOL_MAX,
                     max(_INIT_POOL_MIN, _INIT_POOL_PER_COMPONENT * int(self.n_components)))
        return {"pool_rows": n_pool, "rng": rng}

    # ------------------------------------------------------- coefficients
    @staticmethod
    def _w_start(xp: Any, N: Any, QQ: Any) -> Any:
        """Starting coefficients: each component alone fitted, shared among all of them."""
        d = xp.maximum(xp.diagonal(QQ), 1e-30)
        return xp.maximum(N, 0) / (d * QQ.shape[0])

    def _coefficients(self, xp: Any, terms: dict, n_iter: int | None = None) -> Any:
        """Coefficients for fixed components from the shared start (the solver's steps
        on ``min_W sum_i (w_i QQ w_i^T - 2 N_i . w_i)``, ``QQ = Q * Q``)."""
        N, QQ = terms["N"], terms["Q"] * terms["Q"]
        return self._solve_coefficients(xp, N, QQ, self._w_start(xp, N, QQ), n_iter=n_iter)

    def _coefficient_terms(self, X: sp.csr_matrix, full_const: bool) -> tuple[Any, dict]:
        """Products of the fitted factor (read from ``components_``) with ``X``'s
        blocks: ``Q = Ft^T Ft`` and ``N``, the per-example squared projections."""
        prob = self._prepare(X, fitting=False, transpose=False, full_const=full_const)
        terms, _, _ = self._products(prob)
        return prob.blocks.backend, dict(terms, const=prob.full_const)

    def _products(self, prob: Problem) -> tuple[dict, list[Any], Any]:
        """The fitted factor split over ``prob``'s blocks and its products with them:
        ``({"N": N, "Q": Q}, parts, P = A Ft)``."""
        blocks = prob.blocks
        parts = blocks.split_factor(self._factor_from_components(prob.dtype),
                                    dtype=prob.dtype)
        P = blocks.matmul(parts)
        terms = {"N": lowrank_sq_proj(blocks.backend.xp, P, prob.n_slots),
                 "Q": blocks.gram(parts)}
        return terms, parts, P

    @staticmethod
    def _objective(xp: Any, terms: dict, W: Any) -> float:
        return lowrank_loss(xp, terms["const"], W, terms["N"], terms["Q"])

    # -------------------------------------------------------------------- fit
    def _init_state(self, prob: Problem, rng: np.random.RandomState
                    ) -> tuple[Any, list[Any]]:
        """The initial factor split into partitions, and ``W`` for ``init="random"``
        (None otherwise: fitted to the initial components in :meth:`_iterate`)."""
        self.n_classes_ = int(self.n_classes)
        Ft0 = lowrank_init_factor(prob, self.n_components, self.init, rng)
        W0 = None
        if self.init == "random":
            W0 = rng.uniform(size=(prob.n_samples, self.n_components)).astype(prob.dtype)
        # the initial factor is handed over: no second copy outlives the split
        return W0, prob.blocks.split_factor(Ft0, dtype=prob.dtype, copy=False)

    def _iterate(self, prob: Problem, W: Any, parts: list[Any], n_frozen: int
                 ) -> tuple[Any, list[float], int, float]:
        """Joint iterations (W step then G step), in place on ``parts``.

        Returns the coefficients of the final components (fitted as :meth:`transform`
        fits them), the loss curve, the number of iterations and the final loss.
        """
        be = prob.blocks.backend
        xp = be.xp
        c = prob.n_slots
        blocks = prob.blocks
        P = blocks.matmul(parts)
        Q = blocks.gram(parts)
        if W is None:
            W = self._coefficients(xp, {"N": lowrank_sq_proj(xp, P, c), "Q": Q},
                                   n_iter=_INIT_W_ITER)
        else:
            W = be.asarray(W, dtype=prob.dtype)
        r = self.n_components
        free = be.asarray((np.arange(r) >= n_frozen).astype(prob.dtype))
        ortho = float(self.ortho_strength)
        ortho_target = float(xp.mean(xp.diagonal(Q))) if ortho else 0.0
        state = {"W": W, "P": P, "Q": Q, "eta": 1.0, "prev": np.inf}
        n_g_only = int(self.n_iter_g_only)
        fingerprint = self._fingerprint(prob, n_frozen)
        start, losses0, monitored0 = 0, [], None
        resumed = self._resume(prob, fingerprint, parts)  # refills parts in place
        if resumed is not None:
            state.update(W=resumed["W"], P=blocks.matmul(parts), Q=blocks.gram(parts),
                         eta=float(resumed["eta"]), prev=float(resumed["prev"]))
            start, losses0 = resumed["n_iter"], resumed["losses"]
            monitored0 = resumed["monitored"]
        solver = self._fitted_solver()

        def step(it: int) -> tuple[float, float]:
            return lowrank_step(xp, blocks, parts, state, it, const=prob.const, n_slots=c,
                                solver=solver, n_g_only=n_g_only,
                                learning_rate=self.learning_rate, free=free, ortho=ortho,
                                ortho_target=ortho_target)

        def resync() -> None:  # Ctrl-C may land mid-sweep: recompute the products
            state["P"], state["Q"] = blocks.matmul(parts), blocks.gram(parts)
            state.pop("N", None)

        losses, n_iter = self._run_loop(
            step, self.max_iter + n_g_only, label="fit", on_interrupt=resync, start=start,
            losses=losses0, monitored=monitored0,
            checkpoint=self._saver(fingerprint, prob, parts, state, keys=("eta", "prev")),
            checkpoint_every=self.checkpoint_every, coefs=lambda: state["W"], xp=xp,
            coefs_from=n_g_only)
        # Final coefficients for the final components, solved exactly as transform does
        # (the W problem is convex): fit_transform(X) and fit(X).transform(X) agree, and
        # the loss can only fall.
        N = state.get("N")
        terms = {"N": lowrank_sq_proj(xp, state["P"], c) if N is None else N,
                 "Q": state["Q"], "const": prob.const}
        W = self._coefficients(xp, terms)
        return W, losses, n_iter, self._objective(xp, terms, W)

    def _finish_factor(self, Ft: np.ndarray, W: np.ndarray, n_frozen: int) -> np.ndarray:
        """Fold the scale of each ``g_k`` into W (in place on ``Ft``):
        ``W_ik g g^T = (W_ik |g|^2) (g/|g|)(g/|g|)^T``; frozen components are kept bit
        for bit."""
        norms = np.sqrt(np.maximum(np.einsum("ij,ij->j", Ft, Ft).astype(np.float64), 0.0))
        norms[:n_frozen] = 1.0
        safe = np.where(norms > 0, norms, 1.0)
        Ft /= safe.astype(Ft.dtype)
        return np.asarray(W * (norms ** 2).astype(W.dtype), dtype=W.dtype)

    # ------------------------------------------------------------ partial_fit
    def partial_fit(self, X: Any, y: Any = None) -> LowRankNPEFF:
        """One mini-batch step, for PEFs streamed from disk.

        The coefficients of the batch are fitted with the components frozen, then ``G``
        takes one gradient step on the batch's loss with the curvature step size.
        Streamed data keeps every parameter column (no pruning): the columns a later
        batch touches are not known in advance.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_batch, n_classes * n_params)
            A batch of low-rank PEFs.
        y : ignored

        Returns
        -------
        self : LowRankNPEFF
        """
        return self._dispatch(self._partial_fit, X)

    def _partial_fit(self, X: Any) -> LowRankNPEFF:
        first = not hasattr(self, "components_")
        if first:
            self._check_params()
        X = self._validate(X, reset=first, whom="partial_fit")
        if first:
            m = X.shape[1] // self.n_classes
            self.kept_columns_ = np.arange(m, dtype=np.int64)
            self.n_classes_ = int(self.n_classes)
            self.n_params_ = m
            rng = check_random_state(self.random_state)
            prob = self._prepare(X, fitting=False, **self._prepare_kw(rng))
            self.components_ = self._full_components(
                lowrank_init_factor(prob, self.n_components, self.init, rng))
        else:
            prob = self._prepare(X, fitting=False)
        xp = prob.blocks.backend.xp
        c = prob.n_slots
        terms, parts, P = self._products(prob)
        Q = terms["Q"]
        W = self._coefficients(xp, terms)
        loss = lowrank_loss(xp, prob.const, W, terms["N"], Q)
        # one gradient step with the curvature step size (no step-size schedule)
        stepk = 1.0 / xp.maximum(lowrank_curvature(xp, W, Q), 1e-30)
        lowrank_g_step(xp, prob.blocks, parts, W, P, Q, c, stepk)
        Ft = prob.blocks.gather_factor(parts)
        norms = np.linalg.norm(Ft.astype(np.float64), axis=0)
        self.components_ = self._full_components(
            (Ft / np.where(norms > 0, norms, 1.0)).astype(Ft.dtype))
        self._record_batch(loss)
        return self


def slot_gram_sq(A: sp.csr_matrix, n_slots: int, chunk_nnz: int = 1 << 18) -> float:
    """``sum_i ||F_i||_F^2 = sum_i sum_jk (a_ij . a_ik)^2`` without forming any F_i.

    Example ``i`` owns rows ``i * n_slots`` to ``(i + 1) * n_slots - 1`` of ``A``. Each
    example's slot Gram matrix ``A_i A_i^T`` comes from one sparse product per chunk of
    examples whose columns are made distinct per example (so no product crosses two
    examples): the work is ``sum`` over examples and parameters of the squared number
    of slots storing that parameter, and empty slots cost nothing. Chunks hold about
    ``chunk_nnz`` stored values and Gram entries, so the temporaries stay small;
    accumulated in float64.
    """
    n = A.shape[0] // n_slots if n_slots else 0
    if n == 0 or A.nnz == 0:
        return 0.0
    indptr = np.asarray(A.indptr, dtype=np.int64)
    # chunks of examples: bounded stored values, and bounded Gram entries (k * c^2)
    per_chunk = max(1, chunk_nnz // (n_slots * n_slots))
    total = 0.0
    for e0, e1 in row_chunks(indptr[::n_slots], chunk_nnz):
        for b0 in range(e0, e1, per_chunk):
            b1 = min(e1, b0 + per_chunk)
            lo, hi = indptr[b0 * n_slots], indptr[b1 * n_slots]
            if hi == lo:
                continue
            counts = np.diff(indptr[b0 * n_slots:b1 * n_slots + 1])
            example = np.repeat(np.arange((b1 - b0) * n_slots, dtype=np.int64) // n_slots,
                                counts)
            # a column per (example, parameter); renumbered to the pairs stored when
            # there are far fewer of them than examples x parameters (a sort)
            col = example * A.shape[1] + A.indices[lo:hi]
            n_cols = (b1 - b0) * A.shape[1]
            if n_cols > 4 * (hi - lo):
                _, col = np.unique(col, return_inverse=True)
                col = col.ravel()
                n_cols = int(col.max()) + 1
            B = sp.csr_matrix((np.asarray(A.data[lo:hi], dtype=np.float64), col,
                               indptr[b0 * n_slots:b1 * n_slots + 1] - lo),
                              shape=((b1 - b0) * n_slots, n_cols))
            gram = (B @ B.T).tocsr()
            total += float(np.dot(gram.data, gram.data))
    return total


def slot_gram_sq_dense(A: np.ndarray, n_slots: int, chunk: int = 1 << 22) -> float:
    """:func:`slot_gram_sq` of a dense ``A``: batched ``A_i A_i^T`` products over
    chunks of examples of about ``chunk`` entries, in float64."""
    n = A.shape[0] // n_slots if n_slots else 0
    if n == 0 or A.size == 0:
        return 0.0
    m = A.shape[1]
    step = max(1, chunk // max(1, n_slots * m))
    total = 0.0
    for e0 in range(0, n, step):
        e1 = min(n, e0 + step)
        B = np.asarray(A[e0 * n_slots:e1 * n_slots], dtype=np.float64).reshape(
            e1 - e0, n_slots, m)
        G = B @ B.transpose(0, 2, 1)
        total += float(np.sum(G * G))
    return total
