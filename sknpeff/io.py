"""Saving and loading PEF matrices in a memory-mappable form.

A PEF store is a directory::

    meta.json        format, version, complete, shape, nnz, kind, n_classes, layout, ...
    data.npy         CSR values (float32/float64)
    indices.npy      CSR column indices (int32, or int64 when needed)
    indptr.npy       CSR row pointers (same dtype as indices)
    norms.npy        Frobenius norms before normalization (float64)
    logits.npy       optional, (n_examples, n_outputs)
    predictions.npy  optional, (n_examples,)

Projected PEFs (``PEFTransformer(compression="projection")``) are dense: their store
holds ``pefs.npy`` ``(n_examples, n_cols)`` instead of the three CSR arrays, and
``meta.json`` carries the projection's description (seed and block structure), so the
operator is rebuilt exactly when the store is loaded (``metadata["projection"]``).

Every array is a plain ``.npy`` file, so :func:`load_pefs` opens them with
``np.load(mmap_mode="r")``: a store larger than RAM can be sliced row block by row
block (:func:`iter_row_batches`) and fed to ``partial_fit``. :class:`PEFWriter` appends
batches as they are computed (e.g. from :meth:`PEFTransformer.iter_compute`) without
holding the whole matrix in memory.

A store is marked complete only when its writer closes cleanly. One whose writing
stopped early (an exception or Ctrl-C inside the ``with PEFWriter(...)`` block, e.g. in
``PEFTransformer.compute(out=...)``) keeps the rows written so far, and
:func:`load_pefs` refuses it unless asked with ``allow_incomplete=True``. Stores of
format version 1 carry no mark and load as complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import scipy.sparse as sp

from .layout import ParameterLayout
from .pef._result import PEFResult
from .utils import csr_from_parts, pef_projection, tag_pef_matrix

__all__ = ["PEFWriter", "save_pefs", "load_pefs", "iter_row_batches"]

FORMAT = "sknpeff-pefs"
# Version 2 added the "complete" mark; version-1 stores (no mark) were complete.
# Version 3 added dense stores of projected PEFs (CSR stores are still written as 2).
VERSION = 3
_CSR_VERSION = 2
_INT32_MAX = np.iinfo(np.int32).max


class _NpyAppender:
    """A ``.npy`` file that grows along its first axis.

    The header is written with :func:`numpy.lib.format.write_array_header_1_0`, which
    leaves room for the first dimension to grow to 21 digits, and rewritten in place
    with the final shape on :meth:`close`.
    """

    def __init__(self, path: Path, dtype, tail_shape: tuple[int, ...] = ()):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tail = tuple(int(t) for t in tail_shape)
        self.n = 0
        self.header_bytes: int | None = None
        self.f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._write_header()

    def _write_header(self):
        self.f.seek(0)
        npformat.write_array_header_1_0(
            self.f,
            {
                "descr": npformat.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.n, *self.tail),
            },
        )
        if self.header_bytes is None:
            self.header_bytes = self.f.tell()
        elif self.f.tell() != self.header_bytes:  # pragma: no cover - 21 digits always fit
            raise ValueError(f"{self.path.name}: the .npy header no longer fits.")
        self.f.seek(0, os.SEEK_END)

    def append(self, arr) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.tail:
            raise ValueError(
                f"{self.path.name}: expected rows of shape {self.tail}, got {arr.shape[1:]}."
            )
        self.f.write(arr.tobytes())
        self.n += arr.shape[0]

    def close(self, n_rows: int | None = None) -> None:
        """Rewrite the header and close; ``n_rows`` drops rows appended after it."""
        if self.f.closed:
            return
        if n_rows is not None and n_rows < self.n:
            row_bytes = self.dtype.itemsize * int(np.prod(self.tail, dtype=np.int64))
            self.f.truncate(self.header_bytes + n_rows * row_bytes)
            self.n = n_rows
        self._write_header()
        self.f.close()


# Every file a store (or its writer, on the way) can hold; overwrite removes only these.
_STORE_FILES = frozenset({
    "meta.json", "meta.json.tmp", "data.npy", "indices.npy", "indptr.npy", "norms.npy",
    "logits.npy", "predictions.npy", "indices.tmp.npy", "indptr.tmp.npy", "pefs.npy",
})


def _prepare_dir(path: Path, overwrite: bool) -> None:
    """Make ``path`` an empty directory for a new store.

    An existing non-empty directory is emptied only with ``overwrite`` and only when it
    is a PEF store (its ``meta.json`` says so) holding nothing but the store's files;
    anything else is refused, so no unrelated file is ever replaced or deleted.
    """
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to write a "
                              "PEF store there.")
    entries = sorted(path.iterdir()) if path.exists() else []
    if entries:
        meta = _read_meta(path)
        if meta is None or meta.get("format") != FORMAT:
            raise FileExistsError(
                f"{path} exists, is not empty and is not a PEF store (no meta.json of "
                f"format {FORMAT!r}); refusing to {'overwrite' if overwrite else 'use'} it."
            )
        if not overwrite:
            raise FileExistsError(
                f"{path} holds a PEF store; pass overwrite=True to replace it."
            )
        foreign = [e.name for e in entries
                   if e.name not in _STORE_FILES or not e.is_file()]
        if foreign:
            raise FileExistsError(
                f"{path} holds a PEF store and other files ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); refusing to overwrite it."
            )
        for entry in entries:
            entry.unlink()
    path.mkdir(parents=True, exist_ok=True)


class PEFWriter:
    """Append PEF batches to a memory-mappable store on disk.

    Use it as a context manager (or call :meth:`close`): the store is marked complete
    only by a clean close. If the ``with`` block raises (Ctrl-C included), the rows
    appended so far are kept and the store is marked incomplete, so :func:`load_pefs`
    refuses it unless given ``allow_incomplete=True``.

    Parameters
    ----------
    path : str or path
        Directory to create.
    n_cols : int
        Width of the PEF rows (``PEFTransformer.n_features_out_``).
    kind : {"diagonal", "low_rank"}, default=None
        PEF kind, stored in the metadata.
    layout : ParameterLayout, default=None
        Parameter layout of the columns (stored as JSON).
    n_classes : int, default=None
        Number of class slots (low rank).
    dtype : str, default="float32"
        The dtype of the stored values.
    metadata : dict, default=None
        Extra JSON-serialisable metadata.
    overwrite : bool, default=False
        Replace an existing PEF store at ``path``. A directory that is not a PEF store
        (no ``meta.json`` of this format, or other files beside the store's) is never
        overwritten: :class:`FileExistsError` naming it is raised instead.
    projection : dict, default=None
        The description of the random projection of projected PEFs
        (``PEFTransformer.projection_.description()``): the store then holds dense rows.
        ``None``: sparse (top-K) rows.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from sknpeff.pef import PEFTransformer
    >>> from sknpeff.io import PEFWriter, load_pefs
    >>> model = torch.nn.Linear(4, 3).eval()
    >>> X = torch.randn(10, 4)
    >>> pef = PEFTransformer(model, n_values=5).fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "pefs")
    >>> with PEFWriter(path, n_cols=pef.n_features_out_, kind=pef.kind,
    ...                layout=pef.layout_) as w:
    ...     for batch in pef.iter_compute(X):
    ...         w.append(batch)
    >>> load_pefs(path).pefs.shape
    (10, 15)
    """

    def __init__(self, path, *, n_cols: int, kind: str | None = None,
                 layout: ParameterLayout | None = None, n_classes: int | None = None,
                 dtype="float32", metadata: Mapping | None = None, overwrite: bool = False,
                 projection: Mapping | None = None):
        self.path = Path(path)
        self.n_cols = int(n_cols)
        if self.n_cols < 0:
            raise ValueError("n_cols must be >= 0.")
        self.kind = kind
        self.layout = layout
        self.n_classes = n_classes
        self.dtype = np.dtype(dtype)
        self.metadata = dict(metadata or {})
        self.projection = None if projection is None else dict(projection)
        self.dense = projection is not None
        _prepare_dir(self.path, overwrite)
        self.index_dtype = np.int32 if self.n_cols <= _INT32_MAX else np.int64
        self._data = self._indices = self._indptr = self._dense = None
        if self.dense:
            self._dense = _NpyAppender(self.path / "pefs.npy", self.dtype, (self.n_cols,))
        else:
            self._data = _NpyAppender(self.path / "data.npy", self.dtype)
            self._indices = _NpyAppender(self.path / "indices.npy", self.index_dtype)
            self._indptr = _NpyAppender(self.path / "indptr.npy", np.int64)
            self._indptr.append(np.zeros(1, np.int64))
        self._norms = _NpyAppender(self.path / "norms.npy", np.float64)
        self._logits: _NpyAppender | None = None
        self._preds: _NpyAppender | None = None
        self.n_rows = 0
        self.nnz = 0
        self.closed = False
        # Incomplete until closed cleanly, even if the process dies before then.
        self._write_meta(complete=False, index_dtype=self.index_dtype)

    def append(self, pefs, norms=None, logits=None, predictions=None) -> None:
        """Append a batch of rows.

        The batch is checked whole before anything is written, so a refused batch leaves
        the store as it was.

        Parameters
        ----------
        pefs : PEFResult or sparse matrix
            A :class:`~sknpeff.pef.PEFResult` (its norms, logits and predictions are
            taken too) or a sparse matrix of shape ``(n_batch, n_cols)``.
        norms : array-like of shape (n_batch,), default=None
            PEF norms before normalization when ``pefs`` is a matrix (NaN when None).
        logits : array-like of shape (n_batch, n_outputs), default=None
            Model outputs when ``pefs`` is a matrix; give them for every batch or never.
        predictions : array-like of shape (n_batch,), default=None
            Predicted classes when ``pefs`` is a matrix; give them for every batch or
            never.
        """
        if self.closed:
            raise ValueError("the writer is closed.")
        if isinstance(pefs, PEFResult):
            norms, logits, predictions = pefs.norms, pefs.logits, pefs.predictions
            given = (pefs.metadata or {}).get("projection") or pef_projection(pefs.pefs)
            pefs = pefs.pefs
        else:
            given = pef_projection(pefs)
        if given is not None and not self.dense:
            raise ValueError("these PEFs are randomly projected (dense); write them to a "
                             "store opened with projection=<their projection description>.")
        if given is not None and dict(given) != self.projection:
            raise ValueError("these PEFs were projected by another random projection than "
                             "the store's (seed or block structure differ).")
        if self.dense:
            if sp.issparse(pefs):
                raise ValueError("a store of projected PEFs takes dense rows; got a sparse "
                                 "matrix.")
            X = np.asarray(pefs)
            if X.ndim != 2:
                raise ValueError(f"expected a 2-d array of rows, got shape {X.shape}.")
        else:
            X = sp.csr_matrix(pefs)
        if X.shape[1] != self.n_cols:
            raise ValueError(f"expected {self.n_cols} columns, got {X.shape[1]}.")
        n = X.shape[0]
        if not self.dense and not X.has_sorted_indices:
            X = X.sorted_indices()
        norms = np.full(n, np.nan) if norms is None else np.asarray(norms, np.float64)
        if norms.shape != (n,):
            raise ValueError(f"norms must have shape ({n},).")
        if logits is not None:
            logits = np.asarray(logits)
            tail = logits.shape[1:] if self._logits is None else self._logits.tail
            if logits.ndim < 1 or logits.shape != (n, *tail):
                raise ValueError(f"logits must have shape ({n}, ...) as in the first batch, "
                                 f"got {logits.shape}.")
        if predictions is not None:
            predictions = np.asarray(predictions, np.int64)
            if predictions.shape != (n,):
                raise ValueError(f"predictions must have shape ({n},).")
        for name, given, stored in (("logits", logits, self._logits),
                                    ("predictions", predictions, self._preds)):
            started = self.n_rows > 0 or stored is not None
            if started and (given is None) != (stored is None):
                raise ValueError(f"{name} must be given for every batch or never.")
        if logits is not None and self._logits is None:
            self._logits = _NpyAppender(self.path / "logits.npy", logits.dtype,
                                        logits.shape[1:])
        if predictions is not None and self._preds is None:
            self._preds = _NpyAppender(self.path / "predictions.npy", np.int64)
        for appender, rows in ((self._logits, logits), (self._preds, predictions)):
            if rows is not None:
                appender.append(rows)
        if self.dense:
            self._dense.append(X)
        else:
            self._data.append(X.data)
            self._indices.append(X.indices)
            self._indptr.append(X.indptr[1:].astype(np.int64) + self.nnz)
            self.nnz += X.nnz
        self._norms.append(norms)
        self.n_rows += n

    def close(self) -> None:
        """Finish the files and mark the store complete in ``meta.json``."""
        self._finish(complete=True)

    def _finish(self, complete: bool) -> None:
        if self.closed:
            return
        # Rows of a batch cut short (an interrupt inside append) are dropped, so every
        # file holds exactly the rows counted in the metadata.
        counts = ((self._data, self.nnz), (self._indices, self.nnz),
                  (self._indptr, self.n_rows + 1), (self._norms, self.n_rows),
                  (self._logits, self.n_rows), (self._preds, self.n_rows),
                  (self._dense, self.n_rows))
        for appender, n_rows in counts:
            if appender is not None:
                appender.close(n_rows)
        if self.dense:
            self._write_meta(complete=complete, index_dtype=self.index_dtype)
            self.closed = True
            return
        idx_dtype = np.int64 if (self.nnz > _INT32_MAX or self.n_cols > _INT32_MAX) \
            else np.int32
        # indptr and indices share one dtype (scipy would otherwise copy on every use)
        _convert_npy(self.path / "indptr.npy", idx_dtype)
        if idx_dtype != self.index_dtype:
            _convert_npy(self.path / "indices.npy", idx_dtype)
        self._write_meta(complete=complete, index_dtype=idx_dtype)
        self.closed = True

    def _write_meta(self, *, complete: bool, index_dtype) -> None:
        meta = {
            "format": FORMAT,
            "version": VERSION if self.dense else _CSR_VERSION,
            "complete": complete,
            "shape": [self.n_rows, self.n_cols],
            "nnz": self.nnz,
            "dtype": self.dtype.str,
            "index_dtype": np.dtype(index_dtype).str,
            "kind": self.kind,
            "n_classes": None if self.n_classes is None else int(self.n_classes),
            "layout": None if self.layout is None else self.layout.to_dict(),
            "has_logits": self._logits is not None,
            "has_predictions": self._preds is not None,
            "metadata": self.metadata,
        }
        if self.dense:
            meta["storage"] = "dense"
            meta["nnz"] = None
            meta["projection"] = self.projection
        tmp = self.path / "meta.json.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, self.path / "meta.json")

    def __enter__(self) -> PEFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Only a clean exit marks the store complete; after an exception (Ctrl-C
        # included) it keeps the rows written so far and is marked incomplete.
        self._finish(complete=exc_type is None)


def _convert_npy(path: Path, dtype, chunk: int = 1 << 24) -> None:
    src = np.load(path, mmap_mode="r")
    if src.dtype == np.dtype(dtype):
        return
    tmp = path.with_suffix(".tmp.npy")
    out = _NpyAppender(tmp, dtype, src.shape[1:])
    for s in range(0, src.shape[0], chunk):
        out.append(np.asarray(src[s : s + chunk]).astype(dtype))
    out.close()
    del src
    os.replace(tmp, path)


def save_pefs(path, pefs, norms=None, *, logits=None, predictions=None,
              kind: str | None = None, n_classes: int | None = None,
              layout: ParameterLayout | None = None, metadata: Mapping | None = None,
              overwrite: bool = False, projection: Mapping | None = None) -> None:
    """Save PEFs (a :class:`~sknpeff.pef.PEFResult` or a sparse matrix) to ``path``.

    Parameters
    ----------
    path : str or path
        Directory to create.
    pefs : PEFResult or sparse matrix of shape (n_examples, n_cols)
        The PEFs; a :class:`~sknpeff.pef.PEFResult` brings its norms, logits,
        predictions and metadata.
    norms : array-like of shape (n_examples,), default=None
        PEF norms before normalization (for a matrix; NaN when None).
    logits : array-like of shape (n_examples, n_outputs), default=None
        Model outputs (for a matrix).
    predictions : array-like of shape (n_examples,), default=None
        Predicted classes (for a matrix).
    kind : {"diagonal", "low_rank"}, default=None
        PEF kind; taken from ``pefs.metadata`` when None.
    n_classes : int, default=None
        Number of class slots (low rank); taken from ``pefs.metadata`` when None.
    layout : ParameterLayout, default=None
        Parameter layout of the columns; taken from ``pefs.metadata`` when None.
    metadata : dict, default=None
        Extra JSON-serialisable metadata.
    overwrite : bool, default=False
        Replace an existing PEF store at ``path`` (never a directory that is not one, see
        :class:`PEFWriter`).
    projection : dict, default=None
        Description of the random projection of projected (dense) PEFs; taken from
        ``pefs.metadata`` or the matrix's tag when None.

    Examples
    --------
    >>> import os, tempfile
    >>> import scipy.sparse as sp
    >>> from sknpeff.io import load_pefs, save_pefs
    >>> path = os.path.join(tempfile.mkdtemp(), "pefs")
    >>> save_pefs(path, sp.random(5, 8, density=0.5, format="csr", random_state=0))
    >>> load_pefs(path).pefs.shape
    (5, 8)
    """
    if isinstance(pefs, PEFResult):
        md = pefs.metadata or {}
        kind = md.get("kind", kind) if kind is None else kind
        n_classes = md.get("n_classes", n_classes) if n_classes is None else n_classes
        layout = md.get("layout", layout) if layout is None else layout
        projection = md.get("projection") if projection is None else projection
        mat = pefs.pefs
    else:
        mat = pefs
    if projection is None:
        projection = pef_projection(mat)
    with PEFWriter(path, n_cols=mat.shape[1], kind=kind, layout=layout, n_classes=n_classes,
                   dtype=mat.dtype, metadata=metadata, overwrite=overwrite,
                   projection=projection) as w:
        if isinstance(pefs, PEFResult):
            w.append(pefs)
        else:
            w.append(mat, norms=norms, logits=logits, predictions=predictions)


def load_pefs(path, *, mmap: bool = True, allow_incomplete: bool = False) -> PEFResult:
    """Load a store written by :class:`PEFWriter` / :func:`save_pefs`.

    Parameters
    ----------
    path : str or path
        Directory of the store.
    mmap : bool, default=True
        Memory-map the arrays (read-only) instead of reading them into memory.
    allow_incomplete : bool, default=False
        Also load a store whose writing stopped early (an exception or an interrupt
        inside the ``with PEFWriter(...)`` block, e.g. in
        ``PEFTransformer.compute(out=...)``): it holds the rows written until then, for
        instance to resume from. Such a store is refused otherwise.

    Returns
    -------
    result : PEFResult
        ``pefs`` (CSR whose arrays are memory maps when ``mmap``; a dense array for
        projected PEFs), ``norms``, ``logits``
        and ``predictions`` (``None`` when not stored) and ``metadata`` with ``kind``,
        ``n_classes``, ``layout`` (a :class:`~sknpeff.layout.ParameterLayout` or
        ``None``), the user ``metadata``, ``path``, ``complete`` (False for an
        incomplete store) and ``projection`` (the description of the random projection
        of projected PEFs, else ``None``).

    Raises
    ------
    FileNotFoundError
        ``path`` holds no ``meta.json``.
    ValueError
        ``path`` is not a PEF store, was written by a newer version, or is incomplete
        and ``allow_incomplete`` is False.
    """
    path = Path(path)
    meta = _read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a PEF store (no meta.json).")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a PEF store (format {meta.get('format')!r}).")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: store version {meta['version']} is newer than supported.")
    shape = tuple(meta["shape"])
    # Version-1 stores carry no mark: they were written only by a clean close.
    complete = meta.get("complete", meta.get("version", 0) < 2) is True
    if not complete and not allow_incomplete:
        raise ValueError(
            f"{path} is an incomplete PEF store: its writer stopped before a clean close "
            f"(an exception or an interrupt), after {shape[0]} rows. Pass "
            "allow_incomplete=True to load those rows (e.g. to resume), or write it again."
        )
    mode = "r" if mmap else None

    def load(name):
        return np.load(path / name, mmap_mode=mode, allow_pickle=False)

    mismatch = ValueError(
        f"{path}: array sizes do not match meta.json"
        + ("" if complete else " (its writer was killed before it could stop cleanly)")
        + "."
    )
    if meta.get("storage") == "dense":
        pefs = load("pefs.npy")
        if pefs.shape != shape:
            raise mismatch
    else:
        data, indices, indptr = load("data.npy"), load("indices.npy"), load("indptr.npy")
        if indptr.shape != (shape[0] + 1,) or data.shape != (meta["nnz"],) or \
                indices.shape != (meta["nnz"],):
            raise mismatch
        pefs = csr_from_parts(data, indices, indptr, shape)
    layout = ParameterLayout.from_dict(meta["layout"]) if meta.get("layout") else None
    return PEFResult(
        pefs=tag_pef_matrix(pefs, meta.get("kind"), meta.get("n_classes"),
                            meta.get("projection")),
        norms=load("norms.npy"),
        logits=load("logits.npy") if meta.get("has_logits") else None,
        predictions=load("predictions.npy") if meta.get("has_predictions") else None,
        metadata={"kind": meta.get("kind"), "n_classes": meta.get("n_classes"),
                  "layout": layout, "metadata": meta.get("metadata", {}), "path": str(path),
                  "complete": complete, "projection": meta.get("projection")},
    )


def _read_meta(path: Path) -> dict | None:
    """The parsed ``meta.json`` of ``path``; None when there is none."""
    try:
        with open(path / "meta.json") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None


def iter_row_batches(pefs: Any, batch_size: int) -> Iterator[sp.csr_matrix]:
    """Yield consecutive row blocks of a (memory-mapped) CSR matrix as in-memory CSR.

    Parameters
    ----------
    pefs : PEFResult, sparse matrix, or path of a store
        The rows to read; a path is opened with :func:`load_pefs` (memory-mapped).
    batch_size : int
        Rows per block, at least 1.

    Yields
    ------
    block : scipy.sparse.csr_matrix of at most ``batch_size`` rows
        Only that block is read from disk, so ``partial_fit`` can stream a store larger
        than RAM. Projected PEFs (dense, tagged) give dense blocks.
    """
    if isinstance(pefs, (str, os.PathLike)):
        pefs = load_pefs(pefs)
    if isinstance(pefs, PEFResult):
        pefs = pefs.pefs
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1.")
    if not sp.issparse(pefs) and pef_projection(pefs) is not None:
        for s in range(0, pefs.shape[0], batch_size):
            yield np.array(pefs[s : s + batch_size])
        return
    X = pefs if sp.issparse(pefs) and pefs.format == "csr" else sp.csr_matrix(pefs)
    indptr = np.asarray(X.indptr)
    for s in range(0, X.shape[0], batch_size):
        e = min(X.shape[0], s + batch_size)
        a, b = int(indptr[s]), int(indptr[e])
        sub_ptr = (indptr[s : e + 1] - a).astype(X.indices.dtype)
        yield csr_from_parts(np.array(X.data[a:b]), np.array(X.indices[a:b]), sub_ptr,
                           (e - s, X.shape[1]))
