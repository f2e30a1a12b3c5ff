"""Reading NPEFF components: top examples, summaries, run similarity, plots and a report.

Everything here works on a coefficient matrix ``W`` of shape ``(n_examples,
n_components)`` (held-out coefficients from ``transform`` are best), so any method that
produces such a matrix (NPEFF, clustering baselines) can be inspected the same way.

* :func:`top_examples` -- each component's examples, by descending coefficient.
* :func:`component_summary` -- label/prediction purity, PEF norms and coefficients of the
  top examples, one entry per component.
* :func:`component_similarity` -- how closely two runs' components match (paper section
  3.3: average max cosine of coefficient columns, both directions).
* :func:`top_parameters_by_layer` -- which parameter tensors hold a component's mass.
* :func:`plot_coefficients`, :func:`plot_top_examples` -- matplotlib figures (optional
  dependency, imported only when called).
* :func:`report` -- one self-contained HTML file with everything above per component.
"""

from __future__ import annotations

import base64
import html
import numbers
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.utils import check_array

__all__ = [
    "component_similarity",
    "component_summary",
    "plot_coefficients",
    "plot_top_examples",
    "report",
    "top_examples",
    "top_parameters_by_layer",
]


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_W(W, name: str = "W") -> np.ndarray:
    if W is None:
        raise ValueError(f"{name} must be an array of shape (n_examples, n_components).")
    if hasattr(W, "detach"):  # torch tensor
        W = W.detach().cpu().numpy()
    W = check_array(W, dtype=[np.float64, np.float32], input_name=name)
    return W


