"""What DiagonalNPEFF and LowRankNPEFF share: validation, column pruning, the fit loop.

Both estimators factor a sparse matrix ``A`` (rows x kept parameters) into non-negative
coefficients ``W`` (examples x components) and a factor stored transposed, ``Ft``
(kept parameters x components), so that a column block's slice of the factor is a
contiguous run of rows (see :mod:`sknpeff.backends._blocks`).
"""

from __future__ import annotations

import numbers
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from ..backends import Backend, ColumnBlocks, cupy_device, from_device, get_backend, to_device

#: nonzeros handled per chunk when re-indexing the input (bounds temporary memory)
_CHUNK_NNZ = 1 << 24


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def _check_float(name: str, value: Any, low: float, strict: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = value > low if strict else value >= low
    if not ok:
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {op} {low}, got {value!r}.")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that names the first frame outside sknpeff
    and scikit-learn's wrappers (the user's call, however deep inside the package the
    warning is raised)."""
    import sklearn

    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
              os.path.dirname(os.path.abspath(sklearn.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


# docstring paragraphs that both estimators state word for word (see _shared_doc)
_SHARED_DOCS = {
    "block_size_param": """\
block_size : int, "auto" or None, default="auto"
    Parameters per column block. ``"auto"``: the backend's choice, 4096 on CPUs and
    GPUs (a block's slice of the factor stays in cache). ``None``:
    one block per partition on any backend. Blocks are always cut where they would
    hold more than 2**31 - 1 nonzeros, so that int32 indices suffice.
""",
    "cupy_host_attributes": """\
``backend="auto"`` computes on the input's device. The input is copied to the host
once (validation, pruning and the column blocks are host work; the blocks then go to
the devices). The fitted attributes (``components_``, ``kept_columns_``, ...) stay
NumPy whatever the input, unlike scikit-learn's convention: ``components_`` is dense
``(n_components, n_params)``, gigabytes at model scale, and is better off the device
once the fit is done; the tools that consume it (:class:`~sknpeff.GuidedPerturber`,
:class:`~sknpeff.ComponentExpander`, :mod:`sknpeff.inspection`) work on NumPy.
``cupy.asarray(est.components_)`` gives a device copy.
""",
}


def _shared_doc(cls):
    """Class decorator: put each paragraph of ``_SHARED_DOCS`` where the class docstring
    has a line ``{name}`` alone, indented as that line."""

    def fill(match: re.Match) -> str:
        indent = match.group(1)
        text = _SHARED_DOCS[match.group(2)].rstrip("\n")
        return "\n".join(indent + line if line else line for line in text.split("\n"))

    cls.__doc__ = re.sub(r"^([ \t]*)\{(\w+)\}$", fill, cls.__doc__, flags=re.MULTILINE)
    return cls


@dataclass
class Problem:
    """An input prepared for the iterations: blocks, row structure and constants."""

    blocks: ColumnBlocks
    #: number of examples (rows of W)
    n_samples: int
    #: rows of A per example (class slots; 1 for diagonal)
    n_slots: int
    dtype: Any
    #: loss constant: sum over examples of the squared Frobenius norm of the PEF
    const: float
    extras: dict = field(default_factory=dict)


def row_chunks(indptr: np.ndarray, chunk_nnz: int = _CHUNK_NNZ) -> Iterator[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` holding about ``chunk_nnz`` stored values each."""
    n = len(indptr) - 1
    r0 = 0
    while r0 < n:
        r1 = int(np.searchsorted(indptr, indptr[r0] + chunk_nnz, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n)
        yield r0, r1
        r0 = r1


def reshape_and_prune(X: sp.csr_matrix, n_slots: int, kept: np.ndarray | None,
                      min_nnz: int, dtype: Any) -> tuple[sp.csr_matrix, np.ndarray]:
    """Turn ``(n, n_slots * m)`` PEF rows into ``A`` of shape ``(n * n_slots, m')``.

    Row ``i * n_slots + j`` of ``A`` is class slot ``j`` of example ``i``, restricted to
    the kept columns. When ``kept`` is None the kept columns are chosen here: those with
    at least ``min_nnz`` nonzero entries (over all rows of ``A``); all columns are kept
    when none qualifies. ``X`` is not modified. Work runs over row chunks of about
    ``_CHUNK_NNZ`` values, so temporaries stay small: ``A`` costs one int32 index per value
    beside ``X`` (its ``data`` is shared when ``X``'s rows are sorted, nothing is pruned
    and the dtype matches; otherwise one permuted copy).

    Returns
    -------
    A : csr_matrix of shape (n * n_slots, len(kept))
    kept : ndarray of int64, the kept parameter indices (sorted)
    """
    n, width = X.shape
    m = width // n_slots
    indptr = np.asarray(X.indptr, dtype=np.int64)
    nnz = int(indptr[-1])
    col_dtype = np.int64 if m > np.iinfo(np.int32).max else np.int32
    # slot-major order within each row is what the reshape needs; sorted rows have it
    ordered = X.has_sorted_indices or n_slots == 1
    # one slot: the columns are X's own indices; share them unless pruning rewrites them
    share = n_slots == 1 and X.indices.dtype == col_dtype
    col = X.indices if share else np.empty(nnz, dtype=col_dtype)
    data = None if ordered else np.empty(nnz, dtype=dtype)
    slot = None if ordered else np.empty(nnz, dtype=np.min_scalar_type(n_slots))
    counts = np.zeros(m, dtype=np.int64) if kept is None else None
    for r0, r1 in row_chunks(indptr):
        lo, hi = indptr[r0], indptr[r1]
        idx = X.indices[lo:hi]
        vals = X.data[lo:hi]
        if share:
            pass
        elif ordered:
            col[lo:hi] = idx % m
        else:  # stable sort of each row's values by class slot
            rows = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(indptr[r0:r1 + 1]))
            s_ = idx // m
            order = np.argsort(rows * n_slots + s_, kind="stable")
            col[lo:hi] = (idx % m)[order]
            data[lo:hi] = vals[order]
            slot[lo:hi] = s_[order]
        if counts is not None:
            counts += np.bincount(col[lo:hi][(data[lo:hi] if data is not None else vals) != 0],
                                  minlength=m)
    if kept is None:
        kept = np.flatnonzero(counts >= min_nnz)
        if kept.size == 0:
            kept = np.arange(m)
    kept = np.asarray(kept, dtype=np.int64)
    colmap = np.full(m, -1, dtype=col_dtype)
    colmap[kept] = np.arange(kept.size, dtype=col_dtype)
    keep_all = kept.size == m
    if share and not keep_all:
        col = col.copy()  # pruning remaps the indices: never in the caller's array
    mask = None if keep_all else np.empty(nnz, dtype=bool)
    slot_counts = np.zeros(n * n_slots, dtype=np.int64)
    # one slot, nothing pruned: A's rows are X's rows (no second pass)
    trivial = n_slots == 1 and keep_all
    if trivial:
        slot_counts = np.diff(indptr)
    for r0, r1 in ([] if trivial else row_chunks(indptr)):
        lo, hi = indptr[r0], indptr[r1]
        rows = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(indptr[r0:r1 + 1]))
        s_ = X.indices[lo:hi] // m if slot is None else slot[lo:hi]
        key = rows * n_slots + s_
        mapped = colmap[col[lo:hi]]
        if mask is not None:
            mask[lo:hi] = mapped >= 0
            key = key[mask[lo:hi]]
        slot_counts += np.bincount(key, minlength=n * n_slots)
        if not keep_all:  # all kept: the map is the identity
            col[lo:hi] = mapped
    del slot
    new_indptr = np.zeros(n * n_slots + 1, dtype=np.int64)
    np.cumsum(slot_counts, out=new_indptr[1:])
    if data is None:
        data = np.asarray(X.data, dtype=dtype)
    if mask is None:
        indices = col
    else:
        data = data[mask]
        indices = col[mask]
        del col
    if new_indptr[-1] <= np.iinfo(np.int32).max:
        new_indptr = new_indptr.astype(np.int32)
        if indices.dtype != np.int32:
            indices = indices.astype(np.int32)
    A = sp.csr_matrix((data, indices, new_indptr), shape=(n * n_slots, kept.size), copy=False)
    return A, kept


