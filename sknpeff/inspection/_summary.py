"""Top examples of each component and per-component summaries of them."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..utils import check_int
from ._validation import as_1d, as_float_1d, check_W

__all__ = ["component_mass", "component_summary", "top_examples"]


def top_examples(W, k: int = 16) -> np.ndarray:
    """Indices of each component's ``k`` examples with the largest coefficients.

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Coefficients (held-out coefficients are recommended).
    k : int, default=16
        Number of examples per component, ``1 <= k <= n_examples``.

    Returns
    -------
    indices : ndarray of shape (n_components, k), dtype int64
        Row ``j`` lists example indices by descending ``W[:, j]``; ties keep the lower
        index first.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import top_examples
    >>> W = np.array([[0.1, 0.9], [0.5, 0.0], [0.3, 0.4]])
    >>> top_examples(W, k=2)
    array([[1, 2],
           [0, 2]])
    """
    W = check_W(W)
    k = check_int(k, "k", low=1, high=W.shape[0])
    order = np.argsort(-W, axis=0, kind="stable")[:k]
    return np.ascontiguousarray(order.T, dtype=np.int64)


def _mode_and_purity(values: np.ndarray) -> tuple[Any, float]:
    uniq, counts = np.unique(values, return_counts=True)
    best = int(np.argmax(counts))
    return uniq[best], counts[best] / values.shape[0]


def component_summary(
    W, *, labels=None, predictions=None, norms=None, k: int = 16
) -> dict[str, np.ndarray]:
    """Summarise each component by its top examples.

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Coefficients.
    labels : array-like of shape (n_examples,), default=None
        True labels (any hashable, sortable values: ints or strings).
    predictions : array-like of shape (n_examples,), default=None
        The model's predicted labels.
    norms : array-like of shape (n_examples,), default=None
        Frobenius norms of the PEFs before normalization.
    k : int, default=16
        Number of top examples per component.

    Returns
    -------
    summary : dict of str to ndarray of shape (n_components,)
        Always present:

        * ``"component"`` -- component index.
        * ``"mean_coefficient"`` -- mean of the component's coefficients over all examples.
        * ``"top_mean_coefficient"`` -- mean coefficient of its top ``k`` examples.

        With ``labels``: ``"label_mode"`` (most frequent label among the top ``k``; ties go
        to the smallest label) and ``"label_purity"`` (fraction of the top ``k`` equal to
        it). With ``predictions``: ``"prediction_mode"`` and ``"prediction_purity"``
        likewise. With both: ``"top_accuracy"`` (fraction of the top ``k`` predicted
        correctly). With ``norms``: ``"top_mean_norm"`` (mean PEF norm of the top ``k``)
        and ``"norm_ratio"`` (that over the mean norm of all examples; 0 where all norms
        are 0). The dict converts directly to a ``pandas.DataFrame``.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import component_summary
    >>> W = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.8]])
    >>> s = component_summary(W, labels=[3, 3, 5, 7], k=2)
    >>> s["label_mode"], s["label_purity"]
    (array([3, 5]), array([1. , 0.5]))
    """
    W = check_W(W)
    n, r = W.shape
    k = check_int(k, "k", low=1, high=n)
    top = top_examples(W, k)
    out: dict[str, np.ndarray] = {
        "component": np.arange(r),
        "mean_coefficient": W.mean(axis=0).astype(np.float64),
        "top_mean_coefficient": np.take_along_axis(W, top.T, axis=0).mean(axis=0),
    }
    arrays = {}
    for name, values in (("label", labels), ("prediction", predictions)):
        if values is None:
            continue
        arr = as_1d(values, f"{name}s", n)
        arrays[name] = arr
        stats = [_mode_and_purity(arr[top[j]]) for j in range(r)]
        out[f"{name}_mode"] = np.asarray([m for m, _ in stats], dtype=arr.dtype)
        out[f"{name}_purity"] = np.asarray([p for _, p in stats], dtype=np.float64)
    if len(arrays) == 2:
        correct = arrays["label"] == arrays["prediction"]
        out["top_accuracy"] = correct[top].mean(axis=1).astype(np.float64)
    if norms is not None:
        nv = as_float_1d(norms, "norms", n)
        if np.any(nv < 0) or not np.all(np.isfinite(nv)):
            raise ValueError("norms must be finite and non-negative.")
        top_norm = nv[top].mean(axis=1)
        mean_all = nv.mean()
        out["top_mean_norm"] = top_norm
        out["norm_ratio"] = top_norm / mean_all if mean_all > 0 else np.zeros(r)
    return out


def component_mass(W) -> np.ndarray:
    """Each component's share of the sum of all coefficients.

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Coefficients (non-negative for a share in [0, 1]).

    Returns
    -------
    mass : ndarray of shape (n_components,)
        ``W[:, j].sum() / W.sum()``; all 0 when ``W.sum()`` is 0.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import component_mass
    >>> component_mass(np.array([[1.0, 0.0], [2.0, 1.0]]))
    array([0.75, 0.25])
    """
    W = check_W(W)
    col = W.sum(axis=0, dtype=np.float64)
    total = col.sum()
    return col / total if total != 0 else np.zeros_like(col)
