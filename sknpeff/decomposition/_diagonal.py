"""D-NPEFF: non-negative factorization of sparse diagonal per-example Fishers.

``DiagonalNPEFF`` factors the sparse D-PEF matrix ``X`` (examples x parameters) into
non-negative coefficients ``W`` and non-negative pseudo-Fisher diagonals ``H``
(method doc section 2). The factor is kept transposed (``Ft = H.T``, kept parameters x
components) and split into column blocks (:class:`sknpeff.backends.ColumnBlocks`), so each
iteration streams the factor once, block by block, while the block's rows are in cache.
The update rules themselves live in :mod:`sknpeff.decomposition._updates`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ..backends import cupy_device, from_device
from ._base import Problem, _BaseNPEFF, _check_choice, _shared_doc
from ._updates import DIAG_UPDATES, diag_loss, diag_solve_w

__all__ = ["DiagonalNPEFF"]

#: extra random directions of the randomized range finder used by the NNDSVD init
_OVERSAMPLE = 10
#: rows per chunk when forming NNDSVD's right singular vectors (bounded memory)
_V_CHUNK = 1 << 13
#: power iterations of the randomized range finder
_POWER_ITERS = 3
#: W-only iterations per batch of partial_fit
_PARTIAL_W_ITER = 100
#: partial_fit weights batch ``s`` of ``t`` by ``s ** _FORGET_POWER`` (see partial_fit)
_FORGET_POWER = 1.0


def _check_non_negative(X: sp.csr_matrix, whom: str) -> None:
    if X.nnz and np.min(X.data) < 0:
        raise ValueError(
            f"Negative values in data passed to {whom}: X must be non-negative "
            "(D-PEFs are per-parameter Fisher diagonals, sums of squared gradients)."
        )


@_shared_doc
class DiagonalNPEFF(_BaseNPEFF):
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
        - ``"random"``: the reference initialization, ``W`` and ``H`` uniform on
          ``[0, 2 sqrt(mean(X) / r)]`` (so ``W H`` matches ``X`` on average).
    solver : {"cd", "mu"}, default="cd"
        ``"cd"``: HALS, exact coordinate descent over one component at a time (much
        faster convergence). ``"mu"``: Lee-Seung multiplicative updates (the reference).
        Coefficient fitting with the components frozen (:meth:`transform` and the ``W``
        returned by :meth:`fit_transform`) is a convex problem and always uses HALS.
    max_iter : int, default=200
        Maximum number of iterations (one iteration = a W step then an H step). Also the
        maximum number of W steps of :meth:`transform`.
    tol : float, default=1e-4
        Fit stops when the loss decreased by less than ``tol`` times the first loss over
        the last 10 iterations. :meth:`transform` stops a row of ``W`` when its relative
        change falls to ``tol``. ``0`` runs ``max_iter`` iterations.
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
    reconstruction_err_ : float
        Frobenius norm ``||X - W H||_F`` of the training residual for the returned
        coefficients ``W = fit_transform(X)`` (pruned columns included), as
        :class:`sklearn.decomposition.NMF` reports it. For :meth:`partial_fit`, that of
        the last batch before its H step. With float32 input the loss terms are float32
        products summed in float64: expect an absolute error near ``1e-7 ||X||_F^2``.
    loss_curve_ : list of float
        ``||X - W H||_F^2`` (not halved) over the kept columns after each iteration
        (after its H step). :meth:`partial_fit` appends one value per batch.
    n_iter_ : int
        Number of iterations run (:meth:`partial_fit`: number of batches seen).
    n_steps_ : int
        Number of :meth:`partial_fit` batches seen (only after :meth:`partial_fit`).
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
        _check_choice("init", self.init, ("auto", "nndsvda", "nndsvd", "random"))
        _check_choice("solver", self.solver, ("cd", "mu"))

    def _loss_constant(self, A: sp.csr_matrix) -> float:
        return _sq_sum(A.data)

    def _validated(self, X: Any, *, reset: bool, whom: str) -> sp.csr_matrix:
        X = self._validate_input(X, reset=reset)
        _check_non_negative(X, f"{type(self).__name__}.{whom} (input X)")
        return X

    def _update(self) -> Any:
        return DIAG_UPDATES[self.solver]

    def _factor_from_components(self, dtype: Any) -> np.ndarray:
        """The kept-column factor ``Ft`` (m', r), C-ordered, in ``dtype``."""
        return np.ascontiguousarray(self.components_[:, self.kept_columns_].T, dtype=dtype)

    # -------------------------------------------------------------- initialization
    def _initialize(self, prob: Problem, rng: np.random.RandomState
                    ) -> tuple[Any, list[Any]]:
        """Initial ``W`` (n, r) on the backend and ``Ft`` split into partitions."""
        blocks = prob.blocks
        n, m = prob.n_samples, blocks.n_cols
        r = self.n_components
        dtype = np.dtype(prob.dtype)
        mean = _mean_of(prob)
        init = "nndsvda" if self.init == "auto" else self.init
        if init == "random":
            avg = np.sqrt(mean / r)
            Ft = _draw(rng.uniform, (m, r), dtype, 2.0 * avg)
            W = _draw(rng.uniform, (n, r), dtype, 2.0 * avg)
            parts = blocks.split_factor(Ft, dtype=dtype, copy=False)  # handed over
            del Ft
            return blocks.backend.asarray(W), parts
        W, parts = self._nndsvd(prob, rng)
        fill = mean if init == "nndsvda" else 0.0
        backend = blocks.backend
        if fill > 0:
            W[W == 0] = fill
            for i, p in enumerate(parts):
                with backend.device(i):  # each part is worked on where it lives
                    p[p == 0] = fill
        return W.astype(dtype, copy=False), [backend.asarray(p, dtype=dtype, partition=i)
                                             for i, p in enumerate(parts)]

    def _nndsvd(self, prob: Problem, rng: np.random.RandomState) -> tuple[Any, list[Any]]:
        """NNDSVD from a randomized truncated SVD through the blocked products."""
        blocks = prob.blocks
        backend = blocks.backend
        xp = backend.xp
        n, m = prob.n_samples, blocks.n_cols
        r = self.n_components
        dtype = np.dtype(prob.dtype)
        k = min(r, n, m)
        q = min(k + _OVERSAMPLE, n, m)
        # every random draw depends only on (n, m', r): the same for any partitioning
        omega = _draw(rng.standard_normal, (m, q), dtype)
        # components beyond the rank of X start random (drawn only when needed)
        W_rand = rng.uniform(size=(n, r - k)) if r > k else None
        F_rand = _draw(rng.uniform, (m, r - k), dtype) if r > k else None
        parts = blocks.split_factor(omega, dtype=dtype, copy=False)  # handed over
        del omega
        Q = _orthonormal(xp, blocks.matmul(parts))
        del parts
        for _ in range(_POWER_ITERS):
            Q = _orthonormal(xp, blocks.matmul(blocks.rmatmul(Q)))
        Bt = blocks.rmatmul(Q)  # X.T @ Q, per partition (m_p, q)
        Gm = _gram_f64(backend, Bt)  # Q.T X X.T Q = Ub S^2 Ub.T
        evals, evecs = np.linalg.eigh(backend.to_numpy(Gm))
        order = np.argsort(evals)[::-1][:k]
        s = np.sqrt(np.clip(evals[order], 0.0, None))
        Ub = evecs[:, order]
        inv_s = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
        U = backend.to_numpy(Q).astype(np.float64) @ Ub  # (n, k)
        Vk = (Ub * inv_s).astype(dtype)

        def v_chunks(i: int) -> Any:
            """Right singular vectors of partition i, ``Bt[i] @ Vk``, in row chunks (so
            the whole (m', k) matrix never exists beside Bt and the output)."""
            b = Bt[i]
            for c0 in range(0, b.shape[0], _V_CHUNK):
                yield c0, backend.to_numpy(b[c0:c0 + _V_CHUNK]) @ Vk

        # split each singular pair into its positive and negative parts (NNDSVD)
        up, un = np.maximum(U, 0), np.maximum(-U, 0)
        nup, nun = np.linalg.norm(up, axis=0), np.linalg.norm(un, axis=0)
        sq_p, sq_n = [], []
        for i in range(len(Bt)):  # pass 1: column norms of the positive/negative parts
            acc_p, acc_n = np.zeros(k), np.zeros(k)
            for _, v in v_chunks(i):
                acc_p += np.sum(np.maximum(v, 0) ** 2, axis=0)
                acc_n += np.sum(np.maximum(-v, 0) ** 2, axis=0)
            sq_p.append(backend.asarray(acc_p, partition=i))
            sq_n.append(backend.asarray(acc_n, partition=i))
        vsq_p = backend.to_numpy(backend.allreduce(sq_p))
        vsq_n = backend.to_numpy(backend.allreduce(sq_n))
        nvp, nvn = np.sqrt(vsq_p), np.sqrt(vsq_n)
        pos = nup * nvp >= nun * nvn
        sigma = np.where(pos, nup * nvp, nun * nvn)
        nu = np.where(pos, nup, nun)
        nv = np.where(pos, nvp, nvn)
        ok = (nu > 0) & (nv > 0) & (s > 0)
        cw = np.where(ok, np.sqrt(s * sigma) / np.where(nu > 0, nu, 1), 0.0)
        ch = np.where(ok, np.sqrt(s * sigma) / np.where(nv > 0, nv, 1), 0.0)
        W = np.empty((n, r), dtype=np.float64)
        W[:, :k] = np.where(pos, up, un) * cw
        mean_scale = np.sqrt(_mean_of(prob) / r)
        if r > k:
            W[:, k:] = mean_scale * W_rand
        out_parts = []
        sign = np.where(pos, 1.0, -1.0).astype(dtype)
        ch = ch.astype(dtype)
        for i, (s0, e0) in enumerate(blocks.partition_ranges):  # pass 2: the factor
            b = Bt[i]
            if backend.xp is np and b.flags.c_contiguous and b.dtype == dtype \
                    and b.shape[1] >= r:  # a host buffer (not a device array)
                # write the factor into X.T @ Q's own buffer: row j of F lands before row
                # j of Bt (r <= q columns), and each chunk of Bt is read before the rows
                # it overwrites are written, so no second (m', r) array is needed
                F = b.reshape(-1)[:(e0 - s0) * r].reshape(e0 - s0, r)
            else:
                F = np.empty((e0 - s0, r), dtype=dtype)
            del b
            for c0, v in v_chunks(i):
                v *= sign
                np.maximum(v, 0, out=v)
                v *= ch
                F[c0:c0 + v.shape[0], :k] = v
            Bt[i] = None  # free this partition's X.T @ Q before the next factor part
            if r > k:
                F[:, k:] = mean_scale * F_rand[s0:e0]
            out_parts.append(backend.asarray(F, partition=i))
        return backend.asarray(W.astype(dtype)), out_parts

    # ------------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> DiagonalNPEFF:
        """Learn the components from the D-PEFs ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_params)
            Non-negative D-PEFs (CSR preferred; CSC, COO and dense are accepted).
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : DiagonalNPEFF
            The fitted estimator.
        """
        self.fit_transform(X)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """Learn the components from ``X`` and return its coefficients.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_params)
            Non-negative D-PEFs.
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Non-negative coefficients of the final components, same dtype as ``X``
            (CuPy on ``X``'s device for CuPy ``X``).
            They are fitted exactly as :meth:`transform` fits them (W steps only, from
            the cached products of the last iteration: no extra pass over ``X``), so
            ``fit_transform(X)`` and ``fit(X).transform(X)`` agree.
        """
        return self._dispatch(self._fit_impl, X)

    def _fit_with_frozen(self, X: Any, frozen_components: np.ndarray) -> np.ndarray:
        """Fit ``n_components`` components of which the first ``r0`` are given and frozen.

        Used by :class:`~sknpeff.ComponentExpander`. ``frozen_components`` (r0, n_params)
        are copied into the first rows of H and never updated (bit for bit); the other
        rows start from the usual init; W over all components is learned.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
        """
        # NumPy whatever the input: ComponentExpander, the hook's caller, works on NumPy
        return from_device(self._dispatch(self._fit_impl, X, frozen_components))

    def _fit_impl(self, X: Any, frozen: np.ndarray | None = None) -> np.ndarray:
        self._check_params()
        X = self._validated(X, reset=True, whom="fit")
        r0 = 0
        if frozen is not None:
            frozen = np.asarray(frozen)
            r0 = frozen.shape[0] if frozen.ndim == 2 else 0
            if frozen.ndim != 2 or frozen.shape[1] != X.shape[1]:
                raise ValueError("frozen_components must have shape (r0, n_params="
                                 f"{X.shape[1]}), got {frozen.shape}.")
            if not 0 < r0 < self.n_components:
                raise ValueError(f"need 0 < r0 < n_components, got r0={r0}, "
                                 f"n_components={self.n_components}.")
            if not np.all(np.isfinite(frozen)) or np.any(frozen < 0):
                raise ValueError("frozen_components must be finite and non-negative.")
        total_sq = _sq_sum(X.data)
        prob = self._prepare(X, fitting=True)
        if r0:  # frozen components keep their parameters even where X has no nonzeros
            support = np.flatnonzero(np.any(frozen != 0, axis=0))
            if np.setdiff1d(support, self.kept_columns_).size:
                self.kept_columns_ = np.union1d(self.kept_columns_, support).astype(np.int64)
                prob = self._prepare(X, fitting=False)
        pruned_sq = max(0.0, total_sq - prob.const)
        backend = prob.blocks.backend
        rng = check_random_state(self.random_state)
        W, parts = self._initialize(prob, rng)
        for i, (s0, e0) in enumerate(prob.blocks.partition_ranges):
            if r0:
                block = frozen[:, self.kept_columns_[s0:e0]].T.astype(parts[i].dtype)
                with backend.device(i):
                    parts[i][:, :r0] = backend.asarray(block, partition=i)
        W, losses, n_iter, loss = self._iterate(prob, W, parts, n_frozen=r0)
        # one CPU partition already is the whole factor; otherwise gather it
        Ft = parts[0] if prob.blocks.n_global_partitions == 1 and \
            backend.xp is np else prob.blocks.gather_factor(parts)
        # free the blocked copy of X before the full-size components are allocated
        del prob, parts
        self.components_ = self._full_components(Ft, self.n_features_in_)
        self.n_components_ = self.components_.shape[0]
        self.loss_curve_ = losses
        self.n_iter_ = n_iter
        self.reconstruction_err_ = float(np.sqrt(loss + pruned_sq))
        for attr in ("n_steps_", "_stat_XtW", "_stat_WtW"):
            if hasattr(self, attr):
                delattr(self, attr)
        return np.asarray(backend.to_numpy(W))

    def _iterate(self, prob: Problem, W: Any, parts: list[Any], n_frozen: int = 0
                 ) -> tuple[Any, list[float], int, float]:
        """The joint iterations (W step, then the H sweep), in place on ``parts``.

        Returns the coefficients of the final components (fitted as :meth:`transform`
        fits them), the loss curve, the number of iterations and the final loss.
        """
        blocks = prob.blocks
        xp = blocks.backend.xp
        update = self._update()
        fingerprint = self._fingerprint(prob, int(n_frozen))
        start, losses0 = 0, []
        resumed = self._load_checkpoint(fingerprint)
        if resumed is not None:  # the caller's list of parts is refilled in place
            parts[:] = blocks.split_factor(resumed["Ft"], dtype=prob.dtype)
            W = blocks.backend.asarray(resumed["W"], dtype=prob.dtype)
            start = int(resumed["n_iter"])
            losses0 = [float(v) for v in resumed["losses"]]
            if self._speaks:
                print(f"[DiagonalNPEFF] resuming from {self.checkpoint_path} at iteration "
                      f"{start}")
        state = {"W": W, "XHt": blocks.matmul(parts), "HHt": blocks.gram(parts),
                 "fresh": True}
        k0 = int(n_frozen)

        def h_update(Fb: Any, T: Any, G: Any) -> None:
            """H step of one block; the first ``k0`` columns (frozen) never change."""
            if not k0:
                update(xp, Fb, T, G)
            elif self.solver == "cd":
                # HALS is sequential over columns: solve the free columns' own problem,
                # min 1/2 tr(F1 G11 F1^T) - tr(F1^T (T1 - F0 G01))
                update(xp, Fb[:, k0:], T[:, k0:] - Fb[:, :k0] @ G[:k0, k0:], G[k0:, k0:])
            else:
                # multiplicative steps update all columns at once: restoring the frozen
                # ones afterwards is exactly the step of the free ones
                keep = Fb[:, :k0].copy()
                update(xp, Fb, T, G)
                Fb[:, :k0] = keep

        def step(it: int) -> float:
            W = state["W"]
            state["fresh"] = False  # products may go stale until the sweep returns
            update(xp, W, state["XHt"], state["HHt"])
            WtW = W.T @ W
            # WtW goes through consts: each device gets its own copy
            XHt, HHt = blocks.sweep(parts, R=W, update=h_update, consts=(WtW,))
            state.update(XHt=XHt, HHt=HHt, fresh=True)
            return diag_loss(xp, prob.const, W, XHt, WtW, HHt)

        def save(n_done: int, losses: list[float]) -> None:
            # any (W, factor) pair is a valid state: the products are recomputed on resume
            self._save_checkpoint(fingerprint, Ft=blocks.gather_factor(parts),
                                  W=blocks.backend.to_numpy(state["W"]), n_iter=n_done,
                                  losses=np.asarray(losses, dtype=np.float64))

        losses, n_iter = self._run_loop(
            step, self.max_iter, label="fit", start=start, losses=losses0,
            checkpoint=save if self.checkpoint_path else None,
            checkpoint_every=self.checkpoint_every)
        if state["fresh"]:
            XHt, HHt = state["XHt"], state["HHt"]
        else:
            # interrupted inside an iteration: recompute the products of the factor as
            # it is, so that every fitted attribute describes one state
            XHt, HHt = blocks.matmul(parts), blocks.gram(parts)
        # the returned coefficients are those of the final components, fitted exactly
        # as transform(X) fits them (no sparse product needed: XHt and HHt are at hand)
        W = self._solve_w(xp, XHt, HHt, self.max_iter)
        final = diag_loss(xp, prob.const, W, XHt, W.T @ W, HHt)
        self._warn_if_interrupted(final)
        return W, losses, n_iter, final

    # ------------------------------------------------------------------ transform
    def _frozen_products(self, X: sp.csr_matrix, backend: Any) -> tuple[Any, Any]:
        """``X @ H.T`` and ``H @ H.T`` for the fitted components, computed once.

        On one CPU partition: one sparse product over the full parameter space
        (``components_`` is zero on pruned columns), no re-indexing or blocking of ``X``.
        Anywhere else (several partitions or ranks, GPUs) through the column blocks of
        the kept columns, as the fit: each device gets only its columns of ``X`` and
        ``H`` (an input larger than one device is split before it is moved), and every
        block stays within the int32 index range of CuPy's sparse matrices.
        """
        if backend.xp is not np or backend.n_partitions() > 1:
            prob = self._prepare(X, fitting=False, transpose=False)
            blocks = prob.blocks
            parts = blocks.split_factor(self._factor_from_components(X.dtype), dtype=X.dtype)
            return blocks.matmul(parts), blocks.gram(parts)
        if not X.has_sorted_indices:
            X = X.sorted_indices()  # a copy; the caller's matrix is left alone
        a = backend.csr(X.indptr, X.indices, X.data, X.shape)
        Ct = backend.asarray(np.ascontiguousarray(self.components_.T, dtype=X.dtype))
        XHt = backend.spmm(a, Ct)
        return XHt, Ct.T @ Ct

    def _solve_w(self, xp: Any, XHt: Any, HHt: Any, max_iter: int) -> Any:
        """Coefficients with the components frozen (W steps only).

        With the components frozen the problem is a convex non-negative least squares
        per example, so it is solved by HALS from zero whatever ``solver`` is (the same
        optimum as multiplicative steps, in far fewer steps, and exact zeros where a
        component is absent).
        """
        W = xp.zeros((XHt.shape[0], HHt.shape[0]), dtype=XHt.dtype)
        diag_solve_w(xp, W, XHt, HHt, DIAG_UPDATES["cd"], max_iter, float(self.tol))
        return W

    def transform(self, X: Any) -> np.ndarray:
        """Coefficients of new D-PEFs with the components frozen.

        ``X @ H.T`` and ``H H.T`` are computed once; only the cheap W step is iterated
        (HALS, at most ``max_iter`` times, each row until its relative change is below
        ``tol``): the non-negative least squares fit of each example to the components.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_params)
            Non-negative D-PEFs.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Non-negative coefficients, same dtype as ``X`` (CuPy on ``X``'s device for
            CuPy ``X``).
        """
        return self._dispatch(self._transform, X)

    def _transform(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = self._validated(X, reset=False, whom="transform")
        backend = self._get_backend(X)
        XHt, HHt = self._frozen_products(X, backend)
        W = self._solve_w(backend.xp, XHt, HHt, self.max_iter)
        return np.asarray(backend.to_numpy(W))

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

        For data that does not fit in memory: call repeatedly on batches (several passes
        over the data help). Each call fits the batch's coefficients with the components
        frozen (like :meth:`transform`, at most 100 W steps), adds the batch's sufficient
        statistics ``X.T @ W`` and ``W.T @ W`` to running sums, then takes one H step (the
        solver's) on the quadratic those sums define. Older batches are forgotten
        polynomially: after ``t`` batches, batch ``s`` weighs ``s / t``, so
        statistics gathered with early, poor coefficients fade while the effective window
        grows. The first call initializes the components from its batch (``init``) and
        keeps every column (no pruning); a call after :meth:`fit` continues from the
        fitted components with fresh statistics.

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
        X = self._validated(X, reset=first, whom="partial_fit")
        if first:
            self.kept_columns_ = np.arange(X.shape[1], dtype=np.int64)
            self.n_params_ = X.shape[1]
            prob = self._prepare(X, fitting=False)
            rng = check_random_state(self.random_state)
            _, parts = self._initialize(prob, rng)
            self.components_ = self._full_components(prob.blocks.gather_factor(parts),
                                                     X.shape[1])
        else:
            prob = self._prepare(X, fitting=False)
            parts = prob.blocks.split_factor(self._factor_from_components(X.dtype),
                                             dtype=X.dtype)
        blocks = prob.blocks
        backend = blocks.backend
        xp = backend.xp
        XHt, HHt = blocks.matmul(parts), blocks.gram(parts)
        W = self._solve_w(xp, XHt, HHt, _PARTIAL_W_ITER)
        WtW = W.T @ W
        batch_loss = diag_loss(xp, prob.const, W, XHt, WtW, HHt)
        t = getattr(self, "n_steps_", 0) + 1
        rho = ((t - 1) / t) ** _FORGET_POWER
        XtW = blocks.rmatmul(W)
        if t == 1 or not hasattr(self, "_stat_XtW"):
            stat_XtW, stat_WtW = XtW, WtW
        else:
            prev = blocks.split_factor(self._stat_XtW, dtype=X.dtype)
            stat_XtW = []
            for i, (a, b) in enumerate(zip(prev, XtW, strict=True)):
                with backend.device(i):
                    stat_XtW.append(rho * a + b)
            stat_WtW = rho * backend.asarray(self._stat_WtW, dtype=X.dtype) + WtW
        update = self._update()
        WtWs = blocks.replicate(stat_WtW)  # a copy on each partition's device
        for b in blocks.blocks:
            with backend.device(b.partition):
                update(xp, parts[b.partition][b.local_start:b.local_stop],
                       stat_XtW[b.partition][b.local_start:b.local_stop], WtWs[b.partition])
        self._stat_XtW = blocks.gather_factor(stat_XtW)
        self._stat_WtW = np.asarray(backend.to_numpy(stat_WtW))
        self.components_ = self._full_components(blocks.gather_factor(parts),
                                                 self.n_features_in_).astype(
            self.components_.dtype, copy=False)
        self.n_components_ = self.components_.shape[0]
        self.n_steps_ = t
        self.n_iter_ = t
        self.loss_curve_ = ([] if t == 1 else list(getattr(self, "loss_curve_", [])))
        self.loss_curve_.append(batch_loss)
        self.reconstruction_err_ = float(np.sqrt(batch_loss))
        return self


# ------------------------------------------------------------------------ helpers
def _draw(sampler: Any, shape: tuple[int, int], dtype: Any, scale: float = 1.0,
          chunk: int = 1 << 13) -> np.ndarray:
    """Random array drawn in row chunks straight into ``dtype`` (no float64 copy of the
    whole array); the values are the same as one ``sampler(size=shape)`` call."""
    out = np.empty(shape, dtype=dtype)
    for s in range(0, shape[0], chunk):
        e = min(shape[0], s + chunk)
        out[s:e] = sampler(size=(e - s, shape[1]))
    if scale != 1.0:
        out *= scale
    return out


def _sq_sum(data: np.ndarray, chunk: int = 1 << 20) -> float:
    """Sum of squares in float64, chunk by chunk (no float64 copy of the whole array)."""
    total = 0.0
    for s in range(0, data.shape[0], chunk):
        d = data[s:s + chunk].astype(np.float64)
        total += float(d @ d)
    return total


def _mean_of(prob: Problem) -> float:
    """Mean of the pruned matrix ``A`` (n x m'), from the sum ``_prepare`` records."""
    return prob.extras["sum"] / max(1, prob.n_samples * prob.blocks.n_cols)


def _orthonormal(xp: Any, Y: Any) -> Any:
    """An orthonormal basis of the columns of ``Y`` (reduced QR)."""
    Q, _ = xp.linalg.qr(Y)
    return Q


def _gram_f64(backend: Any, parts: list[Any], chunk: int = 1 << 13) -> Any:
    """``sum_p parts[p].T @ parts[p]`` accumulated in float64, chunk by chunk (small
    chunks: the float64 copies stay a few MiB)."""
    xp = backend.xp
    outs = []
    for i, p in enumerate(parts):
        with backend.device(i):  # each partial sum on its part's device
            g = xp.zeros((p.shape[1], p.shape[1]), dtype=xp.float64)
            for s in range(0, p.shape[0], chunk):
                c = p[s:s + chunk].astype(xp.float64)
                g += c.T @ c
        outs.append(g)
    return backend.allreduce(outs)
