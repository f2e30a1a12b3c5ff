"""Sparse-matrix helpers."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["PEFArray", "csr_from_parts", "pef_projection", "pef_tag", "tag_pef_matrix"]


def csr_from_parts(data, indices, indptr, shape, *, index_dtype=None) -> sp.csr_matrix:
    """A CSR matrix that holds ``data``, ``indices`` and ``indptr`` without copying them.

    Unlike ``scipy.sparse.csr_matrix((data, indices, indptr))`` nothing is checked,
    sorted or converted, so memory-mapped arrays stay memory-mapped.

    Parameters
    ----------
    data, indices, indptr : ndarray
        The CSR arrays (trusted: the caller guarantees they are consistent).
    shape : tuple of int
        ``(n_rows, n_cols)``.
    index_dtype : dtype, default=None
        Convert ``indices`` and ``indptr`` to this dtype first; ``"auto"`` picks int32
        unless the number of columns or of stored values passes ``2**31 - 1``, then
        int64. ``None``: keep them as they are.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix
    """
    shape = tuple(int(s) for s in shape)
    if index_dtype is not None:
        if isinstance(index_dtype, str) and index_dtype == "auto":
            nnz = int(indptr[-1]) if len(indptr) else 0
            big = max(shape[1], nnz) > np.iinfo(np.int32).max
            index_dtype = np.int64 if big else np.int32
        indices = np.asarray(indices, dtype=index_dtype)
        indptr = np.asarray(indptr, dtype=index_dtype)
    m = sp.csr_matrix(shape, dtype=data.dtype)
    m.data, m.indices, m.indptr = data, indices, indptr
    return m


#: attributes a PEF matrix carries, so that a decomposition can check its layout
PEF_KIND_ATTR = "pef_kind"
PEF_SLOTS_ATTR = "pef_n_slots"
PEF_PROJECTION_ATTR = "pef_projection"


class PEFArray(np.ndarray):
    """A dense PEF matrix (projected PEFs) that can carry the PEF tag.

    A plain :class:`numpy.ndarray` holds no attributes; :func:`tag_pef_matrix` returns
    a view of this type (no copy). Views and results of operations do not inherit
    the tag.
    """


def tag_pef_matrix(matrix, kind: str | None, n_slots: int | None,
                   projection: dict | None = None):
    """Attach the PEF kind, slot count and projection to a PEF matrix.

    A low-rank PEF row is the flattened ``(n_slots, n_params)`` matrix of an example's
    class-slot vectors; a decomposition told another slot count would misread every
    row. :class:`~sknpeff.PEFTransformer` and :func:`~sknpeff.io.load_pefs` tag what
    they return, and the decompositions check the tag (:func:`pef_tag`). Operations
    that make a new matrix (slicing, stacking) drop it; nothing is checked then.

    A sparse matrix (or a memory map) is returned as it is, tagged; a plain dense
    array comes back as a :class:`PEFArray` view of the same values. ``projection`` is
    the description of the random projection of projected PEFs (``None``: not
    projected), read back by :func:`pef_projection`.
    """
    if type(matrix) is np.ndarray:
        matrix = matrix.view(PEFArray)
    setattr(matrix, PEF_KIND_ATTR, kind)
    setattr(matrix, PEF_SLOTS_ATTR, None if n_slots is None else int(n_slots))
    setattr(matrix, PEF_PROJECTION_ATTR, projection)
    return matrix


def pef_tag(matrix) -> tuple[str | None, int | None]:
    """``(kind, n_slots)`` attached by :func:`tag_pef_matrix`, ``(None, None)`` if none."""
    return getattr(matrix, PEF_KIND_ATTR, None), getattr(matrix, PEF_SLOTS_ATTR, None)


def pef_projection(matrix) -> dict | None:
    """The projection description attached by :func:`tag_pef_matrix`, or ``None``."""
    return getattr(matrix, PEF_PROJECTION_ATTR, None)