def _check_k(k, n_examples: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not 1 <= k <= n_examples:
        raise ValueError(f"k must be in [1, n_examples={n_examples}], got {k}.")
    return int(k)


def _check_component(component, n_components: int) -> int:
    if isinstance(component, bool) or not isinstance(component, numbers.Integral):
        raise ValueError(f"component must be an integer, got {component!r}.")
    if not 0 <= component < n_components:
        raise ValueError(f"component must be in [0, {n_components}), got {component}.")
    return int(component)


def _as_1d(values, name: str, n: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of length {n}, got shape {arr.shape}.")
    return arr


def _as_float_1d(values, name: str, n: int) -> np.ndarray:
    arr = _as_1d(values, name, n)
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers.") from None


# ---------------------------------------------------------------------------------------------
# Top examples, summaries, similarity
# ---------------------------------------------------------------------------------------------


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
    W = _check_W(W)
    k = _check_k(k, W.shape[0])
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
    W = _check_W(W)
    n, r = W.shape
    k = _check_k(k, n)
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
        arr = _as_1d(values, f"{name}s", n)
        arrays[name] = arr
        stats = [_mode_and_purity(arr[top[j]]) for j in range(r)]
        out[f"{name}_mode"] = np.asarray([m for m, _ in stats], dtype=arr.dtype)
        out[f"{name}_purity"] = np.asarray([p for _, p in stats], dtype=np.float64)
    if len(arrays) == 2:
        correct = arrays["label"] == arrays["prediction"]
        out["top_accuracy"] = correct[top].mean(axis=1).astype(np.float64)
    if norms is not None:
        nv = _as_float_1d(norms, "norms", n)
        if np.any(nv < 0) or not np.all(np.isfinite(nv)):
            raise ValueError("norms must be finite and non-negative.")
        top_norm = nv[top].mean(axis=1)
        mean_all = nv.mean()
        out["top_mean_norm"] = top_norm
        out["norm_ratio"] = top_norm / mean_all if mean_all > 0 else np.zeros(r)
    return out


def _unit_columns(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(W, axis=0)
    zero = norms == 0
    return W / np.where(zero, 1.0, norms), zero


def component_similarity(W_a, W_b, *, return_directed: bool = False):
    """Similarity of two sets of components through their coefficients (paper section 3.3).

    With ``C[i, j]`` the cosine between column ``i`` of ``W_a`` and column ``j`` of
    ``W_b`` (coefficient vectors over the same examples)::

        a_to_b = mean_i max_j C[i, j]      # how well each component of A is found in B
        b_to_a = mean_j max_i C[i, j]      # how well each component of B is found in A
        similarity = (a_to_b + b_to_a) / 2

    A column of zeros has cosine 0 with any nonzero column and 1 with another zero column,
    so no NaN arises and a run compared with itself always scores 1 (up to rounding). The
    result is symmetric in its arguments and invariant to permuting either run's components.

    Parameters
    ----------
    W_a : array-like of shape (n_examples, n_components_a)
        Coefficients of run A.
    W_b : array-like of shape (n_examples, n_components_b)
        Coefficients of run B, on the same examples in the same order.
    return_directed : bool, default=False
        Also return the two directed values.

    Returns
    -------
    similarity : float
        Symmetric mean of the two directed values, in [-1, 1] ([0, 1] for non-negative
        coefficients).
    a_to_b, b_to_a : float
        Only when ``return_directed=True``: the directed values above.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import component_similarity
    >>> W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> round(component_similarity(W, W[:, ::-1]), 12)
    1.0
    >>> sim, a_to_b, b_to_a = component_similarity(W, W[:, :1], return_directed=True)
    >>> round(a_to_b, 12), round(b_to_a, 12)
    (0.75, 1.0)
    """
    A = _check_W(W_a, "W_a")
    B = _check_W(W_b, "W_b")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            "W_a and W_b must have the same number of examples (rows), got "
            f"{A.shape[0]} and {B.shape[0]}."
        )
    UA, zero_a = _unit_columns(A.astype(np.float64))
    UB, zero_b = _unit_columns(B.astype(np.float64))
    C = UA.T @ UB
    C[np.ix_(zero_a, zero_b)] = 1.0
    np.clip(C, -1.0, 1.0, out=C)
    a_to_b = float(C.max(axis=1).mean())
    b_to_a = float(C.max(axis=0).mean())
    sim = 0.5 * (a_to_b + b_to_a)
    if return_directed:
        return sim, a_to_b, b_to_a
    return sim


def top_parameters_by_layer(
    component_vector, layout, k: int = 5, *, squared: bool = True
) -> list[tuple[str, float]]:
    """The parameter tensors holding the largest share of a component's mass.

    Parameters
    ----------
    component_vector : array-like of shape (n_params,)
        A component in flat parameter space (e.g. one row of ``components_``, in the
        layout's order).
    layout : object
        Anything with ``names``, ``offsets`` and ``shapes`` attributes describing the flat
        vector (such as :class:`sknpeff.layout.ParameterLayout`): tensor ``names[t]`` of
        shape ``shapes[t]`` starts at ``offsets[t]``.
    k : int, default=5
        Number of tensors to return (fewer if the layout has fewer).
    squared : bool, default=True
        Mass of an entry is its square (right for LRM-NPEFF vectors ``g_k``, whose
        pseudo-Fisher diagonal is ``g_k ** 2``). Use ``squared=False`` for D-NPEFF
        components, which are already non-negative diagonals (mass = absolute value).

    Returns
    -------
    layers : list of (str, float)
        ``(name, share)`` pairs by descending share; shares are fractions of the total mass
        (all 0.0 for a zero vector).

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> from sknpeff.inspection import top_parameters_by_layer
    >>> layout = SimpleNamespace(names=["w", "b"], offsets=[0, 4], shapes=[(2, 2), (2,)])
    >>> top_parameters_by_layer(np.array([0, 0, 1, 0, 1, 0]), layout, k=2)
    [('w', 0.5), ('b', 0.5)]
    """
    try:
        names = list(layout.names)
        offsets = [int(o) for o in layout.offsets]
        shapes = [tuple(int(s) for s in shape) for shape in layout.shapes]
    except (AttributeError, TypeError) as exc:
        raise ValueError(
            "layout must have names, offsets and shapes attributes (like ParameterLayout)."
        ) from exc
    if not (len(names) == len(offsets) == len(shapes)) or not names:
        raise ValueError(
            "layout.names, layout.offsets and layout.shapes must be non-empty and of equal length."
        )
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    n_params = max(o + s for o, s in zip(offsets, sizes, strict=True))
    if hasattr(component_vector, "toarray"):  # scipy sparse row
        component_vector = component_vector.toarray()
    if hasattr(component_vector, "detach"):
        component_vector = component_vector.detach().cpu().numpy()
    v = np.asarray(component_vector, dtype=np.float64).ravel()
    if v.shape[0] != n_params:
        raise ValueError(
            f"component_vector must have length {n_params} (the layout's), got {v.shape[0]}."
        )
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    mass = v * v if squared else np.abs(v)
    per_layer = np.array(
        [mass[o : o + s].sum() for o, s in zip(offsets, sizes, strict=True)], dtype=np.float64
    )
    total = per_layer.sum()
    shares = per_layer / total if total > 0 else np.zeros_like(per_layer)
    order = np.argsort(-shares, kind="stable")[: int(k)]
    return [(names[t], float(shares[t])) for t in order]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _as_image_batch(images) -> np.ndarray:
    """Images as ``(n, H, W)`` (grey) or ``(n, H, W, C)`` with C in {3, 4}, values in [0, 1]."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"images must be a numeric array, got dtype {arr.dtype}.")
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4):
            pass
        elif arr.shape[1] in (1, 3, 4):
            arr = np.moveaxis(arr, 1, -1)
        else:
            raise ValueError(
                "images of 4 dimensions must have 1, 3 or 4 channels (first or last), got "
                f"shape {arr.shape}."
            )
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 3:
        raise ValueError(
            "images must have shape (n, H, W), (n, C, H, W) or (n, H, W, C), got shape "
            f"{arr.shape}."
        )
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize == 1 and arr.min() >= 0:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("images must be finite.")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_bytes(image: np.ndarray) -> bytes:
    """Encode an image with values in [0, 1] (grey ``(H, W)``, RGB or RGBA) as PNG."""
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if pixels.ndim == 2:
        color_type, channels = 0, 1
    else:
        channels = pixels.shape[2]
        color_type = {3: 2, 4: 6}[channels]
    h, w = pixels.shape[:2]
    raw = pixels.reshape(h, w * channels)
    scanlines = np.hstack([np.zeros((h, 1), np.uint8), raw]).tobytes()  # filter type 0
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines, 9))
        + _png_chunk(b"IEND", b"")
    )


def _png_data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode("ascii")


def _import_pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "This plot needs matplotlib, an optional dependency of sknpeff: "
            "pip install 'sknpeff[plot]' (or pip install matplotlib)."
        ) from exc
    return plt


def plot_coefficients(W, ax=None, *, sort_examples: bool = True, cmap: str = "viridis"):
    """Heatmap of the coefficient matrix (examples by components).

    Needs matplotlib (optional dependency).

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Coefficients.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure is made when None.
    sort_examples : bool, default=True
        Order the examples by their largest component (then by that coefficient,
        descending) so that each component's examples form a block.
    cmap : str, default="viridis"
        Colormap name.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import plot_coefficients
    >>> ax = plot_coefficients(np.random.default_rng(0).random((50, 4)))  # doctest: +SKIP
    """
    W = _check_W(W)
    plt = _import_pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if sort_examples:
        best = W.argmax(axis=1)
        order = np.lexsort((-W[np.arange(W.shape[0]), best], best))
        W = W[order]
    im = ax.imshow(W, aspect="auto", interpolation="nearest", cmap=cmap)
    ax.set_xlabel("component")
    ax.set_ylabel("example (sorted)" if sort_examples else "example")
    ax.figure.colorbar(im, ax=ax, label="coefficient")
    return ax


def plot_top_examples(
    images,
    W,
    component: int,
    k: int = 16,
    labels=None,
    predictions=None,
    *,
    ncols: int | None = None,
    cmap: str = "gray",
):
    """Grid of a component's top-``k`` example images, titled with label and prediction.

    Needs matplotlib (optional dependency).

    Parameters
    ----------
    images : array-like of shape (n_examples, H, W), (n_examples, C, H, W) or (n_examples, H, W, C)
        One image per example (C in {1, 3, 4}); values are rescaled to [0, 1] when outside.
    W : array-like of shape (n_examples, n_components)
        Coefficients.
    component : int
        Component to show.
    k : int, default=16
        Number of examples.
    labels, predictions : array-like of shape (n_examples,), default=None
        Shown in each image's title (``y=`` and ``p=``).
    ncols : int, default=None
        Columns of the grid (default: about ``sqrt(k)``).
    cmap : str, default="gray"
        Colormap for grey images.

    Returns
    -------
    fig : matplotlib.figure.Figure
        The figure.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import plot_top_examples
    >>> rng = np.random.default_rng(0)
    >>> images, W = rng.random((20, 8, 8)), rng.random((20, 3))
    >>> fig = plot_top_examples(images, W, component=0, k=4)  # doctest: +SKIP
    """
    W = _check_W(W)
    n, r = W.shape
    component = _check_component(component, r)
    k = _check_k(k, n)
    imgs = _as_image_batch(images)
    if imgs.shape[0] != n:
        raise ValueError(f"images must have {n} entries (rows of W), got {imgs.shape[0]}.")
    lab = None if labels is None else _as_1d(labels, "labels", n)
    pred = None if predictions is None else _as_1d(predictions, "predictions", n)
    if ncols is None:
        ncols = int(np.ceil(np.sqrt(k)))
    elif isinstance(ncols, bool) or not isinstance(ncols, numbers.Integral) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
    nrows = int(np.ceil(k / ncols))
    plt = _import_pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.8 * nrows), squeeze=False)
    idx = top_examples(W, k)[component]
    for slot, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if slot >= k:
            continue
        i = idx[slot]
        ax.imshow(
            imgs[i],
            cmap=cmap if imgs.ndim == 3 else None,
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        parts = []
        if lab is not None:
            parts.append(f"y={lab[i]}")
        if pred is not None:
            parts.append(f"p={pred[i]}")
        parts.append(f"w={W[i, component]:.3g}")
        ax.set_title(" ".join(parts), fontsize=8)
    fig.suptitle(f"Component {component}: top {k} examples", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# HTML report
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
       color: #1d232a; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin: 0 0 0.4em 0; }
p.meta { color: #5a6470; margin-top: 0; }
table.summary { border-collapse: collapse; margin: 12px 0 24px 0; font-size: 0.9em; }
table.summary th, table.summary td { border: 1px solid #d0d5db; padding: 3px 8px;
       text-align: right; }
table.summary th { background: #f0f2f5; }
table.summary td.name, table.summary th.name { text-align: left; }
section.component { border: 1px solid #d0d5db; border-radius: 6px; padding: 12px 16px;
       margin: 0 0 18px 0; }
.stats { font-size: 0.9em; margin-bottom: 8px; }
.stats span { display: inline-block; margin-right: 18px; }
.examples { display: flex; flex-wrap: wrap; gap: 8px; }
figure.ex { margin: 0; padding: 4px; border: 1px solid #e3e6ea; border-radius: 4px;
       text-align: center; font-size: 0.75em; min-width: 64px; }
figure.ex.wrong { border-color: #d9534f; background: #fdf1f0; }
figure.ex img { width: 64px; height: 64px; image-rendering: pixelated; display: block;
       margin: 0 auto 2px auto; object-fit: contain; }
table.params { border-collapse: collapse; font-size: 0.85em; margin-top: 8px; }
table.params td { padding: 1px 8px; }
.bar { display: inline-block; height: 9px; background: #4a7bd0; vertical-align: middle; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "&ndash;"
    return _esc(f"{value:.{digits}g}") if abs(value) < 1e4 else _esc(f"{value:.3e}")


def _pct(value: float) -> str:
    return _esc(f"{value:.2f}")


def _check_ratio(values, name: str, r: int) -> np.ndarray | None:
    if values is None:
        return None
    return _as_float_1d(values, name, r)


def _check_top_parameters(top_parameters, r: int) -> list[list[tuple[str, float]]] | None:
    if top_parameters is None:
        return None
    if isinstance(top_parameters, Mapping):
        entries = [top_parameters.get(j, []) for j in range(r)]
    else:
        if not isinstance(top_parameters, Sequence) or len(top_parameters) != r:
            raise ValueError(
                f"top_parameters must be a sequence of {r} lists of (layer name, share) "
                "pairs (one per component) or a dict keyed by component."
            )
        entries = list(top_parameters)
    checked = []
    for j, entry in enumerate(entries):
        rows = []
        for item in entry:
            try:
                name, share = item
                share = float(share)
            except (TypeError, ValueError):
                raise ValueError(
                    f"top_parameters[{j}] must hold (layer name, share) pairs, got {item!r}."
                ) from None
            rows.append((str(name), share))
        checked.append(rows)
    return checked


def report(
    path,
    *,
    W,
    images=None,
    labels=None,
    predictions=None,
    kl_ratios=None,
    norm_ratios=None,
    top_parameters=None,
    title: str = "NPEFF components",
    k: int = 16,
    label_names=None,
) -> str:
    """Write one self-contained HTML page describing every component.

    For each component the page shows its top ``k`` examples (as inline PNG images when
    ``images`` is given), their labels and predictions (misclassified ones outlined in
    red), label and prediction purity, its KL ratio beside its PEF-norm ratio (when
    given), and the parameter tensors holding most of its mass (when ``top_parameters``
    is given). A summary table comes first. Images are embedded as base64 ``data:`` URIs
    and the page loads nothing else, so the single file can be mailed or archived. All
    text is HTML-escaped.

    Parameters
    ----------
    path : str or os.PathLike
        File to write (parent directories are created).
    W : array-like of shape (n_examples, n_components)
        Coefficients (held-out coefficients recommended).
    images : array-like, default=None
        One image per example, shaped as in :func:`plot_top_examples`.
    labels, predictions : array-like of shape (n_examples,), default=None
        True and predicted labels.
    kl_ratios : array-like of shape (n_components,), default=None
        Each component's KL ratio (e.g. from ``GuidedPerturber.kl_ratio``).
    norm_ratios : array-like of shape (n_components,), default=None
        Each component's PEF-norm ratio over the same example sets.
    top_parameters : sequence of length n_components, or dict, default=None
        Per component, a list of ``(layer name, share of component mass)`` pairs, e.g.
        from :func:`top_parameters_by_layer`.
    title : str, default="NPEFF components"
        Page title.
    k : int, default=16
        Top examples shown per component (capped at ``n_examples``).
    label_names : sequence or dict, default=None
        Display names for label and prediction values (``label_names[value]``).

    Returns
    -------
    path : str
        The path written.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import report
    >>> rng = np.random.default_rng(0)
    >>> out = report("npeff-report/report.html", W=rng.random((30, 3)),
    ...              images=rng.random((30, 8, 8)), k=4)  # doctest: +SKIP
    """
    W = _check_W(W)
    n, r = W.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    k = min(int(k), n)
    imgs = None
    if images is not None:
        imgs = _as_image_batch(images)
        if imgs.shape[0] != n:
            raise ValueError(f"images must have {n} entries (rows of W), got {imgs.shape[0]}.")
    lab = None if labels is None else _as_1d(labels, "labels", n)
    pred = None if predictions is None else _as_1d(predictions, "predictions", n)
    kl = _check_ratio(kl_ratios, "kl_ratios", r)
    nr = _check_ratio(norm_ratios, "norm_ratios", r)
    tops = _check_top_parameters(top_parameters, r)

    def name_of(value) -> str:
        if label_names is None:
            return _esc(value)
        try:
            return _esc(label_names[value])
        except (KeyError, IndexError, TypeError):
            return _esc(value)

    summary = component_summary(W, labels=lab, predictions=pred, k=k)
    idx = top_examples(W, k)

    # Summary table
    head = ["component", "mean coef."]
    if lab is not None:
        head += ["label mode", "label purity"]
    if pred is not None:
        head += ["pred. mode", "pred. purity"]
    if kl is not None:
        head.append("KL ratio")
    if nr is not None:
        head.append("norm ratio")
    if tops is not None:
        head.append("top layer")
    rows_html = []
    for j in range(r):
        cells = [
            f'<td><a href="#c{j}">{j}</a></td>',
            f"<td>{_fmt(summary['mean_coefficient'][j])}</td>",
        ]
        if lab is not None:
            cells.append(f"<td>{name_of(summary['label_mode'][j])}</td>")
            cells.append(f"<td>{_pct(summary['label_purity'][j])}</td>")
        if pred is not None:
            cells.append(f"<td>{name_of(summary['prediction_mode'][j])}</td>")
            cells.append(f"<td>{_pct(summary['prediction_purity'][j])}</td>")
        if kl is not None:
            cells.append(f"<td>{_fmt(kl[j])}</td>")
        if nr is not None:
            cells.append(f"<td>{_fmt(nr[j])}</td>")
        if tops is not None:
            first = tops[j][0] if tops[j] else None
            cells.append(
                f'<td class="name">{_esc(first[0])} ({_fmt(100 * first[1], 3)}%)</td>'
                if first
                else "<td>&ndash;</td>"
            )
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        '<table class="summary"><thead><tr>'
        + "".join(f"<th>{_esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "\n".join(rows_html)
        + "</tbody></table>"
    )

    # Per-component sections
    sections = []
    for j in range(r):
        stats = [f"<span>mean coefficient {_fmt(summary['mean_coefficient'][j])}</span>"]
        if lab is not None:
            stats.append(
                f"<span>label purity {_pct(summary['label_purity'][j])} "
                f"(mode {name_of(summary['label_mode'][j])})</span>"
            )
        if pred is not None:
            stats.append(
                f"<span>prediction purity {_pct(summary['prediction_purity'][j])} "
                f"(mode {name_of(summary['prediction_mode'][j])})</span>"
            )
        if kl is not None or nr is not None:
            stats.append(
                f"<span>KL ratio <b>{_fmt(kl[j]) if kl is not None else '&ndash;'}</b>"
                f" &nbsp;vs&nbsp; PEF-norm ratio "
                f"<b>{_fmt(nr[j]) if nr is not None else '&ndash;'}</b></span>"
            )
        figures = []
        for rank, i in enumerate(idx[j]):
            caption = [f"#{rank + 1} &middot; ex {int(i)}"]
            if lab is not None:
                caption.append(f"y={name_of(lab[i])}")
            if pred is not None:
                caption.append(f"p={name_of(pred[i])}")
            caption.append(f"w={_fmt(W[i, j])}")
            wrong = lab is not None and pred is not None and lab[i] != pred[i]
            img = ""
            if imgs is not None:
                alt = _esc(f"example {int(i)}")
                img = f'<img src="{_png_data_uri(imgs[i])}" alt="{alt}">'
            figures.append(
                f'<figure class="ex{" wrong" if wrong else ""}">{img}'
                f"<figcaption>{'<br>'.join(caption)}</figcaption></figure>"
            )
        params_html = ""
        if tops is not None and tops[j]:
            prow = "".join(
                f'<tr><td class="name">{_esc(name)}</td><td>{_fmt(100 * share, 3)}%</td>'
                f'<td><span class="bar" style="width:{max(0.0, min(1.0, share)) * 160:.1f}px">'
                "</span></td></tr>"
                for name, share in tops[j]
            )
            params_html = (
                '<div class="params"><b>Largest parameters by layer</b> (share of mass)'
                f'<table class="params">{prow}</table></div>'
            )
        sections.append(
            f'<section class="component" id="c{j}"><h2>Component {j}</h2>'
            f'<div class="stats">{"".join(stats)}</div>'
            f'<div class="examples">{"".join(figures)}</div>{params_html}</section>'
        )

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>"
        f'<p class="meta">{n} examples, {r} components, top {k} examples per component.</p>'
        f"{table}\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(doc)
    return path
