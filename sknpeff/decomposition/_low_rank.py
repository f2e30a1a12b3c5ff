"""LowRankNPEFF: LRM-NPEFF, a non-negative sum of rank-1 PSD matrices per example."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ..backends import from_device
from ._base import (
    Problem,
    _BaseNPEFF,
    _check_choice,
    _check_float,
    _check_int,
    _shared_doc,
)
from ._updates import (
    DIAG_UPDATES,
    diag_solve_w,
    lowrank_curvature,
    lowrank_g_update,
    lowrank_grad_matrix,
    lowrank_loss,
    lowrank_sq_proj,
    lowrank_weighted_rows,
)

#: rows of A sampled per component for the data-seeded initialization (k-means++-like
#: choice among them), at least and at most in all
_INIT_POOL_PER_COMPONENT = 32
_INIT_POOL_MIN = 1024
_INIT_POOL_MAX = 4096


def _slot_gram_sq(A: sp.csr_matrix, n_slots: int, chunk_nnz: int = 1 << 22) -> float:
    """``sum_i ||F_i||_F^2 = sum_i sum_jk (a_ij . a_ik)^2`` without forming any F_i.

    Processed about ``chunk_nnz`` stored values at a time, so the temporaries stay small.
    """
    total = 0.0
    n = A.shape[0] // n_slots
    chunk = max(1, int(n * chunk_nnz // max(A.nnz, 1)))
    for i0 in range(0, n, chunk):
        sub = A[i0 * n_slots:min(n, i0 + chunk) * n_slots]
        rows = [sub[j::n_slots] for j in range(n_slots)]
        for j in range(n_slots):
            for k in range(j, n_slots):
                s = np.asarray(rows[j].multiply(rows[k]).sum(axis=1), dtype=np.float64)
                total += (1.0 if j == k else 2.0) * float(np.dot(s.ravel(), s.ravel()))
    return total


@_shared_doc
class LowRankNPEFF(_BaseNPEFF):
    """Low-rank NPEFF (LRM-NPEFF): decompose exact low-rank per-example Fishers.

    Each example's Fisher ``F_i = sum_j a_ij a_ij^T`` (its ``n_classes`` vectors, one row
    of ``X``) is approximated by a non-negative combination of rank-one pseudo-Fishers,
    ``F_i ~ sum_k W_ik g_k g_k^T``, minimizing ``sum_i ||F_i - sum_k W_ik g_k g_k^T||_F^2``.
    No ``n_params x n_params`` matrix is ever formed: memory is O(nnz + (n*c + m) * r).

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
        fits W with the components fixed. ``"random"`` is the reference code's init:
        ``W ~ U(0, 1)``, ``G ~ N(0, 2 / (r m'))``.
    learning_rate : "auto" or float, default="auto"
        ``"auto"``: per-component step ``1 / L_k`` from a bound on the loss's curvature
        in ``g_k`` (see :func:`~sknpeff.decomposition._updates.lowrank_curvature`),
        scaled by a factor that grows while the loss falls and halves when it rises.
        A float is the reference's fixed rate (``G -= 4 lr grad/4``; the paper used 1e-3
        on normalized PEFs).
    w_solver : {"cd", "mu"}, default="cd"
        Update of the coefficients: one exact coordinate-descent (HALS) sweep, or the
        reference's multiplicative step. Both never increase the loss.
    ortho_strength : float, default=0.0
        Strength of the optional orthogonal regularization pushing ``G G^T`` toward
        ``s I``, ``s`` the mean initial ``|g_k|^2``.
    max_iter : int, default=500
        Maximum number of joint iterations (W step then G step).
    n_iter_g_only : int, default=0
        Iterations with W frozen before the joint phase (reference's warm-up).
    tol : float, default=1e-5
        Stop when the loss decreased by less than ``tol`` times the initial loss over
        the last 10 iterations (set 0 to always run ``max_iter``). Loss plateaus on the
        way to a good minimum are common; 1e-4 stopped on one on 1 of 10 planted seeds.
    transform_max_iter : int, default=200
        Coefficient-fitting iterations in :meth:`transform` (they are cheap).
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
    n_classes_ : int
        Class slots per example.
    n_params_ : int
        Number of parameters (``n_features_in_ / n_classes``).
    loss_curve_ : list of float
        Loss after each iteration's W step.
    n_iter_ : int
        Iterations run.
    reconstruction_err_ : float
        Frobenius norm of the residual, ``sqrt(sum_i ||F_i - sum_k W_ik g_k g_k^T||^2)``.
    n_features_in_ : int
        ``n_classes * n_params``.

    Notes
    -----
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

    def __init__(self, n_components: int = 32, *, n_classes: int = 1, init: str = "auto",
                 learning_rate: str | float = "auto", w_solver: str = "cd",
                 ortho_strength: float = 0.0, max_iter: int = 500, n_iter_g_only: int = 0,
                 tol: float = 1e-5, transform_max_iter: int = 200,
                 random_state: Any = None, min_nnz_per_column: int = 1,
                 backend: Any = "auto", devices: Any = None, distributed: bool = False,
                 block_size: int | str | None = "auto", checkpoint_path: Any = None,
                 checkpoint_every: int = 50, verbose: int = 0) -> None:
        self.n_components = n_components
        self.n_classes = n_classes
        self.init = init
        self.learning_rate = learning_rate
        self.w_solver = w_solver
        self.ortho_strength = ortho_strength
        self.max_iter = max_iter
        self.n_iter_g_only = n_iter_g_only
        self.tol = tol
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

    # ------------------------------------------------------------- validation
    def _n_slots(self) -> int:
        return int(self.n_classes)

    def _check_params(self) -> None:
        self._check_common_params()
        _check_int("n_classes", self.n_classes, 1)
        _check_int("n_iter_g_only", self.n_iter_g_only, 0)
        _check_int("transform_max_iter", self.transform_max_iter, 0)
        _check_choice("init", self.init, ("auto", "data", "random"))
        _check_choice("w_solver", self.w_solver, ("cd", "mu"))
        _check_float("ortho_strength", self.ortho_strength, 0.0)
        if not (isinstance(self.learning_rate, str) and self.learning_rate == "auto"):
            _check_float("learning_rate", self.learning_rate, 0.0, strict=True)

    def _validate_lrm(self, X: Any, reset: bool) -> sp.csr_matrix:
        X = self._validate_input(X, reset=reset)
        if X.shape[1] % self.n_classes:
            raise ValueError(
                f"X has {X.shape[1]} features, which is not a multiple of n_classes="
                f"{self.n_classes}: low-rank PEF rows hold n_classes slots of n_params "
                "values each. Pass the n_classes of the PEFTransformer that made X.")
        return X

    def _loss_constant(self, A: sp.csr_matrix) -> float:
        return _slot_gram_sq(A, self.n_classes)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------------ the W step
    def _w_step(self, xp: Any, W: Any, N: Any, QQ: Any) -> Any:
        """One coefficient step (HALS sweep or multiplicative step), in place.

        The W problem, ``min_W sum_i (w_i QQ w_i^T - 2 N_i . w_i)`` with W >= 0, is the
        same row-wise non-negative least squares as D-NPEFF's, so it shares its updates.
        """
        DIAG_UPDATES[self.w_solver](xp, W, N, QQ)
        return W

    def _fit_w(self, xp: Any, N: Any, QQ: Any, W: Any, n_iter: int) -> Any:
        """Coefficients with the components fixed: up to ``n_iter`` W steps, each row
        stopping once its relative change is at most ``tol``."""
        diag_solve_w(xp, W, N, QQ, DIAG_UPDATES[self.w_solver], n_iter, self.tol)
        return W

    @staticmethod
    def _w_start(xp: Any, N: Any, QQ: Any) -> Any:
        """Starting coefficients: each component alone fitted, shared among all of them."""
        d = xp.maximum(xp.diagonal(QQ), 1e-30)
        return xp.maximum(N, 0) / (d * QQ.shape[0])

    def _solve_w(self, xp: Any, N: Any, Q: Any) -> Any:
        """Coefficients for fixed components, as :meth:`transform` fits them (from the
        shared start, up to ``transform_max_iter`` steps)."""
        QQ = Q * Q
        return self._fit_w(xp, N, QQ, self._w_start(xp, N, QQ), self.transform_max_iter)

    def _frozen_products(self, prob: Problem) -> tuple[list[Any], Any, Any, Any]:
        """The fitted factor split over ``prob``'s blocks and its products with them:
        ``(parts, P = A Ft, Q = Ft^T Ft, N)``, ``N`` the per-example squared projections."""
        blocks = prob.blocks
        parts = blocks.split_factor(self._Ft, dtype=prob.dtype)
        P = blocks.matmul(parts)
        Q = blocks.gram(parts)
        return parts, P, Q, lowrank_sq_proj(blocks.backend.xp, P, prob.n_slots)

    # ------------------------------------------------------------------- init
    def _init_factor(self, prob: Problem, rng: np.random.RandomState) -> np.ndarray:
        """Transposed factor ``Ft`` (m', r) on the host.

        ``"data"``: each ``g_k`` is one row of ``A`` (an example's ``a_ij``) from the
        random pool in ``prob.extras``, drawn k-means++-style.
        """
        r, m = self.n_components, prob.blocks.n_cols
        dtype = prob.dtype
        if self.init == "random":
            sigma = np.sqrt(2.0 / (r * max(m, 1)))
            return (rng.standard_normal((m, r)) * sigma).astype(dtype)
        pool, norms = prob.extras.pop("pool"), prob.extras.pop("pool_norms")
        Ft = np.zeros((m, r), dtype=dtype)
        n_seeded = 0
        if pool.shape[0]:
            pool = sp.diags((1.0 / norms).astype(pool.dtype)) @ pool  # unit rows
            max_cos = np.zeros(pool.shape[0])
            chosen: list[int] = []
            for k in range(min(r, pool.shape[0])):
                weight = (1.0 - max_cos) ** 2
                weight[chosen] = 0.0
                if weight.sum() <= 1e-12:
                    break
                pick = int(rng.choice(pool.shape[0], p=weight / weight.sum()))
                chosen.append(pick)
                row = pool[pick]
                Ft[row.indices, k] = row.data
                max_cos = np.maximum(max_cos, np.abs(pool @ Ft[:, k]))
            n_seeded = len(chosen)
        if n_seeded < r:  # fewer distinct data rows than components: random directions
            extra = rng.standard_normal((m, r - n_seeded))
            Ft[:, n_seeded:] = extra / np.maximum(np.linalg.norm(extra, axis=0), 1e-30)
        return Ft

    def _pool_kw(self, rng: np.random.RandomState) -> dict:
        """``_prepare`` arguments that sample the rows the data-seeded init draws from."""
        if self.init == "random":
            return {}
        n_pool = min(_INIT_POOL_MAX,
                     max(_INIT_POOL_MIN, _INIT_POOL_PER_COMPONENT * int(self.n_components)))
        return {"pool_rows": n_pool, "rng": rng}

    # -------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any = None) -> LowRankNPEFF:
        """Learn the components from low-rank PEFs.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_classes * n_params)
            Low-rank PEFs, as :class:`~sknpeff.PEFTransformer` (``kind="low_rank"``)
            produces them.
        y : ignored

        Returns
        -------
        self : LowRankNPEFF
        """
        self.fit_transform(X)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """Learn the components and return the coefficients of ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_classes * n_params)
            Low-rank PEFs.
        y : ignored

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Non-negative coefficients (CuPy on ``X``'s device for CuPy ``X``).
        """
        return self._dispatch(self._fit_transform, X)

    def _fit_transform(self, X: Any) -> np.ndarray:
        self._check_params()
        X = self._validate_lrm(X, reset=True)
        t0 = time.perf_counter()
        rng = check_random_state(self.random_state)
        prob = self._prepare(X, fitting=True, **self._pool_kw(rng))
        self.n_classes_ = int(self.n_classes)
        prob.extras["Ft0"] = self._init_factor(prob, rng)
        W0 = None
        if self.init == "random":
            W0 = rng.uniform(size=(prob.n_samples, self.n_components)).astype(prob.dtype)
        W = self._fit_loop(prob, W0)
        if self._speaks:
            print(f"[LowRankNPEFF] fit done in {time.perf_counter() - t0:.2f} s, "
                  f"{self.n_iter_} iterations, loss {self.loss_curve_[-1]:.6e}")
        return W

    def _fit_loop(self, prob: Problem, W0: np.ndarray | None,
                  frozen: np.ndarray | None = None) -> np.ndarray:
        """Joint iterations from ``prob.extras["Ft0"]`` (host, m' x r); stores the fitted
        attributes. The initial factor is popped from ``extras`` so that no second copy
        of it outlives the split into partitions."""
        be = prob.blocks.backend
        xp = be.xp
        c = prob.n_slots
        blocks = prob.blocks
        parts = blocks.split_factor(prob.extras.pop("Ft0"), dtype=prob.dtype, copy=False)
        P = blocks.matmul(parts)
        Q = blocks.gram(parts)
        if W0 is None:
            N = lowrank_sq_proj(xp, P, c)
            QQ = Q * Q
            W = self._fit_w(xp, N, QQ, self._w_start(xp, N, QQ), 20)
        else:
            W = be.asarray(W0, dtype=prob.dtype)
        r = self.n_components
        frozen_mask = np.zeros(r, dtype=bool) if frozen is None else np.asarray(frozen, bool)
        free = be.asarray((~frozen_mask).astype(prob.dtype))
        ortho = float(self.ortho_strength)
        ortho_target = float(xp.mean(xp.diagonal(Q))) if ortho else 0.0
        auto = isinstance(self.learning_rate, str)
        state = {"W": W, "P": P, "Q": Q, "eta": 1.0, "prev": np.inf}
        n_g_only = int(self.n_iter_g_only)
        fingerprint = self._fingerprint(prob, int(frozen_mask.sum()))
        start, losses0 = 0, []
        resumed = self._load_checkpoint(fingerprint)
        if resumed is not None:
            parts = blocks.split_factor(resumed["Ft"], dtype=prob.dtype)
            state.update(W=be.asarray(resumed["W"], dtype=prob.dtype),
                         P=blocks.matmul(parts), Q=blocks.gram(parts),
                         eta=float(resumed["eta"]), prev=float(resumed["prev"]))
            start, losses0 = int(resumed["n_iter"]), [float(v) for v in resumed["losses"]]
            if self._speaks:
                print(f"[LowRankNPEFF] resuming from {self.checkpoint_path} at iteration "
                      f"{start}")

        def g_update(Fb: Any, T: Any, B: Any, stepk: Any) -> None:
            lowrank_g_update(xp, Fb, T, B, stepk)

        def step(it: int) -> float:
            W, P, Q = state["W"], state["P"], state["Q"]
            N = lowrank_sq_proj(xp, P, c)
            if it >= n_g_only:
                W = self._w_step(xp, W, N, Q * Q)
            loss = lowrank_loss(xp, prob.const, W, N, Q)
            if auto:  # grow the step while the loss falls, halve it when it rises
                state["eta"] = min(state["eta"] * 1.05, 2.0) if loss <= state["prev"] \
                    else state["eta"] * 0.5
                L = lowrank_curvature(xp, W, Q, ortho, ortho_target)
                stepk = state["eta"] * free / xp.maximum(L, 1e-30)
            else:
                stepk = float(self.learning_rate) * free
            state["prev"] = loss
            R = lowrank_weighted_rows(xp, W, P, c)
            B = lowrank_grad_matrix(xp, W, Q, ortho, ortho_target)
            # B and the steps go through consts: each device gets its own copy
            state["P"], state["Q"] = blocks.sweep(parts, R, g_update, consts=(B, stepk))
            state["W"] = W
            return loss

        def resync() -> None:  # Ctrl-C may land mid-sweep: recompute the products
            state["P"], state["Q"] = blocks.matmul(parts), blocks.gram(parts)

        def save(n_done: int, losses: list[float]) -> None:
            self._save_checkpoint(fingerprint, Ft=blocks.gather_factor(parts),
                                  W=be.to_numpy(state["W"]), eta=state["eta"],
                                  prev=state["prev"], n_iter=n_done,
                                  losses=np.asarray(losses, dtype=np.float64))

        losses, n_iter = self._run_loop(
            step, self.max_iter + n_g_only, label="fit", on_interrupt=resync, start=start,
            losses=losses0, checkpoint=save if self.checkpoint_path else None,
            checkpoint_every=self.checkpoint_every)
        # Final coefficients for the final components, solved exactly as transform does
        # (the W problem is convex): fit_transform(X) and fit(X).transform(X) agree, and
        # the loss can only fall.
        P, Q = state["P"], state["Q"]
        N = lowrank_sq_proj(xp, P, c)
        W = self._solve_w(xp, N, Q)
        final = lowrank_loss(xp, prob.const, W, N, Q)
        self._warn_if_interrupted(final)
        # the whole factor on the host (one CPU partition: it already is; otherwise a
        # gather across devices or ranks)
        Ft = parts[0] if blocks.n_global_partitions == 1 and be.xp is np \
            else blocks.gather_factor(parts)
        # the blocks (about twice the input) are not needed any more: free them before
        # the output arrays are made
        prob.blocks = blocks = parts = state = None
        # fold the scale of each g_k into W: W_ik g g^T = (W_ik |g|^2) (g/|g|)(g/|g|)^T
        norms = np.sqrt(np.maximum(np.einsum("ij,ij->j", Ft, Ft).astype(np.float64), 0.0))
        norms[frozen_mask] = 1.0  # frozen components are returned bit for bit
        safe = np.where(norms > 0, norms, 1.0)
        Ft /= safe.astype(Ft.dtype)
        W = be.to_numpy(W) * (norms ** 2).astype(prob.dtype)
        self._Ft = Ft
        self.components_ = self._full_components(Ft, self.n_params_)
        self.n_components_ = r
        self.loss_curve_ = losses + [final]
        self.n_iter_ = n_iter
        self.n_steps_ = 0
        self.reconstruction_err_ = float(np.sqrt(max(final, 0.0)))
        return np.asarray(W, dtype=prob.dtype)

    # ------------------------------------------------------------- expansion
    def _fit_with_frozen(self, X: Any, frozen_components: np.ndarray) -> np.ndarray:
        """Fit ``n_components`` components of which the first ``r0`` are given and frozen.

        Used by :class:`~sknpeff.ComponentExpander`. ``frozen_components`` (r0, n_params)
        are copied into the first rows of G and never updated; the other rows start from
        the data-seeded (or random) init; W over all components is learned.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            NumPy whatever the input (ComponentExpander, the hook's caller, works on
            NumPy).
        """
        return from_device(self._dispatch(self._fit_frozen_impl, X, frozen_components))

    def _fit_frozen_impl(self, X: Any, frozen_components: np.ndarray) -> np.ndarray:
        self._check_params()
        X = self._validate_lrm(X, reset=True)
        frozen_components = np.asarray(frozen_components)
        r0 = frozen_components.shape[0]
        if frozen_components.ndim != 2 or frozen_components.shape[1] != X.shape[1] // \
                self.n_classes:
            raise ValueError("frozen_components must have shape (r0, n_params), got "
                             f"{frozen_components.shape}.")
        if not 0 < r0 < self.n_components:
            raise ValueError(f"need 0 < r0 < n_components, got r0={r0}, "
                             f"n_components={self.n_components}.")
        rng = check_random_state(self.random_state)
        prob = self._prepare(X, fitting=True, **self._pool_kw(rng))
        self.n_classes_ = int(self.n_classes)
        # frozen components keep their parameters even where X has no nonzeros
        support = np.flatnonzero(np.any(frozen_components != 0, axis=0))
        if np.setdiff1d(support, self.kept_columns_).size:
            self.kept_columns_ = np.union1d(self.kept_columns_, support).astype(np.int64)
            prob = self._prepare(X, fitting=False, **self._pool_kw(rng))
        Ft0 = prob.extras["Ft0"] = self._init_factor(prob, rng)
        Ft0[:, :r0] = frozen_components[:, self.kept_columns_].T
        del Ft0
        W0 = None
        if self.init == "random":
            W0 = rng.uniform(size=(prob.n_samples, self.n_components)).astype(prob.dtype)
        frozen = np.arange(self.n_components) < r0
        return self._fit_loop(prob, W0, frozen=frozen)

    # -------------------------------------------------------------- transform
    def transform(self, X: Any) -> np.ndarray:
        """Coefficients of new PEFs with the components frozen.

        ``P = A G^T`` is computed once (one sparse product); the iterations touch only
        ``n x r`` arrays.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_classes * n_params)
            Low-rank PEFs.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Non-negative coefficients (CuPy on ``X``'s device for CuPy ``X``).
        """
        return self._dispatch(self._transform, X)

    def _transform(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = self._validate_lrm(X, reset=False)
        prob = self._prepare(X, fitting=False, transpose=False)
        be = prob.blocks.backend
        _, _, Q, N = self._frozen_products(prob)
        W = self._solve_w(be.xp, N, Q)
        return np.asarray(be.to_numpy(W), dtype=prob.dtype)

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
        X = self._validate_lrm(X, reset=first)
        if first:
            m = X.shape[1] // self.n_classes
            self.kept_columns_ = np.arange(m, dtype=np.int64)
            self.n_classes_ = int(self.n_classes)
            self.n_params_ = m
            rng = check_random_state(self.random_state)
            prob = self._prepare(X, fitting=False, **self._pool_kw(rng))
            self._Ft = self._init_factor(prob, rng)
            self.n_steps_ = 0
            self.loss_curve_ = []
        else:
            prob = self._prepare(X, fitting=False)
        be = prob.blocks.backend
        xp = be.xp
        c = prob.n_slots
        parts, P, Q, N = self._frozen_products(prob)
        W = self._solve_w(xp, N, Q)
        loss = lowrank_loss(xp, prob.const, W, N, Q)
        L = lowrank_curvature(xp, W, Q)
        stepk = 1.0 / xp.maximum(L, 1e-30)
        R = lowrank_weighted_rows(xp, W, P, c)
        B = lowrank_grad_matrix(xp, W, Q)
        prob.blocks.sweep(parts, R, lambda Fb, T, B, s: lowrank_g_update(xp, Fb, T, B, s),
                          consts=(B, stepk))
        Ft = prob.blocks.gather_factor(parts)
        norms = np.linalg.norm(Ft.astype(np.float64), axis=0)
        self._Ft = (Ft / np.where(norms > 0, norms, 1.0)).astype(Ft.dtype)
        self.components_ = self._full_components(self._Ft, self.n_params_)
        self.n_components_ = self.n_components
        self.n_steps_ += 1
        self.loss_curve_.append(loss)
        self.n_iter_ = self.n_steps_
        self.reconstruction_err_ = float(np.sqrt(max(loss, 0.0)))
        return self

    def score(self, X: Any, y: Any = None) -> float:
        """Negative loss of ``X`` with its fitted coefficients (higher is better).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_classes * n_params)
        y : ignored

        Returns
        -------
        score : float
        """
        return -self.loss(X)

    def loss(self, X: Any, W: np.ndarray | None = None) -> float:
        """``sum_i ||F_i - sum_k W_ik g_k g_k^T||_F^2`` for PEFs ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_classes * n_params)
        W : ndarray of shape (n_examples, n_components), optional
            Coefficients (NumPy or CuPy); fitted as :meth:`transform` fits them when
            omitted.

        Returns
        -------
        loss : float
        """
        self._check_fitted()
        return float(self._dispatch(self._loss, X, from_device(W)))

    def _loss(self, X: Any, W: np.ndarray | None) -> float:
        X = self._validate_lrm(X, reset=False)
        if W is not None:
            W = np.asarray(W)
            if W.shape != (X.shape[0], self.components_.shape[0]):
                raise ValueError(f"W must have shape (n_examples, n_components) = "
                                 f"{(X.shape[0], self.components_.shape[0])}, got {W.shape}.")
        prob = self._prepare(X, fitting=False, transpose=False)
        be = prob.blocks.backend
        xp = be.xp
        _, _, Q, N = self._frozen_products(prob)
        if W is None:  # the coefficients transform(X) gives, from the same products
            W = self._solve_w(xp, N, Q)
        else:
            W = be.asarray(W, dtype=prob.dtype)
        return lowrank_loss(xp, prob.const, W, N, Q)


__all__ = ["LowRankNPEFF"]
