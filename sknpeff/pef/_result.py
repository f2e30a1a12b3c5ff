"""What a PEF computation returns: :class:`PEFResult`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..utils import csr_from_parts

__all__ = ["PEFResult", "concat_results"]

@dataclass
class PEFResult:
    """Output of :meth:`~sknpeff.PEFTransformer.compute`.

    Attributes
    ----------
    pefs : scipy.sparse.csr_matrix or ndarray
        The PEFs, ``(n_examples, n_params)`` (diagonal) or
        ``(n_examples, n_classes * n_params)`` (low rank); projected PEFs
        (``compression="projection"``): a dense ``(n_examples, n_classes * d)`` array
        whose slot ``j`` holds ``R a_ij``.
    norms : ndarray of shape (n_examples,)
        Frobenius norm of each PEF before normalization and sparsification.
    logits : ndarray of shape (n_examples, n_outputs)
        The model's logits.
    predictions : ndarray of shape (n_examples,)
        ``argmax`` of the logits.
    metadata : dict
        ``kind``, ``n_classes`` and ``layout`` (a :class:`~sknpeff.layout.ParameterLayout`)
        of the columns, ``projection`` (the description of the random projection
        ``R``, see :meth:`~sknpeff.pef.Projection.description`; ``None`` for top-K
        PEFs), and for stores loaded from disk the extra saved metadata.
    """

    pefs: sp.csr_matrix | np.ndarray
    norms: np.ndarray
    logits: np.ndarray | None
    predictions: np.ndarray | None
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.pefs.shape[0]


def concat_results(parts: list[PEFResult], n_cols: int, dtype, n_out: int) -> PEFResult:
    """One :class:`PEFResult` holding the rows of ``parts`` in order (no metadata).

    Dense parts (projected PEFs) give a dense result."""
    if parts and not sp.issparse(parts[0].pefs):
        return PEFResult(
            pefs=np.concatenate([np.asarray(p.pefs) for p in parts]),
            norms=np.concatenate([p.norms for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
            predictions=np.concatenate([p.predictions for p in parts]),
        )
    if not parts:
        return PEFResult(
            pefs=sp.csr_matrix((0, n_cols), dtype=dtype), norms=np.zeros(0),
            logits=np.zeros((0, n_out), dtype=dtype), predictions=np.zeros(0, np.int64),
        )
    data = np.concatenate([p.pefs.data for p in parts])
    indices = np.concatenate([p.pefs.indices.astype(np.int64, copy=False) for p in parts])
    counts = np.concatenate([np.diff(p.pefs.indptr) for p in parts])
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return PEFResult(
        pefs=csr_from_parts(data, indices, indptr, (counts.shape[0], n_cols),
                            index_dtype="auto"),
        norms=np.concatenate([p.norms for p in parts]),
        logits=np.concatenate([p.logits for p in parts]),
        predictions=np.concatenate([p.predictions for p in parts]),
    )
