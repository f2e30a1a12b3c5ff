"""Matplotlib figures: the coefficient matrix and a component's top examples.

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import numpy as np

from ..utils import check_int
from ._images import as_image_batch
from ._summary import top_examples
from ._validation import as_1d, check_W

__all__ = ["plot_coefficients", "plot_top_examples"]


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

