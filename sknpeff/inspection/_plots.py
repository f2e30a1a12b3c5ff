"""Matplotlib figures: the coefficient matrix, a component's top examples, and the
overview plots of the report (component similarity, KL against PEF-norm ratio, coefficient
distribution).

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import numpy as np

from ..utils import check_int
from ._images import as_image_batch
from ._summary import component_mass, top_examples
from ._validation import as_1d, as_float_1d, check_W, to_numpy

__all__ = [
    "plot_coefficient_distribution",
    "plot_coefficients",
    "plot_component_similarity",
    "plot_kl_ratios",
    "plot_top_examples",
]


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
    W = check_W(W)
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
    W = check_W(W)
    n, r = W.shape
    component = check_int(component, "component", low=0, high=r - 1)
    k = check_int(k, "k", low=1, high=n)
    imgs = as_image_batch(images, n)
    lab = None if labels is None else as_1d(labels, "labels", n)
    pred = None if predictions is None else as_1d(predictions, "predictions", n)
    if ncols is None:
        ncols = int(np.ceil(np.sqrt(k)))
    else:
        ncols = check_int(ncols, "ncols", low=1)
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



def _new_axes(ax, n_axes: int = 1, figsize=(5.0, 4.0)):
    """The axes to draw on: ``ax`` itself, or new ones on a new pyplot figure."""
    if ax is not None:
        return ax
    plt = _import_pyplot()
    _, axes = plt.subplots(1, n_axes, figsize=figsize, squeeze=False)
    return axes[0, 0] if n_axes == 1 else list(axes[0])


def plot_component_similarity(similarity, ax=None, *, cmap: str = "magma", title=None):
    """Heatmap of a components-by-components similarity matrix.

    Needs matplotlib (optional dependency).

    Parameters
    ----------
    similarity : array-like of shape (n_components, n_components)
        E.g. from :func:`pseudo_fisher_cosines` or :func:`coefficient_cosines`.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure is made when None.
    cmap : str, default="magma"
        Colormap name; the colour scale spans [0, 1] (or [-1, 1] with negative entries).
    title : str, default=None
        Axes title.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import coefficient_cosines, plot_component_similarity
    >>> S = coefficient_cosines(np.random.default_rng(0).random((30, 5)))
    >>> ax = plot_component_similarity(S)  # doctest: +SKIP
    """
    S = check_W(similarity, "similarity")
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {S.shape}.")
    ax = _new_axes(ax, figsize=(5.0, 4.2))
    vmin = -1.0 if S.min() < 0 else 0.0
    im = ax.imshow(S, cmap=cmap, vmin=vmin, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("component")
    ax.set_ylabel("component")
    if title is not None:
        ax.set_title(title, fontsize=10)
    ax.figure.colorbar(im, ax=ax, label="cosine")
    return ax


def plot_kl_ratios(kl_ratios, norm_ratios, ax=None, *, annotate: bool | None = None):
    """Scatter of each component's KL ratio against its PEF-norm ratio.

    A component above the diagonal moves its top examples' predictions more than their
    gradient norms alone would explain; one near or below it may owe its KL ratio to
    large-norm examples only. Non-finite points are left out (their count is shown).

    Needs matplotlib (optional dependency).

    Parameters
    ----------
    kl_ratios : array-like of shape (n_components,)
        KL ratios (e.g. ``GuidedPerturber.kl_ratios(...).kl_ratio``).
    norm_ratios : array-like of shape (n_components,)
        PEF-norm ratios over the same example sets.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure is made when None.
    annotate : bool, default=None
        Write each point's component index; None: when there are at most 40 components.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> from sknpeff.inspection import plot_kl_ratios
    >>> ax = plot_kl_ratios([7.6, 3.2, 1.0], [1.1, 0.9, 1.2])  # doctest: +SKIP
    """
    kl = np.asarray(to_numpy(kl_ratios))
    kl = as_float_1d(kl, "kl_ratios", kl.shape[0] if kl.ndim == 1 else -1)
    nr = as_float_1d(norm_ratios, "norm_ratios", kl.shape[0])
    ax = _new_axes(ax, figsize=(4.6, 4.2))
    ok = np.isfinite(kl) & np.isfinite(nr)
    ax.scatter(nr[ok], kl[ok], s=14, alpha=0.75, color="#4a7bd0", edgecolors="none")
    top = max([1.0, *kl[ok], *nr[ok]]) * 1.05
    ax.plot([0.0, top], [0.0, top], color="#888888", lw=0.8, ls="--", label="KL = norm ratio")
    if annotate is None:
        annotate = kl.shape[0] <= 40
    if annotate:
        for j in np.flatnonzero(ok):
            ax.annotate(str(j), (nr[j], kl[j]), fontsize=7, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xlabel("PEF-norm ratio")
    ax.set_ylabel("KL ratio")
    missing = int((~ok).sum())
    ax.set_title("KL ratio vs PEF-norm ratio" + (f" ({missing} not finite)" if missing else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_coefficient_distribution(W, axes=None, *, bins: int = 50):
    """How the coefficients spread: each component's share of the total, and the values.

    Left: components' mass (percent of the sum of all coefficients), largest first. Right:
    histogram of the nonzero coefficients (log counts), titled with the fraction that is
    zero.

    Needs matplotlib (optional dependency).

    Parameters
    ----------
    W : array-like of shape (n_examples, n_components)
        Coefficients.
    axes : sequence of two matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure is made when None.
    bins : int, default=50
        Histogram bins.

    Returns
    -------
    axes : list of two matplotlib.axes.Axes
        The axes drawn on.

    Examples
    --------
    >>> import numpy as np
    >>> from sknpeff.inspection import plot_coefficient_distribution
    >>> W = np.random.default_rng(0).random((50, 4))
    >>> axes = plot_coefficient_distribution(W)  # doctest: +SKIP
    """
    W = check_W(W)
    bins = check_int(bins, "bins", low=1)
    if axes is None:
        axes = _new_axes(None, n_axes=2, figsize=(9.0, 3.4))
    elif len(axes) != 2:
        raise ValueError(f"axes must hold two Axes, got {len(axes)}.")
    share = np.sort(component_mass(W))[::-1]
    left, right = axes
    # Stairs are one artist however many components (bars would be one each: slow).
    left.stairs(100.0 * share, np.arange(share.shape[0] + 1) - 0.5, fill=True,
                color="#4a7bd0")
    left.set_xlim(-0.5, share.shape[0] - 0.5)
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("component (by decreasing mass)")
    left.set_ylabel("% of coefficient mass")
    left.set_title("component mass", fontsize=10)
    nonzero = W[W != 0]
    zero_pct = 100.0 * (1.0 - nonzero.size / W.size) if W.size else 0.0
    if nonzero.size:
        counts, edges = np.histogram(nonzero, bins=bins)
        right.stairs(counts, edges, fill=True, color="#4a7bd0")
        right.set_yscale("log")
    right.set_xlabel("coefficient")
    right.set_ylabel("count")
    right.set_title(f"nonzero coefficients ({zero_pct:.1f}% zero)", fontsize=10)
    return [left, right]