#: below this many stored values a fit runs torch's sparse kernels on one thread
SMALL_NNZ = 1 << 20


@contextmanager
def compute_context(X: Any) -> Iterator[None]:
    """Thread settings for one fit/transform call, restored on exit.

    BLAS runs on one thread: the dense products of an iteration are small per column
    block (a few thousand rows times r x r) and gain little from threads, while idle
    OpenBLAS threads spinning beside torch's OpenMP threads (the sparse kernels) slowed
    whole fits 3-10x on a loaded 2-core machine. For small inputs (fewer than
    ``SMALL_NNZ`` values) torch's kernels run on one thread too: there, thread start-up
    and spinning cost more than the work (a scikit-learn check on 40 x 10 data took 85 s
    with two threads on a loaded machine, 2.7 s with one).
    """
    if sp.issparse(X):
        nnz = X.nnz
    else:  # no NumPy dispatch: X may be any array-like (list, DataFrame, ...)
        shape = getattr(X, "shape", None)
        nnz = int(np.prod(shape)) if isinstance(shape, tuple) else SMALL_NNZ
    with threadpool_limits(limits=1, user_api="blas"):
        old = torch.get_num_threads()
        if nnz < SMALL_NNZ and old > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch.get_num_threads() != old:
                torch.set_num_threads(old)


