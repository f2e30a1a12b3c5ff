"""What DiagonalNPEFF and LowRankNPEFF share: validation, the fit template, the iteration
loop, checkpoints, frozen components, coefficients, ``loss`` and ``score``.

Both estimators factor a sparse matrix ``A`` (rows x kept parameters) into non-negative
coefficients ``W`` (examples x components) and a factor stored transposed, ``Ft``
(kept parameters x components), so that a column block's slice of the factor is a
contiguous run of rows (see :class:`sknpeff.backends.ColumnBlocks`). As in
scikit-learn's NMF, the public classes are thin: :class:`BaseNPEFF` runs one fit
template, and each estimator supplies its loss constant, initialization and iteration
(the update rules themselves are free functions of :mod:`._updates`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state, metadata_routing
from sklearn.utils.validation import check_is_fitted, validate_data

from ..backends import Backend, ColumnBlocks, cupy_device, from_device, get_backend, to_device
from ..utils import (
    InvalidParameterError,
    check_choice,
    check_float,
    check_int,
    pef_projection,
    pef_tag,
    user_stacklevel,
)
from ._checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ._data import reshape_and_prune, sample_rows
from ._projected import projection_mismatch
from ._stopping import COEF_CHECKS, mean_column_cosine
from ._threads import compute_context
from ._updates import DIAG_UPDATES, diag_solve_w

__all__ = ["BaseNPEFF", "Problem"]

#: the release in which deprecated parameter names stop working
_REMOVED_IN = "0.3"

@dataclass
class Problem:
    """An input prepared for the iterations: blocks, row structure and constants."""

    blocks: ColumnBlocks
    #: number of examples (rows of W)
    n_samples: int
    #: rows of A per example (non-empty class slots, padded; 1 for diagonal)
    n_slots: int
    dtype: Any
    #: loss constant over the kept columns: sum over examples of the squared Frobenius
    #: norm of the PEF restricted to them
    const: float
    extras: dict = field(default_factory=dict)
    #: the same constant over all columns (pruned ones included); None unless asked for
    full_const: float | None = None


class BaseNPEFF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Base class of the NPEFF decompositions (not for direct use).

    Holds what :class:`~sknpeff.decomposition.DiagonalNPEFF` and
    :class:`~sknpeff.decomposition.LowRankNPEFF` share: parameter and input
    validation, the fit template (prepare, initialize, iterate, store), the iteration
    loop with its stopping rule, checkpoints, fitting with frozen components,
    coefficient fitting (:meth:`transform`) and the objective (:meth:`loss`,
    :meth:`score`).

    A subclass supplies ``_loss_constant(A, n_rows)`` (the constant term of its loss,
    ``n_rows`` rows of ``A`` per example),
    ``_init_state``, ``_iterate`` and ``_coefficient_terms``, and, when an example
    spans several rows of ``A``, ``_n_slots()``.
    """

    # frozen_components is an argument of the fit, not data routed by meta-estimators
    # (no set_fit_request method): scikit-learn's way to declare it
    __metadata_request__fit = {"frozen_components": metadata_routing.UNUSED}

    #: renamed parameters, old name -> new name: the old name still works until
    #: ``_REMOVED_IN`` with a ``FutureWarning`` (its default is the string "deprecated")
    _renamed: dict[str, str] = {}

    #: the kind of PEFs the estimator decomposes (PEFTransformer's ``kind``)
    _pef_kind = "diagonal"

    #: dense input is computed on as dense arrays (else converted to CSR)
    _dense_input = False

    #: rows of A per example; LowRankNPEFF uses n_classes
    def _n_slots(self) -> int:
        return 1

    # --------------------------------------------------------------- validation
    def _resolve_renamed(self) -> None:
        """Move each deprecated parameter's value to its new name, as scikit-learn does.

        The value in use is stored as ``_<new name>`` (the parameters themselves are
        never modified; ``_solver`` always exists after this). Passing both names is an
        error.
        """
        import inspect

        defaults = inspect.signature(type(self).__init__).parameters
        self._solver = self.solver
        for old, new in self._renamed.items():
            value = getattr(self, new)
            old_value = getattr(self, old)
            if not (isinstance(old_value, str) and old_value == "deprecated"):
                if value != defaults[new].default:
                    raise InvalidParameterError(
                        f"{type(self).__name__}: got both {old}={old_value!r} and "
                        f"{new}={value!r}; pass only {new} ({old} is deprecated).")
                warnings.warn(
                    f"{type(self).__name__}: parameter {old!r} was renamed to {new!r} in "
                    f"version 0.1 and will be removed in {_REMOVED_IN}; use "
                    f"{new}={old_value!r} instead.", FutureWarning,
                    stacklevel=user_stacklevel())
                value = old_value
            setattr(self, "_" + new, value)

    def _check_common_params(self) -> None:
        self._resolve_renamed()
        check_int(self.n_components, "n_components", low=1)
        check_int(self.max_iter, "max_iter", low=0)
        check_int(self.transform_max_iter, "transform_max_iter", low=0, allow_none=True)
        check_float(self.tol, "tol", low=0.0)
        check_float(self.coef_tol, "coef_tol", low=0.0, high=1.0, allow_none=True)
        check_choice(self._solver, "solver", ("cd", "mu"))
        check_int(self.min_nnz_per_column, "min_nnz_per_column", low=1)
        bs = self.block_size
        if not (bs is None or (isinstance(bs, str) and bs == "auto")):
            try:
                check_int(bs, "block_size", low=1)
            except InvalidParameterError:
                raise InvalidParameterError(f"block_size must be an integer >= 1, 'auto' "
                                            f"or None; got {bs!r}.") from None
        check_int(self.checkpoint_every, "checkpoint_every", low=1)
        check_int(int(self.verbose) if isinstance(self.verbose, bool) else self.verbose,
                  "verbose", low=0)

    def _transform_iters(self) -> int:
        """Coefficient steps of :meth:`transform`: ``transform_max_iter``, or
        ``max_iter`` when it is None."""
        return self.max_iter if self.transform_max_iter is None else self.transform_max_iter

    def _fitted_solver(self) -> str:
        """The solver the fit used (the deprecated name resolved)."""
        return getattr(self, "_solver", self.solver)

    def _validate(self, X: Any, *, reset: bool, whom: str) -> sp.csr_matrix:
        """scikit-learn's validation (dtype, NaN/inf, ``n_features_in_``), then CSR,
        then the estimator's own checks of the values (``_check_input``)."""
        self._check_pef_tag(X)
        if self._pef_kind == "low_rank":  # only low-rank PEFs are ever projected
            self._check_projection(X, reset=reset)
        X = validate_data(self, X, accept_sparse=("csr", "csc", "coo"),
                          dtype=[np.float64, np.float32], reset=reset,
                          ensure_all_finite=True, ensure_min_samples=1)
        if not sp.issparse(X):
            # dense input stays dense where the estimator computes on it (dense BLAS)
            X = np.ascontiguousarray(X) if self._dense_input else sp.csr_matrix(X)
        elif X.format != "csr":
            X = X.tocsr()
        self._check_input(X, f"{type(self).__name__}.{whom}")
        return X

    def _check_pef_tag(self, X: Any) -> None:
        """Refuse PEFs whose kind or class-slot count (as PEFTransformer and load_pefs
        tag them) is not what this estimator was told."""
        kind, slots = pef_tag(X)
        name = type(self).__name__
        if kind is not None and kind != self._pef_kind:
            other = "LowRankNPEFF" if kind == "low_rank" else "DiagonalNPEFF"
            raise ValueError(
                f"X holds {kind} PEFs (PEFTransformer(kind={kind!r})), but {name} "
                f"decomposes {self._pef_kind} ones: use {other}, or "
                f"PEFTransformer(kind={self._pef_kind!r}).")
        if kind == "low_rank" and slots is not None and slots != self._n_slots():
            raise ValueError(
                f"{name}(n_classes={self._n_slots()}) but the PEFs have {slots} class slots "
                f"per example (the PEFTransformer's n_classes_): pass n_classes={slots}; "
                "another value would split every row into the wrong class vectors.")

    def _check_projection(self, X: Any, *, reset: bool) -> None:
        """Record (``reset``) or check the random projection of projected PEFs.

        A fit on a matrix tagged with a projection (``PEFTransformer(compression=
        "projection")``, :func:`~sknpeff.utils.pef_projection`) sets ``projection_`` to
        that :class:`~sknpeff.pef.Projection` (``None`` otherwise). Later calls refuse
        a tagged input of another projection, and projected PEFs beside unprojected
        ones: their columns mean different things. An untagged matrix (a slice or a
        stack drops the tag) is not checked.
        """
        desc = pef_projection(X)
        if reset:
            if desc is None:
                self.projection_ = None
            else:
                from ..pef import Projection  # the estimators import without the PEF code

                self.projection_ = Projection.from_description(desc)
            return
        reason = projection_mismatch(X, getattr(self, "projection_", None),
                                     type(self).__name__)
        if reason is not None:
            raise ValueError(reason)

    def _check_input(self, X: sp.csr_matrix, whom: str) -> None:
        """Checks of the input's values beyond scikit-learn's (none by default)."""

    def _check_frozen(self, frozen: Any, X: sp.csr_matrix) -> np.ndarray | None:
        """Validate ``frozen_components`` against the data and ``n_components``."""
        if frozen is None:
            return None
        frozen = np.asarray(frozen)
        n_params = X.shape[1] // self._n_slots()
        if frozen.ndim != 2 or frozen.shape[1] != n_params:
            raise ValueError(f"frozen_components must have shape (r0, n_params={n_params}), "
                             f"got {frozen.shape}.")
        r0 = frozen.shape[0]
        if not 0 < r0 < self.n_components:
            raise ValueError(f"frozen_components: need 0 < r0 < n_components, got r0={r0}, "
                             f"n_components={self.n_components}.")
        if not np.all(np.isfinite(frozen)):
            raise ValueError("frozen_components must be finite.")
        return frozen

    def _get_backend(self, X: Any = None) -> Backend:
        # inside _dispatch X is the host copy: "auto" must see the caller's CuPy input
        source = getattr(self, "_source_input", None)
        return get_backend(self.backend, X=X if source is None else source,
                           devices=self.devices,
                           distributed=getattr(self, "distributed", False))

    def _dispatch(self, method: Callable[..., Any], X: Any, *args: Any) -> Any:
        """``method(X, *args)`` on host input, its array result in ``X``'s namespace.

        As scikit-learn's array API dispatch: a CuPy ``X`` (dense or sparse) gives a
        CuPy result on ``X``'s device, anything else NumPy, whatever backend computed
        it. CuPy input is copied to the host once (validation, pruning and the column
        blocks are host work; the blocks then go to the devices) and ``backend="auto"``
        picks CuPy for it. Scalars and ``self`` are returned as they are.
        """
        device = cupy_device(X)
        if device is None:
            with compute_context(X):
                return method(X, *args)
        self._source_input = X
        try:
            X_host = from_device(X)
            with compute_context(X_host):
                out = method(X_host, *args)
        finally:
            del self._source_input
        return to_device(out, device)

    def _prepare(self, X: sp.csr_matrix, *, fitting: bool,
                 pool_rows: int = 0, rng: np.random.RandomState | None = None,
                 transpose: bool = True, full_const: bool = False) -> Problem:
        """Reshape, prune (when fitting) and block the input.

        When fitting, sets ``kept_columns_`` and ``n_params_``; otherwise uses the
        fitted ``kept_columns_``. ``extras`` of the result hold ``"sum"`` (sum of the
        stored values), with ``pool_rows`` a random sample of at most that many nonzero
        rows of ``A`` (``"pool"``, CSR, and their norms ``"pool_norms"``) for
        data-seeded initialization. The reshaped copy is dropped as soon as its CSC
        copy exists, so the peak stays at input + CSC + blocks. With
        ``transpose=False`` (components frozen: only ``A @ Ft`` is needed) no CSC copy
        or transposed blocks are built. ``full_const`` also computes the loss constant
        over all columns (it differs only when pruned columns hold stored values).
        """
        n_slots = self._n_slots()
        kept = None if fitting else self.kept_columns_
        A, kept = reshape_and_prune(X, n_slots, kept, self.min_nnz_per_column, X.dtype)
        if fitting:
            self.kept_columns_ = kept
            self.n_params_ = X.shape[1] // n_slots
        # empty class slots are dropped: an example spans the rows its fullest one needs
        n_rows = A.shape[0] // max(X.shape[0], 1)
        dense = not sp.issparse(A)
        extras: dict = {"sum": float(np.sum(A if dense else A.data, dtype=np.float64))}
        if pool_rows:
            extras["pool"], extras["pool_norms"] = sample_rows(A, pool_rows, rng)
        const = self._loss_constant(A, n_rows)
        full = None
        if full_const:
            full = const
            pruned = kept.size < X.shape[1] // n_slots if dense else A.nnz != X.nnz
            if pruned:  # pruned columns hold stored values
                A_all = reshape_and_prune(X, n_slots, np.arange(X.shape[1] // n_slots), 1,
                                          X.dtype)[0]
                full = self._loss_constant(A_all, A_all.shape[0] // max(X.shape[0], 1))
        backend = self._get_backend(X)
        self._root = bool(backend.is_root())  # only rank 0 prints and writes checkpoints
        if not transpose or dense:  # dense blocks are column copies of A
            blocks = ColumnBlocks(A, backend, block_size=self.block_size,
                                  transpose=transpose)
            del A
        else:
            csc = A.tocsc()
            csc.sort_indices()
            del A
            # the CSC is ours: the blocks reorder it in place rather than copy it
            blocks = ColumnBlocks(csc, backend, block_size=self.block_size, owned=True)
            del csc
        return Problem(blocks, X.shape[0], n_rows, X.dtype, const, extras, full)

    def _prepare_kw(self, rng: np.random.RandomState) -> dict:
        """Extra ``_prepare`` arguments of a fit (LowRankNPEFF samples rows there)."""
        return {}

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ------------------------------------------------------------- fit template
    def fit(self, X: Any, y: Any = None, *, frozen_components: Any = None) -> BaseNPEFF:
        """Learn the components from PEFs ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
            PEFs in the estimator's layout: D-PEFs (``n_params`` columns, non-negative)
            for :class:`DiagonalNPEFF`, low-rank PEFs (``n_classes * n_params``
            columns) for :class:`LowRankNPEFF`. CSR preferred; CSC, COO and dense are
            accepted.
        y : Ignored
            Not used, present for API consistency by convention.
        frozen_components : array-like of shape (r0, n_params), default=None
            Components to keep fixed (see :meth:`fit_transform`).

        Returns
        -------
        self : object
            The fitted estimator.
        """
        self.fit_transform(X, frozen_components=frozen_components)
        return self

    def fit_transform(self, X: Any, y: Any = None, *, frozen_components: Any = None) -> Any:
        """Learn the components from ``X`` and return its coefficients.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
            PEFs in the estimator's layout (see :meth:`fit`).
        y : Ignored
            Not used, present for API consistency by convention.
        frozen_components : array-like of shape (r0, n_params), default=None
            Fit with these components frozen (component-set expansion, Matena & Raffel,
            arXiv 2310.04649, section 3.5; :class:`~sknpeff.ComponentExpander` uses
            this). With ``0 < r0 < n_components``, they become the first ``r0`` rows
            of ``components_``, equal to the given rows cast to ``X``'s dtype and never
            updated; only the other ``n_components - r0`` rows are learned (from the
            usual initialization), with the coefficients over all components. Their
            parameters are kept even where ``X`` has fewer than
            ``min_nnz_per_column`` nonzeros, so that nothing of them is pruned. They
            must be finite (and non-negative for :class:`DiagonalNPEFF`); a fit with
            frozen components resumes only from a checkpoint of the same kind of fit.
            ``None``: every component is learned.

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Non-negative coefficients of the final components, same dtype as ``X``
            (a CuPy array on ``X``'s device for CuPy ``X``). They are fitted exactly as
            :meth:`transform` fits them, from the products of the last iteration, so
            ``fit_transform(X)`` and ``fit(X).transform(X)`` agree.

        Raises
        ------
        KeyboardInterrupt
            On Ctrl-C during the iterations, after the state reached so far is stored
            as the fitted state (and saved to ``checkpoint_path`` when set), which a
            ``RuntimeWarning`` reports with its loss: the estimator is usable, and a
            script that fits in a loop stops.
        """
        return self._dispatch(self._fit_transform, X, frozen_components)

    def _fit_transform(self, X: Any, frozen: Any = None) -> np.ndarray:
        self._check_params()
        X = self._validate(X, reset=True, whom="fit")
        frozen = self._check_frozen(frozen, X)
        t0 = time.perf_counter()
        rng = check_random_state(self.random_state)
        prob = self._prepare(X, fitting=True, full_const=True, **self._prepare_kw(rng))
        r0 = 0 if frozen is None else frozen.shape[0]
        if r0:  # frozen components keep their parameters even where X has no nonzeros
            support = np.flatnonzero(np.any(frozen != 0, axis=0))
            if np.setdiff1d(support, self.kept_columns_).size:
                self.kept_columns_ = np.union1d(self.kept_columns_, support).astype(np.int64)
                prob = self._prepare(X, fitting=False, full_const=True,
                                     **self._prepare_kw(rng))
        if r0:  # the initialization seeds the new components away from the frozen ones
            prob.extras["frozen"] = frozen[:, self.kept_columns_]
        W, parts = self._init_state(prob, rng)
        if r0:
            backend = prob.blocks.backend
            for i, (s0, e0) in enumerate(prob.blocks.partition_ranges):
                block = frozen[:, self.kept_columns_[s0:e0]].T.astype(parts[i].dtype)
                with backend.device(i):
                    parts[i][:, :r0] = backend.asarray(block, partition=i)
        W, losses, n_iter, final = self._iterate(prob, W, parts, r0)
        interrupted = self._warn_if_interrupted(final)
        backend = prob.blocks.backend
        # the whole factor on the host (one CPU partition: it already is)
        Ft = prob.blocks.whole_factor(parts)
        gap = max(0.0, prob.full_const - prob.const)  # what pruned columns hold
        # the blocks (about twice the input) are not needed any more: free them before
        # the output arrays are made
        prob.blocks = parts = None
        W = self._finish_factor(Ft, np.asarray(backend.to_numpy(W)), r0)
        self.components_ = self._full_components(Ft)
        self.n_components_ = self.components_.shape[0]
        self.loss_curve_ = losses
        self.n_iter_ = n_iter
        self.reconstruction_err_ = float(np.sqrt(max(final, 0.0) + gap))
        self.stop_reason_ = self._stop_reason
        for attr in ("n_steps_", "_stat_XtW", "_stat_WtW"):  # partial_fit's state
            if hasattr(self, attr):
                delattr(self, attr)
        if interrupted:
            # the fitted state is kept (and was announced); Ctrl-C still stops the caller
            raise KeyboardInterrupt
        if self._speaks:
            print(f"[{type(self).__name__}] fit done in {time.perf_counter() - t0:.2f} s, "
                  f"{n_iter} iterations, loss {final:.6e}")
        return W

    def _finish_factor(self, Ft: np.ndarray, W: np.ndarray, n_frozen: int) -> np.ndarray:
        """Last touch on the fitted host factor (in place) and coefficients; returns W."""
        return W

    def _record_batch(self, batch_loss: float) -> None:
        """Bookkeeping of one :meth:`partial_fit` batch (its loss before the update)."""
        t = getattr(self, "n_steps_", 0) + 1
        self.n_steps_ = t
        self.n_iter_ = t
        self.n_components_ = self.components_.shape[0]
        self.loss_curve_ = [] if t == 1 else list(getattr(self, "loss_curve_", []))
        self.loss_curve_.append(float(batch_loss))
        self.reconstruction_err_ = float(np.sqrt(max(batch_loss, 0.0)))

    # ---------------------------------------------------------------- fit loop
    def _run_loop(self, step: Callable[[int], float | tuple[float, float]], max_iter: int,
                  *, label: str, check_every: int = 10,
                  on_interrupt: Callable[[], None] | None = None, start: int = 0,
                  losses: list[float] | None = None, monitored: list[float] | None = None,
                  checkpoint: Callable[..., None] | None = None,
                  checkpoint_every: int = 0, coefs: Callable[[], Any] | None = None,
                  xp: Any = None, coefs_from: int = 0,
                  ratio_rule: bool = False) -> tuple[list[float], int]:
        """Call ``step(it)`` until converged, ``max_iter`` or Ctrl-C.

        ``step(it)`` returns the objective at the end of the iteration (an entry of
        ``loss_curve_``), or a pair ``(objective, monitored)`` when the stopping rule
        watches another value of the iteration (LowRankNPEFF: the loss after its W
        step, which also drives its step size). The loop stops when the monitored value
        fell by less than ``tol`` times its first value over the last ``check_every``
        iterations (scikit-learn NMF's criterion for ``solver="mu"``); with
        ``ratio_rule``, when it fell to ``tol`` times its first value (that for
        ``solver="cd"``, on the projected gradient), checked at every iteration. A
        ``KeyboardInterrupt`` ends the loop
        with the state reached so far; ``on_interrupt`` then lets the caller make that
        state consistent; the fit stores it and raises the interrupt again. The caller,
        once it has the kept state's final loss, calls :meth:`_warn_if_interrupted` to
        say so. A resumed
        fit passes ``start`` (iterations already done), their ``losses`` and
        ``monitored`` values; ``checkpoint(n_done, losses, monitored)`` is called every
        ``checkpoint_every`` iterations and after an interrupt. With ``coef_tol`` set,
        ``coefs()`` returns the current coefficients (in namespace ``xp``): the loop
        also stops when they are stable (see ``coef_tol``), checked from iteration
        ``coefs_from`` on (LowRankNPEFF's warm-up leaves W unchanged). Why the loop
        stopped is left in ``_stop_reason``.

        Returns the objective after each iteration (``loss_curve_``) and the number of
        iterations done.
        """
        self._interrupted: tuple[int, list[float], bool] | None = None
        losses = list(losses or [])
        monitored = list(losses if monitored is None else monitored)
        t0 = time.perf_counter()
        self._loop_seconds = 0.0  # wall time of the iterations alone (for benchmarks)
        n_iter = start
        self._stop_reason = "max_iter"
        coef_tol = getattr(self, "coef_tol", None)
        watch_coefs = coef_tol is not None and coefs is not None
        prev_W, streak = None, 0  # coefficients at the previous check; passes in a row
        try:
            for it in range(start, max_iter):
                out = step(it)
                loss, watched = (out, out) if np.ndim(out) == 0 else out
                loss, watched = float(loss), float(watched)
                self._loop_seconds = time.perf_counter() - t0
                losses.append(loss)
                monitored.append(watched)
                n_iter = it + 1
                if checkpoint is not None and checkpoint_every and n_iter % checkpoint_every == 0:
                    checkpoint(n_iter, losses, monitored)
                if self._speaks and (it % check_every == 0 or it == max_iter - 1):
                    print(f"[{type(self).__name__}] {label} iteration {it + 1:4d}  "
                          f"loss {loss:.6e}  ({time.perf_counter() - t0:.2f} s)")
                if ratio_rule:
                    converged = self.tol > 0 and watched <= self.tol * monitored[0]
                elif self.tol > 0 and it >= check_every and it % check_every == 0:
                    prev = monitored[-1 - check_every]
                    scale = max(abs(monitored[0]), np.finfo(np.float64).tiny)
                    converged = (prev - watched) / scale < self.tol
                else:
                    converged = False
                if converged:
                    if self._speaks:
                        print(f"[{type(self).__name__}] converged at iteration {it + 1}")
                    self._stop_reason = "tol"
                    return losses, n_iter
                if watch_coefs and it % check_every == 0 and it >= coefs_from:
                    W = coefs()
                    if prev_W is not None:
                        moved = 1.0 - mean_column_cosine(xp, W, prev_W)
                        streak = streak + 1 if moved <= coef_tol else 0
                        if streak >= COEF_CHECKS:
                            if self._speaks:
                                print(f"[{type(self).__name__}] coefficients stable at "
                                      f"iteration {it + 1}")
                            self._stop_reason = "coef_tol"
                            return losses, n_iter
                    prev_W = W.copy()
        except KeyboardInterrupt:
            if on_interrupt is not None:
                on_interrupt()
            if checkpoint is not None:
                checkpoint(n_iter, losses, monitored)
            self._interrupted = (n_iter, list(losses), checkpoint is not None)
            self._stop_reason = "interrupted"
            return losses, n_iter
        if max_iter > 0 and self.tol > 0:
            warnings.warn(
                f"{type(self).__name__}: maximum number of iterations {max_iter} reached "
                f"({label}); increase max_iter to improve the fit.", ConvergenceWarning,
                stacklevel=user_stacklevel())
        return losses, n_iter

    def _warn_if_interrupted(self, final_loss: float) -> bool:
        """After an interrupted loop: warn, naming the kept state's loss beside the fit's.

        ``final_loss`` is the loss of the state the estimator keeps (its components with
        their coefficients re-solved, as the fit's last step computes it). The latest
        state is kept, not a copy of the best one: tracking the best would copy the
        factor, as large as the data, at nearly every iteration (the loss falls at almost
        every one). The exact loss of the kept state, computed after the interrupt, says
        whether it is the best anyway; it usually is, since the re-solved coefficients can
        only lower the loss. Returns whether the loop was interrupted (the fit then
        raises ``KeyboardInterrupt`` again once the state is stored).
        """
        info = getattr(self, "_interrupted", None)
        self._interrupted = None
        if info is None:
            return False
        n_iter, losses, saved = info
        text = (f"{type(self).__name__}: interrupted after {n_iter} iterations; the state "
                f"fitted so far is kept" + (" and saved to the checkpoint" if saved else "")
                + f" (loss {final_loss:.6e}, coefficients re-solved")
        if losses:
            k = int(np.argmin(losses))
            if final_loss <= losses[k]:
                text += (f"; no higher than any loss of the fit, lowest {losses[k]:.6e} at "
                         f"iteration {k + 1}: the best state so far)")
            else:
                text += (f"; above the lowest loss of the fit, {losses[k]:.6e} at iteration "
                         f"{k + 1}, whose state is not kept)")
        else:
            text += ")"
        warnings.warn(text + ".", RuntimeWarning, stacklevel=user_stacklevel())
        return True

    @property
    def _speaks(self) -> bool:
        """Print progress: ``verbose`` is set and this is rank 0 (or no distributed job)."""
        return bool(self.verbose) and getattr(self, "_root", True)

    # ------------------------------------------------------------ checkpoints
    def _fingerprint(self, prob: Problem, n_frozen: int = 0) -> np.ndarray:
        """Numbers that identify the data and parameters a checkpoint belongs to."""
        kept = self.kept_columns_.astype(np.float64)
        weights = np.arange(1, kept.size + 1, dtype=np.float64)
        return np.array([prob.n_samples, self.n_features_in_, self.n_components,
                         prob.n_slots, kept.size, float(kept @ weights),
                         prob.blocks.nnz, prob.const, prob.extras.get("sum", 0.0),
                         n_frozen, np.dtype(prob.dtype).itemsize, CHECKPOINT_FORMAT],
                        dtype=np.float64)

    def _load_checkpoint(self, fingerprint: np.ndarray) -> dict | None:
        """The arrays of ``checkpoint_path`` if it exists (an error if it belongs to
        another fit), else None."""
        return load_checkpoint(self.checkpoint_path, fingerprint)

    def _save_checkpoint(self, fingerprint: np.ndarray, **arrays: Any) -> None:
        """Write the fit's state to ``checkpoint_path`` (rank 0 only: every rank holds
        the same state)."""
        if getattr(self, "_root", True):
            save_checkpoint(self.checkpoint_path, fingerprint, arrays)

    def _resume(self, prob: Problem, fingerprint: np.ndarray, parts: list[Any]
                ) -> dict | None:
        """Resume from ``checkpoint_path`` when it holds this fit's state.

        The factor parts are refilled in place from the checkpoint; the returned dict
        holds ``W`` (on the backend), ``n_iter``, ``losses`` and ``monitored`` (lists,
        see :meth:`_run_loop`) and the other saved values. None when there is nothing
        to resume from.
        """
        data = self._load_checkpoint(fingerprint)
        if data is None:
            return None
        blocks = prob.blocks
        parts[:] = blocks.split_factor(data.pop("Ft"), dtype=prob.dtype)
        data["W"] = blocks.backend.asarray(data["W"], dtype=prob.dtype)
        data["n_iter"] = int(data["n_iter"])
        data["losses"] = [float(v) for v in data["losses"]]
        data["monitored"] = [float(v) for v in data.get("monitored", data["losses"])]
        if self._speaks:
            print(f"[{type(self).__name__}] resuming from {self.checkpoint_path} at "
                  f"iteration {data['n_iter']}")
        return data

    def _saver(self, fingerprint: np.ndarray, prob: Problem, parts: list[Any], state: dict,
               keys: tuple[str, ...] = ()) -> Callable[[int, list[float]], None] | None:
        """``save(n_done, losses, monitored)`` writing the factor, ``state["W"]``, the
        loop's two series and ``state[key]`` for ``keys``; None without
        ``checkpoint_path``."""
        if not self.checkpoint_path:
            return None
        blocks = prob.blocks

        def save(n_done: int, losses: list[float], monitored: list[float]) -> None:
            # any (W, factor) pair is a valid state: the products are recomputed on resume
            self._save_checkpoint(fingerprint, Ft=blocks.gather_factor(parts),
                                  W=blocks.backend.to_numpy(state["W"]), n_iter=n_done,
                                  losses=np.asarray(losses, dtype=np.float64),
                                  monitored=np.asarray(monitored, dtype=np.float64),
                                  **{k: state[k] for k in keys})

        return save

    # ------------------------------------------------------------- components
    def _full_components(self, Ft: np.ndarray) -> np.ndarray:
        """Place a kept-column factor into the full parameter space, (r, n_params)."""
        comp = np.zeros((Ft.shape[1], self.n_params_), dtype=Ft.dtype)
        comp[:, self.kept_columns_] = Ft.T
        return comp

    def _factor_from_components(self, dtype: Any) -> np.ndarray:
        """The kept-column factor ``Ft`` (m', r) read from ``components_``, C-ordered,
        in ``dtype``: ``components_`` is the only copy of the fitted components."""
        return np.ascontiguousarray(self.components_[:, self.kept_columns_].T, dtype=dtype)

    def _check_fitted(self) -> None:
        check_is_fitted(self, ("components_", "kept_columns_"))

    # -------------------------------------------------------------- transform
    def _solve_coefficients(self, xp: Any, T: Any, G: Any, W: Any, update: Any = None,
                            n_iter: int | None = None) -> Any:
        """Coefficients for fixed components, in place on the start ``W``: up to
        ``n_iter`` (default: :meth:`_transform_iters`) steps of ``update`` (default:
        the solver's) on ``min_W 1/2 tr(W G W^T) - tr(W^T T)``, ``W >= 0``, each row
        stopping once its relative change is at most ``tol``."""
        update = DIAG_UPDATES[self._fitted_solver()] if update is None else update
        n_iter = self._transform_iters() if n_iter is None else n_iter
        diag_solve_w(xp, W, T, G, update, n_iter, self.tol)
        return W

    def transform(self, X: Any) -> Any:
        """Coefficients of new PEFs with the components frozen.

        The products of ``X`` with ``components_`` are computed once (one sparse
        product); only the cheap coefficient steps are iterated, at most
        ``transform_max_iter`` times (``max_iter`` when it is None), each example until
        the relative change of its coefficients is at most ``tol``: the non-negative
        least squares fit of each example to the components. ``components_`` is read
        at every call (nothing of it is cached).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
            PEFs in the estimator's layout (see :meth:`fit`).

        Returns
        -------
        W : ndarray of shape (n_examples, n_components)
            Non-negative coefficients, same dtype as ``X`` (a CuPy array on ``X``'s
            device for CuPy ``X``).
        """
        return self._dispatch(self._transform, X)

    def _transform(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = self._validate(X, reset=False, whom="transform")
        backend, terms = self._coefficient_terms(X, full_const=False)
        W = self._coefficients(backend.xp, terms)
        return np.asarray(backend.to_numpy(W), dtype=X.dtype)

    def loss(self, X: Any, W: Any = None) -> float:
        """The objective for PEFs ``X`` and coefficients ``W``, over all parameters.

        :class:`DiagonalNPEFF`: ``||X - W H||_F^2`` with ``H = components_``.
        :class:`LowRankNPEFF`: ``sum_i ||F_i - sum_k W_ik g_k g_k^T||_F^2`` with
        ``F_i`` the Fisher of example ``i`` (its ``n_classes`` vectors) and ``g_k`` the
        rows of ``components_``. Squared Frobenius norms, not halved, summed over the
        examples, pruned parameters included (the components are zero there), in
        float64; ``reconstruction_err_`` is its square root for the training data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
            PEFs in the estimator's layout (see :meth:`fit`).
        W : array-like of shape (n_examples, n_components), default=None
            Coefficients (NumPy or CuPy); fitted as :meth:`transform` fits them when
            omitted.

        Returns
        -------
        loss : float
            The objective (lower is better).
        """
        self._check_fitted()
        return float(self._dispatch(self._loss, X, from_device(W)))

    def _loss(self, X: Any, W: Any) -> float:
        X = self._validate(X, reset=False, whom="loss")
        if W is not None:
            W = np.asarray(W)
            if W.shape != (X.shape[0], self.components_.shape[0]):
                raise ValueError(f"W must have shape (n_examples, n_components) = "
                                 f"{(X.shape[0], self.components_.shape[0])}, got {W.shape}.")
        backend, terms = self._coefficient_terms(X, full_const=True)
        xp = backend.xp
        if W is None:  # the coefficients transform(X) gives, from the same products
            W = self._coefficients(xp, terms)
        else:
            W = backend.asarray(W, dtype=X.dtype)
        return self._objective(xp, terms, W)

    def score(self, X: Any, y: Any = None) -> float:
        """Negative :meth:`loss` of ``X`` with its fitted coefficients (higher is
        better, scikit-learn's convention for scores).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_examples, n_features)
            PEFs, as :meth:`loss` takes them.
        y : None
            Ignored (scikit-learn's signature for scores).

        Returns
        -------
        score : float
            ``-loss(X)``.
        """
        return -self.loss(X)
