"""The report's overview: figures as PNG data URIs and the table comparing methods."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping

import numpy as np

from ._plots import plot_coefficient_distribution, plot_component_similarity, plot_kl_ratios

__all__ = ["figure_data_uri", "methods_table", "overview_figures"]

# Figures are drawn at this resolution: sharp enough on screen, small enough that the
# index of a 512-component report stays a few hundred kilobytes.
_DPI = 80


def figure_data_uri(fig, dpi: int = _DPI) -> str:
    """A matplotlib figure as a ``data:`` URI holding a PNG.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure.
    dpi : int, default=80
        Resolution.

    Returns
    -------
    uri : str
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overview_figures(
    W: np.ndarray,
    similarity: np.ndarray,
    similarity_name: str,
    kl_ratios: np.ndarray | None,
    norm_ratios: np.ndarray | None,
) -> list[dict[str, str]]:
    """The overview figures: component similarity, KL against PEF-norm ratio (when both
    are given), coefficient distribution.

    Drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), so
    making a report opens no window and leaves no figure behind.

    Parameters
    ----------
    W : ndarray of shape (n_examples, n_components)
        Coefficients.
    similarity : ndarray of shape (n_components, n_components)
        Component-by-component similarity.
    similarity_name : str
        What ``similarity`` measures (the heatmap's title).
    kl_ratios, norm_ratios : ndarray of shape (n_components,) or None
        Per-component ratios.

    Returns
    -------
    figures : list of dict
        Each with ``"uri"`` (PNG data URI), ``"alt"`` and ``"caption"``.
    """
    from matplotlib.figure import Figure

    out = []
    # Fixed margins: a layout engine would double the drawing time of these small figures.
    fig = Figure(figsize=(5.0, 4.2))
    fig.subplots_adjust(left=0.13, right=0.98, bottom=0.12, top=0.92)
    plot_component_similarity(similarity, fig.subplots(), title=similarity_name)
    out.append({
        "uri": figure_data_uri(fig),
        "alt": "component similarity heatmap",
        "caption": f"Component similarity ({similarity_name}).",
    })
    if kl_ratios is not None and norm_ratios is not None:
        fig = Figure(figsize=(4.6, 4.2))
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
        plot_kl_ratios(kl_ratios, norm_ratios, fig.subplots())
        out.append({
            "uri": figure_data_uri(fig),
            "alt": "KL ratio against PEF-norm ratio",
            "caption": "KL ratio against PEF-norm ratio, one point per component.",
        })
    fig = Figure(figsize=(9.0, 3.4))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.22)
    plot_coefficient_distribution(W, list(fig.subplots(1, 2)))
    out.append({
        "uri": figure_data_uri(fig),
        "alt": "coefficient distribution",
        "caption": "Each component's share of the coefficient mass, and the coefficients.",
    })
    return out


def methods_table(
    own_name: str, own_metrics: Mapping[str, float], others: Mapping | None
) -> dict | None:
    """This run's numbers beside other methods': one row per method, one column per metric.

    Parameters
    ----------
    own_name : str
        Name of the run's method (first row, in bold).
    own_metrics : mapping of str to float
        Its metrics, in column order.
    others : mapping of str to mapping of str to float, or None
        Other methods' metrics; a metric a method lacks shows an en dash, and metrics only
        others have become extra columns (in first-seen order).

    Returns
    -------
    table : dict or None
        ``{"columns": [...], "rows": [{"name", "cells", "own"}, ...]}``; None without
        ``others``.
    """
    if others is None:
        return None
    if not isinstance(others, Mapping):
        raise ValueError(
            "baselines must be a dict of method name to a dict of metric name to number, "
            f"got {type(others).__name__}."
        )
    columns = list(own_metrics)
    checked = {}
    for name, metrics in others.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(
                f"baselines[{name!r}] must be a dict of metric name to number, got "
                f"{type(metrics).__name__}."
            )
        row = {}
        for metric, value in metrics.items():
            try:
                row[str(metric)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"baselines[{name!r}][{metric!r}] must be a number, got {value!r}."
                ) from None
            if str(metric) not in columns:
                columns.append(str(metric))
        checked[str(name)] = row
    own = {str(k): float(v) for k, v in own_metrics.items()}
    rows = [{"name": own_name, "own": True, "cells": [own.get(c, math.nan) for c in columns]}]
    rows += [
        {"name": name, "own": False, "cells": [row.get(c, math.nan) for c in columns]}
        for name, row in checked.items()
    ]
    return {"columns": columns, "rows": rows}