def row_sq_norms(A: sp.csr_matrix) -> np.ndarray:
    """Squared L2 norm of every row of a CSR matrix, in float64, without copying A."""
    out = np.zeros(A.shape[0], dtype=np.float64)
    indptr = A.indptr
    for r0, r1 in row_chunks(indptr):
        lo, hi = indptr[r0], indptr[r1]
        d = np.asarray(A.data[lo:hi], dtype=np.float64)
        cs = np.concatenate([[0.0], np.cumsum(d * d)])
        out[r0:r1] = cs[indptr[r0 + 1:r1 + 1] - lo] - cs[indptr[r0:r1] - lo]
    return np.maximum(out, 0.0)


def sample_rows(A: sp.csr_matrix, n_rows: int, rng: np.random.RandomState | None
                ) -> tuple[sp.csr_matrix, np.ndarray]:
    """At most ``n_rows`` random nonzero rows of ``A`` (sorted) and their L2 norms."""
    norms = np.sqrt(row_sq_norms(A))
    rows = np.flatnonzero(norms > 0)
    if rows.size > n_rows:
        rng = rng if rng is not None else np.random.RandomState(0)
        rows = np.sort(rng.choice(rows, n_rows, replace=False))
    return A[rows], norms[rows]


class _BaseNPEFF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Parameters, validation and the iteration loop shared by both estimators.

    A subclass defines ``_loss_constant(A) -> float``, the sum over examples of the
    squared Frobenius norm of each PEF (the constant term of its loss), and, when an
    example spans several rows of ``A``, ``_n_slots()``.
    """

    #: rows of A per example; LowRankNPEFF uses n_classes
    def _n_slots(self) -> int:
        return 1

    # --------------------------------------------------------------- validation
    def _check_common_params(self) -> None:
        _check_int("n_components", self.n_components, 1)
        _check_int("max_iter", self.max_iter, 0)
        _check_float("tol", self.tol, 0.0)
        _check_int("min_nnz_per_column", self.min_nnz_per_column, 1)
        bs = self.block_size
        if not (bs is None or (isinstance(bs, str) and bs == "auto") or (
                isinstance(bs, numbers.Integral) and not isinstance(bs, bool) and bs >= 1)):
            raise ValueError(f"block_size must be an integer >= 1, 'auto' or None, got "
                             f"{bs!r}.")
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("verbose", int(self.verbose) if isinstance(self.verbose, bool)
                   else self.verbose, 0)

    def _validate_input(self, X: Any, reset: bool) -> sp.csr_matrix:
        """sklearn validation (dtype, NaN/inf, n_features_in_), then CSR."""
        X = validate_data(self, X, accept_sparse=("csr", "csc", "coo"),
                          dtype=[np.float64, np.float32], reset=reset,
                          ensure_all_finite=True, ensure_min_samples=1)
        if not sp.issparse(X):
            X = sp.csr_matrix(X)
        elif X.format != "csr":
            X = X.tocsr()
        return X

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
                 transpose: bool = True) -> Problem:
        """Reshape, prune (when fitting) and block the input.

        When fitting, sets ``kept_columns_`` and ``n_params_``; otherwise uses the
        fitted ``kept_columns_``. ``extras`` of the result hold ``"sum"`` (sum of the
        stored values), with ``pool_rows`` a random sample of at most that many nonzero
        rows of ``A`` (``"pool"``, CSR, and their norms ``"pool_norms"``) for
        data-seeded initialization. The reshaped copy is dropped as soon as its CSC
        copy exists, so the peak stays at input + CSC + blocks. With
        ``transpose=False`` (components frozen: only ``A @ Ft`` is needed) no CSC copy
        or transposed blocks are built.
        """
        n_slots = self._n_slots()
        kept = None if fitting else self.kept_columns_
        A, kept = reshape_and_prune(X, n_slots, kept, self.min_nnz_per_column, X.dtype)
        if fitting:
            self.kept_columns_ = kept
            self.n_params_ = X.shape[1] // n_slots
        extras: dict = {"sum": float(np.sum(A.data, dtype=np.float64))}
        if pool_rows:
            extras["pool"], extras["pool_norms"] = sample_rows(A, pool_rows, rng)
        const = self._loss_constant(A)
        backend = self._get_backend(X)
        self._root = bool(backend.is_root())  # only rank 0 prints and writes checkpoints
        if not transpose:
            blocks = ColumnBlocks(A, backend, block_size=self.block_size, transpose=False)
        else:
            csc = A.tocsc()
            csc.sort_indices()
            del A
            # the CSC is ours: the blocks reorder it in place rather than copy it
            blocks = ColumnBlocks(csc, backend, block_size=self.block_size, owned=True)
            del csc
        return Problem(blocks, X.shape[0], n_slots, X.dtype, const, extras)

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ---------------------------------------------------------------- fit loop
    def _run_loop(self, step: Callable[[int], float], max_iter: int, *, label: str,
                  check_every: int = 10, on_interrupt: Callable[[], None] | None = None,
                  start: int = 0, losses: list[float] | None = None,
                  checkpoint: Callable[[int, list[float]], None] | None = None,
                  checkpoint_every: int = 0) -> tuple[list[float], int]:
        """Call ``step(it) -> loss`` until converged, ``max_iter`` or Ctrl-C.

        Stops when the loss fell by less than ``tol`` times the first loss over the last
        ``check_every`` iterations (scikit-learn NMF's criterion). A ``KeyboardInterrupt``
        ends the loop with the state reached so far; ``on_interrupt`` then lets the caller
        make that state consistent, and the estimator stays usable. The caller, once it
        has the kept state's final loss, calls :meth:`_warn_if_interrupted` to say so.
        A resumed fit passes ``start`` (iterations already done) and their ``losses``;
        ``checkpoint(n_done, losses)`` is called every ``checkpoint_every`` iterations
        and after an interrupt.
        """
        self._interrupted: tuple[int, list[float], bool] | None = None
        losses = list(losses or [])
        t0 = time.perf_counter()
        self._loop_seconds = 0.0  # wall time of the iterations alone (for benchmarks)
        n_iter = start
        try:
            for it in range(start, max_iter):
                loss = float(step(it))
                self._loop_seconds = time.perf_counter() - t0
                losses.append(loss)
                n_iter = it + 1
                if checkpoint is not None and checkpoint_every and n_iter % checkpoint_every == 0:
                    checkpoint(n_iter, losses)
                if self._speaks and (it % check_every == 0 or it == max_iter - 1):
                    print(f"[{type(self).__name__}] {label} iteration {it + 1:4d}  "
                          f"loss {loss:.6e}  ({time.perf_counter() - t0:.2f} s)")
                if self.tol > 0 and it >= check_every and it % check_every == 0:
                    prev = losses[-1 - check_every]
                    scale = max(abs(losses[0]), np.finfo(np.float64).tiny)
                    if (prev - loss) / scale < self.tol:
                        if self._speaks:
                            print(f"[{type(self).__name__}] converged at iteration {it + 1}")
                        return losses, n_iter
        except KeyboardInterrupt:
            if on_interrupt is not None:
                on_interrupt()
            if checkpoint is not None:
                checkpoint(n_iter, losses)
            self._interrupted = (n_iter, list(losses), checkpoint is not None)
            return losses, n_iter
        if max_iter > 0 and self.tol > 0:
            warnings.warn(
                f"{type(self).__name__}: maximum number of iterations {max_iter} reached "
                f"({label}); increase max_iter to improve the fit.", ConvergenceWarning,
                stacklevel=3)
        return losses, n_iter

    def _warn_if_interrupted(self, final_loss: float) -> None:
        """After an interrupted loop: warn, naming the kept state's loss beside the fit's.

        ``final_loss`` is the loss of the state the estimator keeps (its components with
        their coefficients re-solved, as the fit's last step computes it). The latest
        state is kept, not a copy of the best one: tracking the best would copy the
        factor, as large as the data, at nearly every iteration (the loss falls at almost
        every one). The exact loss of the kept state, computed after the interrupt, says
        whether it is the best anyway; it usually is, since the re-solved coefficients can
        only lower the loss.
        """
        info = getattr(self, "_interrupted", None)
        self._interrupted = None
        if info is None:
            return
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
        warnings.warn(text + ".", RuntimeWarning, stacklevel=_caller_stacklevel())

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
                         n_frozen, np.dtype(prob.dtype).itemsize], dtype=np.float64)

    def _load_checkpoint(self, fingerprint: np.ndarray) -> dict | None:
        """The arrays of ``checkpoint_path`` if it exists (an error if it belongs to
        another fit), else None."""
        path = self.checkpoint_path
        if not path or not os.path.exists(path):
            return None
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        if "fingerprint" not in data or data["fingerprint"].shape != fingerprint.shape or \
                not np.allclose(data["fingerprint"], fingerprint, rtol=1e-9, atol=0):
            raise ValueError(
                f"checkpoint_path={path!r} holds a checkpoint of another fit (different "
                "data or parameters); delete it or choose another path.")
        return data

    def _save_checkpoint(self, fingerprint: np.ndarray, **arrays: Any) -> None:
        """Write the fit's state to ``checkpoint_path`` atomically (a crash never leaves
        half a checkpoint)."""
        if not getattr(self, "_root", True):  # every rank holds the same state
            return
        path = os.fspath(self.checkpoint_path)
        tmp = path + ".tmp.npz"
        np.savez(tmp, fingerprint=fingerprint, **arrays)
        os.replace(tmp, path)

    # ---------------------------------------------------------- shared helpers
    def _full_components(self, Ft: np.ndarray, n_params: int) -> np.ndarray:
        """Place a kept-column factor into the full parameter space, (r, n_params)."""
        comp = np.zeros((Ft.shape[1], n_params), dtype=Ft.dtype)
        comp[:, self.kept_columns_] = Ft.T
        return comp

    def _check_fitted(self) -> None:
        check_is_fitted(self, ("components_", "kept_columns_"))
